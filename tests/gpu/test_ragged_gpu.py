"""The ragged KV storage on CUDA: flash `varlen_attn` over the arena equals the per-row SDPA path, and a bf16
generation uses it without falling back. Skips without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from kvzap_eval import attention, build_method, compress
from kvzap_eval.runtime.attention import gathered_attention, row_attention, varlen_attention
from kvzap_eval.runtime.cache import CompactLayer
from kvzap_eval.runtime.policies import ThresholdPolicy
from kvzap_eval.surrogate import save_surrogate

from ..conftest import left_padded, surrogate_for, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]


@pytest.mark.parametrize("q", [1, 5])
def test_varlen_equals_row_attention_on_cuda(q):
    torch.manual_seed(0)
    layer, policy = CompactLayer(), ThresholdPolicy(0.0, window=4)
    keys = torch.randn(3, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    layer.update(keys, keys.flip(-1))
    scores = torch.randn(3, 2, 40, device="cuda")
    layer.set_pending_scores(scores)
    layer.evict(policy.decide(layer, scores), compact=True)
    new = torch.randn(3, 2, q, 64, device="cuda", dtype=torch.bfloat16)
    layer.update(new, new.flip(-1))
    query = torch.randn(3, 8, q, 64, device="cuda", dtype=torch.bfloat16)
    expected = row_attention(layer, query, 0.125).float()
    torch.testing.assert_close(varlen_attention(layer, query, 0.125).float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("q", [1, 5])
def test_gathered_rectangle_equals_row_attention_on_cuda_fp32(q):
    """The CUDA path where flash varlen does not serve (fp32): one masked SDPA over the gathered rows."""
    torch.manual_seed(0)
    layer, policy = CompactLayer(), ThresholdPolicy(0.0, window=4)
    keys = torch.randn(3, 2, 40, 64, device="cuda")
    layer.update(keys, keys.flip(-1))
    scores = torch.randn(3, 2, 40, device="cuda")
    layer.set_pending_scores(scores)
    layer.evict(policy.decide(layer, scores), compact=True)
    new = torch.randn(3, 2, q, 64, device="cuda")
    layer.update(new, new.flip(-1))
    query = torch.randn(3, 8, q, 64, device="cuda")
    torch.testing.assert_close(gathered_attention(layer, query, 0.125), row_attention(layer, query, 0.125),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_bf16_generation_runs_on_varlen_without_fallback(tmp_path):
    model = tiny_model(head_dim=64, num_attention_heads=4, hidden_size=256).to("cuda", torch.bfloat16)
    ids, mask = left_padded([60, 41])
    method = build_method(
        model, surrogate=str(save_surrogate(surrogate_for(model), tmp_path / "KVzap-mlp-tiny")), threshold=0.0, window=8
    )
    with compress(model, method) as session:
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)  # fmt: skip
    assert out.shape == (2, 68)
    assert 0.0 < session.stats().achieved_compression_ratio < 1.0
    assert not attention._VARLEN_FAILED, "varlen_attn fell back to the per-row path"
