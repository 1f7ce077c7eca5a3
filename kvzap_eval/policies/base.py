"""The policy contract: given a layer's cache and the new tokens' scores, choose which entries to evict."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..cache import CompactLayer


class Policy(ABC):
    """Decides evictions after a layer's attention; called once per layer and forward.

    `acts_on(q)` says whether the forward of q new tokens needs scores and a decision at all; `select` returns an
    (N,) bool mask over the layer's arena slots (True = evict; `CompactLayer.slot_positions` says which token each
    slot holds) or None when nothing is evicted.
    """

    @abstractmethod
    def acts_on(self, q: int) -> bool: ...

    @abstractmethod
    def select(self, layer: CompactLayer, scores: torch.Tensor) -> torch.Tensor | None: ...
