"""The policy contract: given a layer's cache and the new tokens' scores, choose which entries to evict."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ...moved import warn_moved
from ..cache import CompactLayer


class Policy(ABC):
    """Decides evictions after a layer's attention; called once per layer and forward.

    `acts_on(q)` says whether the forward of q new tokens needs scores and a decision at all. `decide` records the
    new tokens' scores in the layer (a threshold policy decides a token later, when it leaves the window) and
    advances what the layer has decided; it returns an (N,) bool mask over the layer's arena slots (True = evict;
    `CompactLayer.slot_positions` says which token each slot holds) or None when nothing is evicted now.
    """

    @abstractmethod
    def acts_on(self, q: int) -> bool: ...

    @abstractmethod
    def decide(self, layer: CompactLayer, scores: torch.Tensor) -> torch.Tensor | None: ...

    def select(self, layer: CompactLayer, scores: torch.Tensor) -> torch.Tensor | None:
        """Deprecated name of `decide` (it records scores and advances the layer's decisions, not only selects)."""
        warn_moved(f"{type(self).__name__}.select", f"{type(self).__name__}.decide", depth=1)
        return self.decide(layer, scores)
