"""The compact cache computes exactly what a dense cache with the evicted entries masked out computes."""

from __future__ import annotations

import pytest
import torch

from kvzap_eval.llm.model_info import placement
from kvzap_eval.runtime.backends import TorchBackend
from kvzap_eval.runtime.methods import Method, MethodConfig
from kvzap_eval.runtime.policies import ThresholdPolicy
from kvzap_eval.runtime.scorers import KVzapScorer
from kvzap_eval.runtime.session import compress

from .conftest import CACHE_KWARG, left_padded, output_cache, surrogate_for, tiny_model
from .dms_reference import MaskingDMS, masking_dms

# fp32 on CPU; the two paths differ only in summation order (folded GQA heads, gathered keys).
ATOL = 1e-4
WINDOW = 8
THRESHOLD = 0.0


def kvzap_method(model, backend):
    return Method(MethodConfig(), KVzapScorer(backend), ThresholdPolicy(THRESHOLD, window=WINDOW))


def generate(model, ids, mask, steps=16):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits)


def ours_evicted(session, layer_idx: int, real: torch.Tensor) -> set[tuple[int, int, int]]:
    """Real (batch, head, position) triples no longer held by our cache."""
    layer = session.cache.layers[layer_idx]
    b, h, _ = layer.positions.shape
    result = set()
    for bi in range(b):
        for hi in range(h):
            kept = set(layer.positions[bi, hi][layer.positions[bi, hi] >= 0].tolist())
            seen = torch.nonzero(real[bi, : layer.cumulative_length]).flatten().tolist()
            result |= {(bi, hi, p) for p in seen if p not in kept}
    return result


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[40], [40, 29, 17]], ids=["batch1", "batch3-padded"])
def test_generate_logits_equal_masked_dense_reference(arch, kernel, lengths):
    model = tiny_model(arch, attn_implementation=kernel)
    surrogate = surrogate_for(model)
    backend = TorchBackend(surrogate, placement(model))
    ids, mask = left_padded(lengths)

    reference = MaskingDMS(backend, THRESHOLD, WINDOW)
    with masking_dms(model, reference, kernel):
        ref_tokens, ref_logits = generate(model, ids, mask)
    dense_tokens, dense_logits = generate(model, ids, mask)
    with compress(model, kvzap_method(model, backend)) as session:
        tokens, logits = generate(model, ids, mask)

    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert (dense_logits - ref_logits).abs().max() > 1e-2, "evictions must matter for this test to mean anything"
    real = torch.cat([mask, torch.ones(len(lengths), tokens.shape[1] - ids.shape[1], dtype=torch.long)], 1).bool()
    for layer_idx in range(model.config.num_hidden_layers):
        expected = reference.evicted_triples(layer_idx, real)
        assert expected, "the threshold must evict something"
        assert ours_evicted(session, layer_idx, real) == expected


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_chunked_prefill_then_decode_equals_reference(kernel):
    """Context, then a question chunk against the pruned cache, then decode steps: every forward's logits agree."""
    model = tiny_model("llama", attn_implementation=kernel)
    backend = TorchBackend(surrogate_for(model), placement(model))
    ids, _ = left_padded([60], seed=3)
    chunks = [ids[:, :30], ids[:, 30:45], ids[:, 45:46], ids[:, 46:47], ids[:, 47:55], *ids[:, 55:].split(1, dim=1)]

    def run(context):
        logits, cache = [], None
        with context as handle:
            for chunk in chunks:
                out = model(input_ids=chunk, use_cache=True, **{CACHE_KWARG: cache})
                cache = output_cache(out)
                logits.append(out.logits)
        return torch.cat(logits, dim=1), handle

    ref_logits, reference = run(masking_dms(model, MaskingDMS(backend, THRESHOLD, WINDOW), kernel))
    logits, session = run(compress(model, kvzap_method(model, backend)))
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    real = torch.ones(1, 60, dtype=torch.bool)
    for layer_idx in range(2):
        assert ours_evicted(session, layer_idx, real) == reference.evicted_triples(layer_idx, real)
    assert session.cache.get_seq_length() == 60


def test_padded_batch_equals_each_row_alone(llama):
    """Left padding is never kept and changes nothing: a padded batch decides like each sequence on its own."""
    backend = TorchBackend(surrogate_for(llama), placement(llama))
    ids, mask = left_padded([40, 29, 17])
    with compress(llama, kvzap_method(llama, backend)) as session:
        batch_tokens, _ = generate(llama, ids, mask)
        batch_kept = session.stats().per_layer_head()["kept"]
        for row, length in enumerate([40, 29, 17]):
            alone = ids[row : row + 1, ids.shape[1] - length :]
            tokens, _ = generate(llama, alone, torch.ones_like(alone))
            assert torch.equal(tokens[0], batch_tokens[row, ids.shape[1] - length :])
            assert torch.equal(session.stats().per_layer_head()["kept"][:, 0], batch_kept[:, row])
