"""Scorers: the importance of each new token per KV head, (B, H_kv, T), higher = keep.

A scorer has one entry point, `score(call)`: `call` holds what a decoder layer hands to attention (the post-norm
hidden states), each new token's index among its row's real tokens (`token_index`; the cache's `positions` are the
slots' logical positions, another thing), the attention module and the layer's cache. KVzap runs its surrogate
through a scorer backend; the baselines need no model at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import KVzapError
from ..moved import warn_moved
from . import oracle
from .backends import ScorerBackend
from .cache import CompactLayer


@dataclass
class LayerCall:
    """What one decoder layer's attention just processed: everything a scorer may look at."""

    layer_idx: int
    hidden_states: torch.Tensor  # (B, q, D), post input_layernorm
    token_index: torch.Tensor  # (B, q) index of each new token among its row's real tokens, -1 = padding
    module: torch.nn.Module  # the layer's self_attn
    kwargs: dict  # self_attn's keyword arguments (position_embeddings, ...)
    layer: CompactLayer  # the layer's cache, new tokens included, nothing evicted yet


class Scorer:
    """Scores of the new tokens, (B, H_kv, q), higher = keep: `score(call)`."""

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Called with each batch of prompts' tokens about to be prefilled and pruned (oracles score them here)."""

    def score(self, call: LayerCall) -> torch.Tensor:
        raise NotImplementedError(type(self).__name__)

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """Deprecated: `score(LayerCall(...))` (the only entry point; this one cannot serve scorers that need the
        attention module or the cache)."""
        warn_moved(
            f"{type(self).__name__}(layer_idx, hidden_states, positions)", f"{type(self).__name__}.score(call)", depth=1
        )
        return self.score(LayerCall(layer_idx, hidden_states, token_index, module=None, kwargs={}, layer=None))


@dataclass
class KVzapScorer(Scorer):
    """KVzap: the surrogate's predicted log KVzip+ score of each token, from its own hidden state."""

    backend: ScorerBackend

    def score(self, call: LayerCall) -> torch.Tensor:
        return self.backend(call.layer_idx, call.hidden_states)


@dataclass
class RandomScorer(Scorer):
    """Uniform random scores (a lower bound for any method), reproducible from `seed`."""

    num_kv_heads: int
    seed: int = 0
    _generators: dict = field(default_factory=dict, init=False, repr=False)

    def score(self, call: LayerCall) -> torch.Tensor:
        device = call.hidden_states.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        b, t = call.token_index.shape
        return torch.rand(b, self.num_kv_heads, t, generator=self._generators[device], device=device)


@dataclass
class StreamingScorer(Scorer):
    """StreamingLLM: attention sinks (the first `n_sink` tokens) first, then the most recent tokens."""

    num_kv_heads: int
    n_sink: int = 4

    def score(self, call: LayerCall) -> torch.Tensor:
        token_index = call.token_index
        scores = token_index.to(torch.float32)
        scores = scores.masked_fill((token_index >= 0) & (token_index < self.n_sink), float("inf"))
        b, t = token_index.shape
        return scores[:, None, :].expand(b, self.num_kv_heads, t)


@dataclass
class SnapKVScorer(Scorer):
    """SnapKV (arXiv 2404.14469, kvpress `SnapKVPress`): attention that the last `window_size` prompt tokens pay to
    each earlier token, averaged over those queries and the query heads of the KV group, smoothed by an average pool
    of `kernel_size`; the observation window itself scores highest. Prefill forwards only."""

    window_size: int = 64
    kernel_size: int = 5

    def score(self, call: LayerCall) -> torch.Tensor:
        module, hidden = call.module, call.hidden_states
        b, q, _ = hidden.shape
        window = min(self.window_size, q - 1)
        keys = call.layer.new_keys()  # (B, H_kv, q, d), RoPE applied
        n_kv, head_dim = keys.shape[1], keys.shape[-1]
        n_rep = module.config.num_attention_heads // n_kv
        queries = module.q_proj(hidden[:, -window:]).view(b, window, -1, head_dim)
        if getattr(module, "q_norm", None) is not None:
            queries = module.q_norm(queries)
        cos, sin = (t[:, -window:] for t in call.kwargs["position_embeddings"])
        queries = queries.transpose(1, 2)
        queries = queries * cos[:, None] + _rotate_half(queries) * sin[:, None]
        queries = queries.reshape(b, n_kv, n_rep * window, head_dim)  # query heads of a group folded together
        logits = queries @ keys.transpose(-1, -2) / math.sqrt(head_dim)  # (B, H_kv, n_rep * window, q)
        causal = torch.ones(window, q, dtype=torch.bool, device=hidden.device).tril_(q - window)
        valid = causal[None, None].repeat(1, 1, n_rep, 1) & (call.token_index >= 0)[:, None, None, :]
        probs = torch.softmax(logits.float().masked_fill(~valid, float("-inf")), dim=-1)
        scores = probs.nan_to_num(0.0).mean(dim=2)  # (B, H_kv, q)
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        scores[..., -window:] = scores.amax() + 1.0
        return scores


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class KVzipPlusScorer(Scorer):
    """The KVzip+ oracle: the teacher's scores of the actual context (one repeat pass in `prepare`, see `oracle.py`),
    looked up by each token's index among its row's real tokens. Prefill only."""

    model: torch.nn.Module
    tokenizer: object
    plus: bool = True
    _scores: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def prepare(self, input_ids, attention_mask):
        self.use_scores(oracle.context_scores(self.model, self.tokenizer, input_ids, attention_mask, plus=self.plus))

    def use_scores(self, scores: list[torch.Tensor]) -> None:
        """Take the teacher's scores of the contexts about to be prefilled (`oracle.context_scores` of them), e.g.
        computed once and shared by several methods."""
        self._scores = scores

    def score(self, call: LayerCall) -> torch.Tensor:
        token_index = call.token_index
        if self._scores is None:
            raise RuntimeError("KVzipPlusScorer.prepare(input_ids, attention_mask) must run before the prefill")
        if token_index.shape[1] == 1:
            raise KVzapError("the KVzip+ oracle scores the prefill only: use it with decoding=False")
        table = self._scores[call.layer_idx].to(call.hidden_states.device)
        if token_index.shape[0] != table.shape[0] or int(token_index.max()) >= table.shape[-1]:
            raise KVzapError("the model got other tokens than the oracle scored: pass the same input_ids to both")
        index = token_index.clamp_min(0)[:, None, :].expand(-1, table.shape[1], -1)
        return table.gather(2, index)
