"""Policy semantics on hand-made layers: threshold (DMS), fixed ratio per head, AdaKV per layer."""

from __future__ import annotations

import pytest
import torch

from kvzap_eval.errors import ConfigError
from kvzap_eval.runtime.cache import SLACK, CompactLayer
from kvzap_eval.runtime.policies import FixedRatioPolicy, ThresholdPolicy, n_kept_for
from kvzap_eval.runtime.scorers import LayerCall, StreamingScorer


def filled_layer(batch: int, heads: int, tokens: int, valid: torch.Tensor | None = None) -> CompactLayer:
    layer = CompactLayer()
    keys = torch.randn(batch, heads, tokens, 4)
    layer.update(keys, keys.clone(), valid_new=valid)
    return layer


def decide(policy, layer, scores):
    drop = policy.decide(layer, scores)
    if drop is not None:
        layer.evict(drop, compact=scores.shape[-1] > 1)
    return layer


def kept_positions(layer, b=0, h=0) -> list[int]:
    row = layer.positions[b, h]
    return sorted(row[row >= 0].tolist())


def test_evicts_strictly_below_threshold():
    layer = filled_layer(1, 1, 6)
    scores = torch.tensor([[[-5.0, -4.0, -4.0 - 1e-6, -3.0, -9.0, -9.0]]])
    decide(ThresholdPolicy(-4.0, window=2), layer, scores)
    # positions 4 and 5 are in the window; equal to tau is kept
    assert kept_positions(layer) == [1, 3, 4, 5]
    assert layer.keys.shape[0] == 4 + SLACK, "repacked after a multi-token forward: the kept entries + free slots"


def test_prompt_shorter_than_window_decides_nothing():
    layer = filled_layer(1, 2, 5)
    assert ThresholdPolicy(0.0, window=8).decide(layer, torch.full((1, 2, 5), -100.0)) is None


def test_decoding_decides_each_token_once_when_it_leaves_the_window():
    policy = ThresholdPolicy(0.0, window=3)
    layer = filled_layer(1, 1, 4)
    decide(policy, layer, torch.tensor([[[-1.0, 1.0, -1.0, -1.0]]]))  # position 0 leaves: evicted
    assert kept_positions(layer) == [1, 2, 3]
    # step 1: position 1 (score +1) leaves and is kept forever; position 2 is still in the window
    layer.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    decide(policy, layer, torch.tensor([[[-1.0]]]))
    assert kept_positions(layer) == [1, 2, 3, 4]
    # step 2: position 2 (score -1) leaves: evicted, its slot is freed and then reused without growing
    layer.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    length = layer.keys.shape[-2]
    decide(policy, layer, torch.tensor([[[5.0]]]))
    assert kept_positions(layer) == [1, 3, 4, 5]
    layer.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    assert layer.keys.shape[-2] == length, "a freed slot is reused by the next decode token"
    assert kept_positions(layer) == [1, 3, 4, 5, 6]


def test_decoding_off_keeps_decode_tokens():
    assert not ThresholdPolicy(0.0, window=2, decoding=False).acts_on(1)
    assert ThresholdPolicy(0.0, window=2, decoding=False).acts_on(7)


def test_threshold_decisions_are_per_head_and_batch():
    layer = filled_layer(2, 2, 3)
    scores = torch.tensor([[[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0]], [[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]]])
    decide(ThresholdPolicy(0.0, window=1), layer, scores)
    assert kept_positions(layer, 0, 0) == [1, 2]
    assert kept_positions(layer, 0, 1) == [0, 2]
    assert kept_positions(layer, 1, 0) == [0, 1, 2]
    assert kept_positions(layer, 1, 1) == [2]
    assert layer.evicted().tolist() == [[1, 1], [0, 2]]


def test_padding_is_never_kept():
    valid = torch.tensor([[False, False, True, True, True, True]])
    layer = filled_layer(1, 2, 6, valid)
    decide(ThresholdPolicy(-100.0, window=0), layer, torch.zeros(1, 2, 6))
    assert kept_positions(layer) == [2, 3, 4, 5]
    assert layer.evicted().sum() == 0, "padding does not count as evicted"


def test_fixed_ratio_per_head_keeps_top_n_per_head():
    layer = filled_layer(1, 2, 10)
    scores = torch.randn(1, 2, 10)
    decide(FixedRatioPolicy(0.6, scope="head"), layer, scores)
    for h in range(2):
        expected = sorted(scores[0, h].topk(n_kept_for(10, 0.6)).indices.tolist())
        assert kept_positions(layer, 0, h) == expected


def test_adakv_matches_direct_budget_computation():
    torch.manual_seed(0)
    heads, tokens, ratio = 4, 50, 0.7
    layer = filled_layer(1, heads, tokens)
    scores = torch.randn(1, heads, tokens) * torch.tensor([0.1, 1.0, 3.0, 10.0])[None, :, None]
    decide(FixedRatioPolicy(ratio, scope="layer", alpha=0.2), layer, scores)
    n_kept = int(tokens * (1 - ratio))
    protected = scores[0].clone()
    protected.scatter_(-1, protected.topk(int(0.2 * n_kept)).indices, float("inf"))
    order = protected.flatten().argsort(descending=True)[: heads * n_kept]
    expected = torch.zeros(heads * tokens, dtype=torch.bool)
    expected[order] = True
    expected = expected.view(heads, tokens)
    for h in range(heads):
        assert kept_positions(layer, 0, h) == torch.nonzero(expected[h]).flatten().tolist()
        assert len(kept_positions(layer, 0, h)) >= int(0.2 * n_kept)
    assert layer.kept().sum() == heads * n_kept
    counts = layer.kept()[0].tolist()
    assert len(set(counts)) > 1, "budgets adapt across heads"


def test_streaming_keeps_sinks_and_recent_tokens_of_real_tokens():
    valid = torch.tensor([[False, False] + [True] * 20])
    layer = filled_layer(1, 1, 22, valid)
    call = LayerCall(0, torch.zeros(1, 22, 8), layer.new_token_index, module=None, kwargs={}, layer=layer)
    scores = StreamingScorer(num_kv_heads=1, n_sink=4).score(call)
    decide(FixedRatioPolicy(0.5), layer, scores)
    assert kept_positions(layer) == [2, 3, 4, 5] + list(range(16, 22))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x"])
def test_threshold_must_be_finite(bad):
    with pytest.raises(ConfigError, match="threshold"):
        ThresholdPolicy(bad)


def test_window_must_be_non_negative():
    with pytest.raises(ConfigError, match="window"):
        ThresholdPolicy(-4.0, window=-1)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_ratio_must_be_in_unit_interval(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        FixedRatioPolicy(bad)
