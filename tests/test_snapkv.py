"""SnapKV scores equal the formula computed from the model's own attention probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvzap_eval import build_method, compress

from .conftest import left_padded, tiny_model


def test_snapkv_scores_match_eager_attention_probabilities(arch):
    model = tiny_model(arch, attn_implementation="eager")
    ids, mask = left_padded([40])
    window, kernel = 8, 5
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    method = build_method(model, method="snapkv", compression_ratio=0.5)
    method.scorer.window_size, method.scorer.kernel_size = window, kernel
    seen = {}
    original = method.scorer.score

    def recording(call):
        seen[call.layer_idx] = original(call)
        return seen[call.layer_idx]

    method.scorer.score = recording
    with compress(model, method), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    n_kv = model.config.num_key_value_heads
    for layer_idx, probs in enumerate(attentions):
        expected = probs[:, :, -window:, :].mean(2)
        expected = F.avg_pool1d(expected, kernel_size=kernel, padding=kernel // 2, stride=1)
        expected = expected.view(1, n_kv, -1, 40).mean(2)
        torch.testing.assert_close(seen[layer_idx][..., :-window], expected[..., :-window], atol=1e-5, rtol=1e-4)
        assert (seen[layer_idx][..., -window:] > expected.max()).all(), "the observation window is always kept"


def test_snapkv_prunes_to_its_ratio_with_padding(llama):
    ids, mask = left_padded([64, 40])
    with compress(llama, build_method(llama, method="snapkv", compression_ratio=0.75)) as session:
        llama(input_ids=ids, attention_mask=mask)
    for layer_stats in session.stats().layers:
        assert layer_stats.kept.tolist() == [[16, 16], [10, 10]]
