"""The scorer-backend contract: run one layer's surrogate on hidden states and return log-scores per KV head."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ScorerBackend(ABC):
    """Maps (layer index, hidden states (B, T, D)) to predicted log KVzip+ scores (B, H_kv, T); higher = keep.

    A backend binds the surrogate's weights to each decoder layer's device and dtype once, at construction; a call
    moves nothing and builds no autograd graph.
    """

    name: str

    @abstractmethod
    def __call__(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor: ...
