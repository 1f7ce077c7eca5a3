"""Torch scorer backend: the surrogate's weights, bound once per layer, run as plain functional calls."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...surrogate import KVzapSurrogate
from .base import ScorerBackend

Placement = Sequence[tuple[torch.device, torch.dtype]]


class TorchBackend(ScorerBackend):
    """Runs `KVzapSurrogate` layers with `F.linear` on weights detached and cast to each layer's device/dtype."""

    name = "torch"

    def __init__(self, surrogate: KVzapSurrogate, placement: Placement) -> None:
        if len(placement) != len(surrogate.layers):
            raise ValueError(f"placement has {len(placement)} layers, the surrogate {len(surrogate.layers)}")
        self.weights: list[tuple[torch.Tensor, ...]] = []
        for module, (device, dtype) in zip(surrogate.layers, placement):
            linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
            bound = []
            for linear in linears:
                bound += [linear.weight.detach().to(device, dtype), linear.bias.detach().to(device, dtype)]
            self.weights.append(tuple(bound))

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self.weights[layer_idx]
        if len(weights) == 2:
            out = F.linear(hidden_states, *weights)
        else:
            w1, b1, w2, b2 = weights
            out = F.linear(F.gelu(F.linear(hidden_states, w1, b1)), w2, b2)
        return out.transpose(1, 2)
