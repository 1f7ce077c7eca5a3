"""Fixed-ratio policies: keep the top `1 - ratio` of each multi-token forward's new tokens (prefill only).

`scope="head"`: every KV head keeps the same number n = int(T * (1 - ratio)) of its best tokens (kvpress
`ScorerPress`; used with the random and StreamingLLM scorers). `scope="layer"` is AdaKV (arXiv 2407.11550, kvpress
`AdaKVPress`): the layer keeps n tokens per head on average, chosen over all heads at once, and each head's top
floor(alpha * n) tokens are protected (alpha = 0.2). T counts real tokens only; padding is always evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...settings import validate_ratio
from ..cache import CompactLayer
from .base import Policy


@dataclass
class FixedRatioPolicy(Policy):
    ratio: float
    scope: str = "head"  # "head" (uniform per head) or "layer" (AdaKV)
    alpha: float = 0.2

    def __post_init__(self) -> None:
        self.ratio = validate_ratio(self.ratio)
        if self.scope not in ("head", "layer"):
            raise ConfigError(f"scope must be 'head' or 'layer', got {self.scope!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"alpha must be a number in [0, 1] (the share of each head's budget protected), got {self.alpha!r}"
            )

    def acts_on(self, q: int) -> bool:
        return q > 1

    def decide(self, layer: CompactLayer, scores: torch.Tensor) -> torch.Tensor | None:
        if self.ratio == 0.0:
            return None
        real = layer.new_token_index >= 0  # (B, q)
        scores = scores.to(torch.float32).masked_fill(~real[:, None, :], float("-inf"))
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for b in range(scores.shape[0]):
            n_kept = n_kept_for(int(real[b].sum()), self.ratio)
            keep[b] = self._keep_row(scores[b], n_kept)
        return layer.drop_new(~keep)

    def _keep_row(self, scores: torch.Tensor, n_kept: int) -> torch.Tensor:
        """(H, q) scores of one batch row -> (H, q) keep mask."""
        keep = torch.zeros_like(scores, dtype=torch.bool)
        if n_kept == 0:
            return keep
        if self.scope == "head":
            return keep.scatter_(-1, scores.topk(n_kept, dim=-1).indices, True)
        n_safe = max(1, int(n_kept * self.alpha)) if self.alpha > 0 else 0
        protected = scores.scatter(-1, scores.topk(n_safe, dim=-1).indices, torch.finfo(scores.dtype).max)
        heads, q = scores.shape
        flat = keep.view(-1).scatter_(0, protected.view(-1).topk(heads * n_kept).indices, True)
        return flat.view(heads, q)


def n_kept_for(n_tokens: int, ratio: float) -> int:
    """Entries kept per head out of `n_tokens` at `ratio` (at least one, as in kvpress 0.5.5)."""
    if n_tokens == 0:
        return 0
    return max(1, int(n_tokens * (1 - ratio)))
