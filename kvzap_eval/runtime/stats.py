"""Measurements of a compressed cache: entries kept and evicted per (layer, batch, head), bytes held, ratios."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moved import warn_moved


@dataclass
class LayerStats:
    """One layer: real entries kept/evicted per (batch, head), logical and physical lengths, bytes."""

    kept: torch.Tensor  # (B, H) int
    evicted: torch.Tensor  # (B, H) int
    logical_length: int  # tokens seen, padding included
    physical_length: int  # slots held per row
    nbytes: int  # every tensor the layer holds (keys, values, slot bookkeeping)
    full_kv_nbytes: int  # keys + values of an uncompressed cache of the same logical length

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
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers)

    @property
    def full_kv_nbytes(self) -> int:
        return sum(s.full_kv_nbytes for s in self.layers)

    @property
    def bytes_fraction(self) -> float:
        """Bytes held / bytes a full cache would hold."""
        return self.nbytes / self.full_kv_nbytes if self.full_kv_nbytes else 1.0

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
        """The statistics of some batch rows only; bytes are shared evenly by the rows of the batch."""
        layers = []
        for s in self.layers:
            share = len(rows) / s.kept.shape[0]
            layers.append(
                LayerStats(
                    kept=s.kept[rows],
                    evicted=s.evicted[rows],
                    logical_length=s.logical_length,
                    physical_length=s.physical_length,
                    nbytes=round(s.nbytes * share),
                    full_kv_nbytes=round(s.full_kv_nbytes * share),
                )
            )
        return CompressionStats(layers)

    def per_layer_head(self) -> dict[str, torch.Tensor]:
        """Kept and evicted counts as (layers, B, H) tensors."""
        return {
            "kept": torch.stack([s.kept for s in self.layers]),
            "evicted": torch.stack([s.evicted for s in self.layers]),
        }

    def summary(self) -> dict:
        """JSON-ready summary (what reports and lm-eval's results["config"] record)."""
        return {
            "achieved_compression_ratio": self.achieved_compression_ratio,
            "kv_bytes": self.nbytes,
            "full_kv_bytes": self.full_kv_nbytes,
            "bytes_fraction": self.bytes_fraction,
            "per_layer_achieved_compression_ratio": [s.achieved_compression_ratio for s in self.layers],
            "logical_length": self.layers[0].logical_length if self.layers else 0,
            "physical_length": [s.physical_length for s in self.layers],
        }

    def per_row_compression_ratio(self) -> list[float]:
        """Deprecated name of `per_row_achieved_compression_ratio`."""
        warn_moved(
            "CompressionStats.per_row_compression_ratio", "CompressionStats.per_row_achieved_compression_ratio", depth=1
        )
        return self.per_row_achieved_compression_ratio()
