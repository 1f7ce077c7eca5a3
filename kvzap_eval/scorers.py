"""Scorers: the importance of each new token per KV head, (B, H_kv, T), higher = keep.

A scorer sees what a decoder layer hands to attention (the post-norm hidden states) and the tokens' logical
positions. KVzap runs its surrogate through a scorer backend; the baselines need no model at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backends import ScorerBackend


class Scorer:
    """(layer index, hidden states (B, T, D), positions (B, T); -1 = padding) -> scores (B, H_kv, T)."""

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
