"""The KVzap runtime: wrap a model so that every forward prunes its KV cache and frees the evicted entries.

    with compress(model, method) as session:
        model.generate(**inputs)
        print(session.stats().achieved_compression_ratio)

Data path per decoder layer: the post-norm hidden state -> scorer (backend) -> policy -> compact cache, and
attention reads only the kept entries. Hooks are the only attachment: a forward pre-hook on the model hands the
compact cache to the attention function, a forward hook on each `self_attn` scores and evicts after attention
(prefill attention is dense, as in the paper). Leaving the block removes the hooks and restores attention.
"""

from __future__ import annotations

import inspect
import time
import weakref
from contextlib import contextmanager

import torch

from ..errors import KVzapError
from ..llm.model_info import attention_modules, check_supported
from . import attention
from .cache import CompactCache, CompactLayer
from .methods import Method
from .policies import Policy
from .scorers import LayerCall
from .stats import CompressionStats

#: Models inside a compress() block now: one block per model at a time.
_MODELS_IN_A_BLOCK: weakref.WeakSet = weakref.WeakSet()


class ScorerTimer:
    """Total scorer wall time and call count per layer, split into prefill (q > 1) and decode (q == 1)."""

    def __init__(self, num_layers: int) -> None:
        self.seconds = {"prefill": [0.0] * num_layers, "decode": [0.0] * num_layers}
        self.calls = {"prefill": [0] * num_layers, "decode": [0] * num_layers}

    def add(self, phase: str, layer_idx: int, seconds: float) -> None:
        self.seconds[phase][layer_idx] += seconds
        self.calls[phase][layer_idx] += 1

    def add_timer(self, other: ScorerTimer) -> None:
        """Add another timer's seconds and calls (e.g. the scorer calls of a shared prefill to a session's)."""
        for phase in self.seconds:
            for layer_idx, (seconds, calls) in enumerate(zip(other.seconds[phase], other.calls[phase])):
                self.seconds[phase][layer_idx] += seconds
                self.calls[phase][layer_idx] += calls

    def mean_us(self) -> dict[str, list[float]]:
        return {
            phase: [1e6 * s / c if c else 0.0 for s, c in zip(self.seconds[phase], self.calls[phase])]
            for phase in self.seconds
        }


class KVzapSession:
    """Hooks installed on one model for one method; holds the latest compact cache and the scorer timings."""

    def __init__(self, model: torch.nn.Module, method: Method) -> None:
        check_supported(model)
        check_method_fits(model, method)
        self.model = model
        self.method = method
        self.attention_modules = attention_modules(model)
        self.cache: CompactCache | None = None
        self.timer = ScorerTimer(len(self.attention_modules))
        self.paused = False
        self._handles: list = []
        self._installed = False  # this session holds the model's one compress() block
        self._base_attention: str | None = None
        parameters = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in parameters else "past_key_values"

    def new_cache(self) -> CompactCache:
        return CompactCache(len(self.attention_modules))

    def stats(self) -> CompressionStats:
        """Measurements of the cache of the latest forward or `generate`."""
        if self.cache is None:
            raise KVzapError("no forward has run inside this compress() block yet")
        return self.cache.stats()

    @contextmanager
    def pause(self):
        """Run forwards without pruning (the cache still holds only what was kept before)."""
        self.paused, previous = True, self.paused
        try:
            yield self
        finally:
            self.paused = previous

    # --- hooks -----------------------------------------------------------------------------------------------
    def _before_model_forward(self, module, args, kwargs):
        # The keyword is `cache` in recent transformers, `past_key_values` in earlier 5.x (5.2-5.18); either may be
        # given, possibly as None. The cache in use is always passed on under the keyword this version reads.
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if not isinstance(cache, CompactCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise KVzapError(
                    f"a filled {type(cache).__name__} was passed inside compress(): pass cache=session.new_cache() "
                    "or no cache at all"
                )
            if cache is None and kwargs.get("use_cache") is False:
                return args, kwargs
            cache = self.new_cache()
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs[self.cache_kwarg] = cache
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        q = tokens.shape[1]
        cache.begin_forward(mask[:, -q:] if mask is not None and mask.dim() == 2 else None)
        kwargs[attention.CACHE_KWARG] = cache
        self.cache = cache
        return args, kwargs

    def _after_attention(self, module, args, kwargs, output):
        cache = kwargs.get(attention.CACHE_KWARG)
        policy = self.method.policy
        hidden_states = kwargs["hidden_states"]
        q = hidden_states.shape[1]
        if cache is None or policy is None or self.paused or not policy.acts_on(q):
            return output
        layer_idx = module.layer_idx
        layer = cache.layers[layer_idx]
        start = time.perf_counter()
        call = LayerCall(layer_idx, hidden_states, layer.new_token_index, module, kwargs, layer)
        scores = self.method.scorer.score(call)
        self.timer.add("prefill" if q > 1 else "decode", layer_idx, time.perf_counter() - start)
        prune_layer(policy, layer, scores, q)
        return output

    # --- installation ------------------------------------------------------------------------------------------
    def install(self) -> None:
        if self.model in _MODELS_IN_A_BLOCK:
            raise KVzapError(
                "this model is already inside a compress() block: one block per model at a time (leave the first "
                "block before entering another, or use session.pause() inside it to run without pruning)"
            )
        _MODELS_IN_A_BLOCK.add(self.model)
        self._installed = True
        try:
            attention.register()
            self._base_attention = self.model.config._attn_implementation
            self.model.set_attn_implementation(attention.name_for(self._base_attention))
            self._handles.append(self.model.register_forward_pre_hook(self._before_model_forward, with_kwargs=True))
            for module in self.attention_modules:
                self._handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._base_attention is not None:
            self.model.set_attn_implementation(self._base_attention)
            self._base_attention = None
        if self._installed:
            _MODELS_IN_A_BLOCK.discard(self.model)
            self._installed = False


def prune_layer(policy: Policy, layer: CompactLayer, scores: torch.Tensor, q: int) -> None:
    """The step after a layer's attention: the policy decides on the layer's new `scores`, the layer evicts (and
    compacts, after a forward of q > 1 tokens). The one place a decision is applied, for sessions and the
    shared-prefill sweep engine alike."""
    drop = policy.decide(layer, scores)
    if drop is not None:
        layer.evict(drop, compact=q > 1)


def check_method_fits(model: torch.nn.Module, method: Method) -> None:
    """Refuse a method built for another model (another shape or placement, or a scorer bound to another model)."""
    shape = getattr(method, "built_for", None)
    problem = shape.mismatch(model) if shape is not None else None
    if problem is not None:
        raise KVzapError(problem)
    owner = getattr(method.scorer, "model", None)
    if isinstance(owner, torch.nn.Module) and owner is not model:
        raise KVzapError(
            f"this method's {type(method.scorer).__name__} scores with another model object than the one compressed: "
            "call build_method(model, ...) with the model you compress"
        )


@contextmanager
def compress(model: torch.nn.Module, method: Method):
    """Prune `model`'s KV cache with `method` inside the block; yields the `KVzapSession`."""
    session = KVzapSession(model, method)
    session.install()
    try:
        yield session
    finally:
        session.remove()
