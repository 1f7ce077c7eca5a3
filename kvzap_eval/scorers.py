"""Scorers: the importance of each new token per KV head, (B, H_kv, T), higher = keep.

A scorer sees what a decoder layer hands to attention (the post-norm hidden states) and the tokens' logical
positions. KVzap runs its surrogate through a scorer backend; the baselines need no model at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    """Scores of the new tokens, (B, H_kv, q), higher = keep.

    Most scorers need only (layer index, hidden states, token index) and implement `__call__`; scorers that need
    the attention module or the cache (SnapKV) override `score`.
    """

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Called with each batch of prompts' tokens about to be prefilled and pruned (oracles score them here)."""

    def score(self, call: LayerCall) -> torch.Tensor:
        return self(call.layer_idx, call.hidden_states, call.token_index)

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(type(self).__name__)


@dataclass
class KVzapScorer(Scorer):
    """KVzap: the surrogate's predicted log KVzip+ score of each token, from its own hidden state."""

    backend: ScorerBackend

    def __call__(self, layer_idx, hidden_states, positions):
        return self.backend(layer_idx, hidden_states)


@dataclass
class RandomScorer(Scorer):
    """Uniform random scores (a lower bound for any method), reproducible from `seed`."""

    num_kv_heads: int
    seed: int = 0
    _generators: dict = field(default_factory=dict, init=False, repr=False)

    def __call__(self, layer_idx, hidden_states, positions):
        device = hidden_states.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        b, t = positions.shape
        return torch.rand(b, self.num_kv_heads, t, generator=self._generators[device], device=device)


@dataclass
class StreamingScorer(Scorer):
    """StreamingLLM: attention sinks (the first `n_sink` tokens) first, then the most recent tokens."""

    num_kv_heads: int
    n_sink: int = 4

    def __call__(self, layer_idx, hidden_states, positions):
        scores = positions.to(torch.float32)
        scores = scores.masked_fill((positions >= 0) & (positions < self.n_sink), float("inf"))
        b, t = positions.shape
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
        keys = call.layer.keys[:, :, -q:]  # the new tokens were appended at the end, RoPE applied
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
    """The KVzip+ oracle: the teacher's scores of the actual context (one repeat pass in `prepare`), prefill only."""

    model: torch.nn.Module
    tokenizer: object
    plus: bool = True
    _scores: list | None = field(default=None, init=False, repr=False)

    def prepare(self, input_ids, attention_mask):
        from .oracle import context_scores

        self.use_scores(context_scores(self.model, self.tokenizer, input_ids, attention_mask, plus=self.plus))

    def use_scores(self, scores: list[torch.Tensor]) -> None:
        """Take the teacher's scores of the contexts about to be prefilled (`oracle.context_scores` of them), e.g.
        computed once and shared by several methods."""
        from .oracle import OracleScorer

        self._scores = OracleScorer(scores)

    def __call__(self, layer_idx, hidden_states, positions):
        if self._scores is None:
            raise RuntimeError("KVzipPlusScorer.prepare(input_ids, attention_mask) must run before the prefill")
        return self._scores(layer_idx, hidden_states, positions)
