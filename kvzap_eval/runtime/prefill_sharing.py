"""One dense context prefill for several methods: every method's pruned cache is derived from it.

In the paper protocol a context is prefilled densely and each layer's cache is pruned right after that layer's
attention, so the forward pass, the keys and values and every scorer's inputs are the same whatever the method and
its setting; only the decisions differ. `share_prefill` runs the context's forward once inside a compress() block
whose hook scores the new tokens with every method's scorer and evicts nothing. `SharedPrefill.cache_for(i)` then
replays method i's decisions on a copy of the dense cache, layer by layer, through `session.prune_layer` (the
policy's `decide`, the layer's `evict`): the step a session takes after each layer's attention, on a layer in the
state that session would have seen. The derived cache is the one method i's own prefill would have left.

    shared = share_prefill(model, methods, lambda cache, kwarg: model(input_ids=ids, use_cache=True, **{kwarg: cache}))
    for index, method in enumerate(methods):
        with compress(model, method) as session:
            model.generate(question_ids, **{session.cache_kwarg: shared.cache_for(index)})

The scorers must have been prepared for the context (`Scorer.prepare`) and the context must go through one forward
(chunks would see each other's evictions). What this relies on from the cache: `cache.layers[i]` is the layer a
policy decides on, and a cache deep-copies into an independent cache in the same state (`copy.deepcopy`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import KVzapError
from .cache import CompactCache
from .methods import Method
from .policies import Policy
from .scorers import LayerCall, Scorer
from .session import ScorerTimer, check_method_fits, compress, prune_layer


@dataclass
class SharedPrefill:
    """The dense cache after one context forward, with every method's scores of the context's tokens."""

    methods: Sequence[Method]
    cache: CompactCache  # nothing evicted
    scores: list[dict[int, torch.Tensor]]  # per method: layer index -> scores (B, H_kv, q); empty for `full`
    timers: list[ScorerTimer]  # per method: its scorer's calls during the shared forward
    query_length: int  # tokens of the forward (padding included)
    output: Any = None  # what the forward returned (e.g. the context's last logits)

    def cache_for(self, index: int, reuse: bool = False) -> CompactCache:
        """Method `index`'s pruned cache. `reuse` hands out the dense cache itself, pruned in place, instead of a
        copy: for the last method that needs it."""
        cache = self.cache if reuse else copy.deepcopy(self.cache)
        policy = self.methods[index].policy
        for layer_idx, scores in sorted(self.scores[index].items()):
            prune_layer(policy, cache.layers[layer_idx], scores, self.query_length)
        return cache


def share_prefill(
    model: torch.nn.Module, methods: Sequence[Method], forward: Callable[[CompactCache, str], Any]
) -> SharedPrefill:
    """Run `forward(cache, cache_kwarg)` (one forward of the context into `cache`) once for all `methods`."""
    for method in methods:
        check_method_fits(model, method)
    recorder = _Recorder(list(methods), [ScorerTimer(_num_layers(model)) for _ in methods])
    with compress(model, _RecordingMethod(recorder)) as session:
        cache = session.new_cache()
        with torch.no_grad():
            output = forward(cache, session.cache_kwarg)
    if recorder.query_length is None:
        raise KVzapError("share_prefill: the forward ran no attention layer inside the shared block")
    return SharedPrefill(methods, cache, recorder.scores, recorder.timers, recorder.query_length, output)


def _num_layers(model: torch.nn.Module) -> int:
    from ..llm.model_info import attention_modules

    return len(attention_modules(model))


@dataclass
class _Recorder(Scorer):
    """Scores each layer's new tokens with every method's scorer (timed per method) and keeps the scores."""

    methods: list[Method]
    timers: list[ScorerTimer]
    scores: list[dict[int, torch.Tensor]] = field(default_factory=list)
    query_length: int | None = None
    _seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.scores = [{} for _ in self.methods]

    def score(self, call: LayerCall) -> torch.Tensor:
        q = call.hidden_states.shape[1]
        if call.layer_idx in self._seen:
            raise KVzapError("share_prefill: the context must be prefilled in one forward (got a second one)")
        self._seen.add(call.layer_idx)
        self.query_length = q
        for index, method in enumerate(self.methods):
            if method.policy is None or not method.policy.acts_on(q):
                continue
            start = time.perf_counter()
            self.scores[index][call.layer_idx] = method.scorer.score(call)
            self.timers[index].add("prefill" if q > 1 else "decode", call.layer_idx, time.perf_counter() - start)
        return call.hidden_states.new_empty(0)


class _KeepAll(Policy):
    """Decides nothing: the shared forward only records scores (each method's own policy says whether it acts)."""

    def acts_on(self, q: int) -> bool:
        return True

    def decide(self, layer, scores):
        return None


@dataclass
class _RecordingMethod:
    """What compress() needs (duck-typed like `methods.Method`): the recorder as scorer, a policy that keeps all."""

    scorer: _Recorder
    policy: Policy = field(default_factory=_KeepAll)
    config: Any = None
