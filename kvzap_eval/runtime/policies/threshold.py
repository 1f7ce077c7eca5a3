"""DMS threshold policy, the way KVzap prunes (kvpress `DMSPress`; DMS, arXiv 2506.05345; KVzap, arXiv 2601.07891).

Parameters: `threshold` tau (log-score scale), `window` w (default 128), `decoding` (also prune while decoding).
Each token is scored once, from its own hidden state, when it is processed; its score waits in the cache beside it.
When a token leaves the window of the w most recent tokens it is decided once and for all: evicted if its score is
strictly below tau, kept otherwise, independently per (batch, KV head). Prefill decides all but the last w prompt
tokens at once; a decode step decides the token that just left the window ("delayed eviction"); a forward of
several tokens after the first (a prefill chunk, a question after a context) follows the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...settings import DEFAULT_WINDOW, validate_threshold, validate_window
from ..cache import CompactLayer
from .base import Policy


@dataclass
class ThresholdPolicy(Policy):
    threshold: float
    window: int = DEFAULT_WINDOW
    decoding: bool = True

    def __post_init__(self) -> None:
        self.threshold = validate_threshold(self.threshold)
        self.window = validate_window(self.window)

    def acts_on(self, q: int) -> bool:
        return q > 1 or self.decoding

    def decide(self, layer: CompactLayer, scores: torch.Tensor) -> torch.Tensor | None:
        layer.set_pending_scores(scores)
        cutoff = layer.cumulative_length - self.window
        if cutoff <= layer.decided_upto:
            return None
        if cutoff == layer.decided_upto + 1:  # a decode step: exactly one token leaves the window
            leaving = layer.slot_positions == layer.decided_upto
        else:
            leaving = (layer.slot_positions >= layer.decided_upto) & (layer.slot_positions < cutoff)
        layer.decided_upto = cutoff  # decided once: never looked at again
        return leaving & (layer.slot_scores < self.threshold)
