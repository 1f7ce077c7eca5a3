"""One shared dense prefill gives every method the cache, logits and statistics of that method's own prefill."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from kvzap_eval import MethodConfig, build_method, compress
from kvzap_eval.errors import KVzapError
from kvzap_eval.runtime.methods import Method
from kvzap_eval.runtime.policies import FixedRatioPolicy, ThresholdPolicy
from kvzap_eval.runtime.prefill_sharing import share_prefill
from kvzap_eval.runtime.scorers import KVzipPlusScorer
from kvzap_eval.surrogate import save_surrogate

from .conftest import CACHE_KWARG, left_padded, surrogate_for, tiny_model

CONTEXT, QUESTION, STEPS = 48, 5, 4


def methods_for(model, surrogate_dir: str, batch: int = 1) -> dict[str, Method]:
    """Every method (the KVzip+ oracle with fixed scores: its teacher needs a real tokenizer), built afresh."""
    surrogate = {"surrogate": surrogate_dir}
    configs = {
        "full": MethodConfig(method="full"),
        "kvzap": MethodConfig(method="kvzap", threshold=0.0, window=8, **surrogate),
        "kvzap_no_decoding": MethodConfig(method="kvzap", threshold=0.5, window=4, decoding=False, **surrogate),
        "kvzap_adakv": MethodConfig(method="kvzap_adakv", compression_ratio=0.6, **surrogate),
        "random": MethodConfig(method="random", compression_ratio=0.5, seed=3),
        "streaming": MethodConfig(method="streaming", compression_ratio=0.7),
        "snapkv": MethodConfig(method="snapkv", compression_ratio=0.5),
    }
    methods = {name: build_method(model, config) for name, config in configs.items()}
    oracle_scores = [torch.randn(batch, 2, CONTEXT, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kvzip = MethodConfig(method="kvzip_plus", threshold=0.0, window=8)
    methods["kvzip_plus_threshold"] = Method(kvzip, fixed_oracle(model, oracle_scores), ThresholdPolicy(0.0, 8, False))
    adakv = MethodConfig(method="kvzip_plus", compression_ratio=0.6)
    methods["kvzip_plus"] = Method(adakv, fixed_oracle(model, oracle_scores), FixedRatioPolicy(0.6, scope="layer"))
    return methods


def fixed_oracle(model, scores: list[torch.Tensor]) -> KVzipPlusScorer:
    """The KVzip+ scorer with given teacher scores (no teacher pass)."""
    scorer = KVzipPlusScorer(model, tokenizer=None)
    scorer.use_scores(scores)
    return scorer


def continue_in_session(model, method, cache, ids, mask):
    """The question forward then greedy decode steps against `cache` with `method`; logits and final statistics."""
    logits = []
    with compress(model, method) as session, torch.no_grad(), session.pause() if method.prefill_only else nullcontext():
        width = CONTEXT + QUESTION
        out = model(input_ids=ids[:, CONTEXT:width], attention_mask=mask[:, :width], **{CACHE_KWARG: cache})
        logits.append(out.logits)
        for _ in range(STEPS):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, **{CACHE_KWARG: cache})
            logits.append(out.logits)
        return torch.cat(logits, 1), session.stats()


def layer_state(layer) -> dict:
    """Every attribute of a cache layer (whatever its storage), tensors as tensors."""
    return {name: value for name, value in vars(layer).items() if name != "device"}


def assert_same_state(ours, theirs, where: str) -> None:
    for a, b in zip(ours.layers, theirs.layers):
        state_a, state_b = layer_state(a), layer_state(b)
        assert state_a.keys() == state_b.keys(), where
        for name, value in state_a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state_b[name]), f"{where}: {name}"
            else:
                assert value == state_b[name], f"{where}: {name}"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", [[CONTEXT + QUESTION], [CONTEXT + QUESTION, CONTEXT + QUESTION - 7]])
def test_every_method_gets_the_cache_of_its_own_prefill(tmp_path, arch, rows):
    model = tiny_model(arch)
    surrogate_dir = str(save_surrogate(surrogate_for(model), tmp_path / "surrogate"))
    ids, mask = left_padded(rows, seed=5)
    context = dict(input_ids=ids[:, :CONTEXT], attention_mask=mask[:, :CONTEXT], logits_to_keep=1)

    own = {}
    for name, method in methods_for(model, surrogate_dir, len(rows)).items():
        with compress(model, method) as session, torch.no_grad():
            cache = session.new_cache()
            first = model(**context, **{CACHE_KWARG: cache}).logits
        own[name] = (first, cache.stats(), *continue_in_session(model, method, cache, ids, mask), cache)

    methods = methods_for(model, surrogate_dir, len(rows))
    shared = share_prefill(model, list(methods.values()), lambda c, kw: model(**context, **{kw: c}).logits)
    for index, (name, method) in enumerate(methods.items()):
        first, prefill_stats, logits, stats, final_cache = own[name]
        assert torch.equal(shared.output, first), name
        cache = shared.cache_for(index, reuse=index == len(methods) - 1)
        assert (
            cache.stats().per_row_achieved_compression_ratio() == prefill_stats.per_row_achieved_compression_ratio()
        ), name
        ours_logits, ours_stats = continue_in_session(model, method, cache, ids, mask)
        assert torch.equal(ours_logits, logits), name
        assert ours_stats.summary() == stats.summary(), name
        assert_same_state(cache, final_cache, name)
        if name not in ("full",):
            assert stats.achieved_compression_ratio > 0, f"{name} evicts nothing: the test would prove little"


def test_scores_are_recorded_once_per_method_and_layer_and_timed(tmp_path, llama):
    surrogate_dir = str(save_surrogate(surrogate_for(llama), tmp_path / "surrogate"))
    methods = list(methods_for(llama, surrogate_dir).values())
    ids, mask = left_padded([CONTEXT])
    shared = share_prefill(llama, methods, lambda c, kw: llama(input_ids=ids, attention_mask=mask, **{kw: c}))
    assert shared.scores[0] == {}  # full: no scorer
    assert all(sorted(scores) == [0, 1] for scores in shared.scores[1:])
    assert all(sum(timer.calls["prefill"]) == 2 for timer in shared.timers[1:])


def test_a_context_in_two_forwards_is_refused(llama):
    ids, mask = left_padded([CONTEXT])
    method = build_method(llama, method="random", compression_ratio=0.5)

    def two_forwards(cache, kwarg):
        llama(input_ids=ids[:, :20], **{kwarg: cache})
        llama(input_ids=ids[:, 20:], **{kwarg: cache})

    with pytest.raises(KVzapError, match="one forward"):
        share_prefill(llama, [method], two_forwards)
