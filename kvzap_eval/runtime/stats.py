"""Measurements of a compressed cache: entries kept and evicted per (layer, batch, head), bytes, ratios.

Three byte counts per layer, each a measurement (never a setting):

- `held_kv_bytes`: what the layer has allocated: the key and value arenas, free slots included, plus bookkeeping
  (slot positions, pending scores, row regions); what the process really spends on this cache;
- `kept_kv_bytes`: kept entries x bytes of one entry's key and value, what an exact layout would hold;
- `full_kv_bytes`: an uncompressed cache of the same logical length (every token, padding included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moved import warn_moved


@dataclass
class LayerStats:
    """One layer: real entries kept/evicted and slots allocated per (batch, head), logical length, bytes."""

    kept: torch.Tensor  # (B, H) int
    evicted: torch.Tensor  # (B, H) int
    logical_length: int  # tokens seen, padding included
    capacity: torch.Tensor  # (B, H) slots allocated to each row (kept entries + free slots)
    held_kv_bytes: int
    kept_kv_bytes: int
    full_kv_bytes: int

    @property
    def achieved_compression_ratio(self) -> float:
        """Evicted real entries / real entries seen (padding never counts)."""
        total = int((self.kept + self.evicted).sum())
        return int(self.evicted.sum()) / total if total else 0.0

    @property
    def compression_ratio(self) -> float:
        """Deprecated name of `achieved_compression_ratio` (`compression_ratio` is `MethodConfig`'s setting)."""
        warn_moved("LayerStats.compression_ratio", "LayerStats.achieved_compression_ratio", depth=1)
        return self.achieved_compression_ratio

    def select_rows(self, rows: list[int]) -> LayerStats:
        """Batch rows `rows` only: held bytes shared in proportion to the slots each row was allocated."""
        allocated = int(self.capacity.sum())
        share = int(self.capacity[rows].sum()) / allocated if allocated else len(rows) / self.kept.shape[0]
        kept = self.kept[rows]
        entry = self.kept_kv_bytes // int(self.kept.sum()) if int(self.kept.sum()) else 0
        return LayerStats(
            kept=kept,
            evicted=self.evicted[rows],
            logical_length=self.logical_length,
            capacity=self.capacity[rows],
            held_kv_bytes=round(self.held_kv_bytes * share),
            kept_kv_bytes=int(kept.sum()) * entry,
            full_kv_bytes=self.full_kv_bytes * len(rows) // self.kept.shape[0],
        )


@dataclass
class CompressionStats:
    """A whole cache: the paper's compression ratio is the mean of the per-layer ratios."""

    layers: list[LayerStats]

    @property
    def achieved_compression_ratio(self) -> float:
        """The mean over layers of evicted / seen real entries (the setting of the same idea is
        `MethodConfig.compression_ratio`)."""
        return sum(s.achieved_compression_ratio for s in self.layers) / len(self.layers) if self.layers else 0.0

    @property
    def compression_ratio(self) -> float:
        """Deprecated name of `achieved_compression_ratio` (`compression_ratio` is `MethodConfig`'s setting)."""
        warn_moved("CompressionStats.compression_ratio", "CompressionStats.achieved_compression_ratio", depth=1)
        return self.achieved_compression_ratio

    @property
    def held_kv_bytes(self) -> int:
        return sum(s.held_kv_bytes for s in self.layers)

    @property
    def kept_kv_bytes(self) -> int:
        return sum(s.kept_kv_bytes for s in self.layers)

    @property
    def full_kv_bytes(self) -> int:
        return sum(s.full_kv_bytes for s in self.layers)

    @property
    def held_kv_bytes_fraction(self) -> float:
        """Bytes held / bytes a full cache would hold."""
        return self.held_kv_bytes / self.full_kv_bytes if self.full_kv_bytes else 1.0

    @property
    def kept_kv_bytes_fraction(self) -> float:
        """Bytes of the kept entries / bytes a full cache would hold."""
        return self.kept_kv_bytes / self.full_kv_bytes if self.full_kv_bytes else 1.0

    def per_row_achieved_compression_ratio(self) -> list[float]:
        """Achieved compression ratio of each batch row (mean over layers), e.g. one per evaluated sample."""
        if not self.layers:
            return []
        ratios = []
        for row in range(self.layers[0].kept.shape[0]):
            per_layer = []
            for s in self.layers:
                total = int((s.kept[row] + s.evicted[row]).sum())
                per_layer.append(int(s.evicted[row].sum()) / total if total else 0.0)
            ratios.append(sum(per_layer) / len(per_layer))
        return ratios

    def select_rows(self, rows: list[int]) -> CompressionStats:
        """The statistics of some batch rows only."""
        return CompressionStats([s.select_rows(rows) for s in self.layers])

    def per_layer_head(self) -> dict[str, torch.Tensor]:
        """Kept and evicted counts as (layers, B, H) tensors."""
        return {
            "kept": torch.stack([s.kept for s in self.layers]),
            "evicted": torch.stack([s.evicted for s in self.layers]),
        }

    def summary(self) -> dict:
        """JSON-ready summary: totals, and per layer the compression ratio and the three byte counts."""
        return {
            "achieved_compression_ratio": self.achieved_compression_ratio,
            "held_kv_bytes": self.held_kv_bytes,
            "kept_kv_bytes": self.kept_kv_bytes,
            "full_kv_bytes": self.full_kv_bytes,
            "held_kv_bytes_fraction": self.held_kv_bytes_fraction,
            "kept_kv_bytes_fraction": self.kept_kv_bytes_fraction,
            "logical_length": self.layers[0].logical_length if self.layers else 0,
            "per_layer": {
                "achieved_compression_ratio": [s.achieved_compression_ratio for s in self.layers],
                "held_kv_bytes": [s.held_kv_bytes for s in self.layers],
                "kept_kv_bytes": [s.kept_kv_bytes for s in self.layers],
                "full_kv_bytes": [s.full_kv_bytes for s in self.layers],
            },
        }

    def per_row_compression_ratio(self) -> list[float]:
        """Deprecated name of `per_row_achieved_compression_ratio`."""
        warn_moved(
            "CompressionStats.per_row_compression_ratio", "CompressionStats.per_row_achieved_compression_ratio", depth=1
        )
        return self.per_row_achieved_compression_ratio()
