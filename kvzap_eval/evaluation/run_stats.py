"""Statistics of an evaluation run: achieved compression per request, KV bytes per layer, scorer latency per layer.

Everything is kept as sums (entries evicted and seen, bytes, seconds and calls), so the statistics of several
data-parallel ranks merge exactly: the merged run reports means weighted by cache entries and by scorer calls, the
same figures one process evaluating every request would report, never an average of per-rank averages.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..runtime.stats import CompressionStats

PHASES = ("prefill", "decode")


@dataclass
class RequestRecord:
    """One evaluated request (one batch row): its task and the cache entries it evicted out of those it saw."""

    task: str | None
    evicted: int  # real (layer, head, token) entries evicted
    entries: int  # real (layer, head, token) entries seen

    @property
    def achieved_compression_ratio(self) -> float:
        return self.evicted / self.entries if self.entries else 0.0


@dataclass
class RunStats:
    records: list[RequestRecord] = field(default_factory=list)
    # Bytes summed over batches, per layer (see stats.py): allocated by the compressed caches, of their kept
    # entries, and of full caches of the same lengths.
    held_kv_bytes: list[int] = field(default_factory=list)
    kept_kv_bytes: list[int] = field(default_factory=list)
    full_kv_bytes: list[int] = field(default_factory=list)
    scorer_seconds: dict[str, list[float]] = field(default_factory=dict)  # phase -> per layer
    scorer_calls: dict[str, list[int]] = field(default_factory=dict)

    def add(self, stats: CompressionStats, timer, tasks: list[str | None]) -> None:
        """Record one batch: `stats` of its cache, the session's scorer `timer`, each row's task."""
        per_layer_head = stats.per_layer_head()
        evicted = per_layer_head["evicted"].sum(dim=(0, 2)).tolist()  # per batch row
        entries = (per_layer_head["kept"] + per_layer_head["evicted"]).sum(dim=(0, 2)).tolist()
        for task, out, seen in zip(tasks, evicted, entries):
            self.records.append(RequestRecord(task, int(out), int(seen)))
        self._add_bytes(
            [s.held_kv_bytes for s in stats.layers],
            [s.kept_kv_bytes for s in stats.layers],
            [s.full_kv_bytes for s in stats.layers],
        )
        for phase in PHASES:
            self._add_timings(phase, timer.seconds[phase], timer.calls[phase])

    def _add_bytes(self, held: list[int], kept: list[int], full: list[int]) -> None:
        for total, part in ((self.held_kv_bytes, held), (self.kept_kv_bytes, kept), (self.full_kv_bytes, full)):
            total.extend([0] * (len(part) - len(total)))
            for layer, nbytes in enumerate(part):
                total[layer] += nbytes

    def _add_timings(self, phase: str, seconds: list[float], calls: list[int]) -> None:
        total_s = self.scorer_seconds.setdefault(phase, [0.0] * len(seconds))
        total_c = self.scorer_calls.setdefault(phase, [0] * len(calls))
        for layer, (s, c) in enumerate(zip(seconds, calls)):
            total_s[layer] += s
            total_c[layer] += c

    @classmethod
    def merged(cls, parts: list[RunStats]) -> RunStats:
        """One run's statistics from its ranks' (records in rank order; sums added)."""
        total = cls()
        for part in parts:
            total.records += part.records
            total._add_bytes(part.held_kv_bytes, part.kept_kv_bytes, part.full_kv_bytes)
            for phase, seconds in part.scorer_seconds.items():
                total._add_timings(phase, seconds, part.scorer_calls[phase])
        return total

    def summary(self) -> dict:
        """The JSON-ready figures lm-eval's results["config"]["kvzap"] carries."""
        per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for record in self.records:
            if record.task is not None:
                per_task[record.task][0] += record.evicted
                per_task[record.task][1] += record.entries
        held, kept, full = sum(self.held_kv_bytes), sum(self.kept_kv_bytes), sum(self.full_kv_bytes)
        evicted = sum(r.evicted for r in self.records)
        entries = sum(r.entries for r in self.records)
        return {
            "requests": len(self.records),
            "achieved_compression_ratio": evicted / entries if entries else None,
            "achieved_compression_ratio_per_task": {
                task: out / seen if seen else 0.0 for task, (out, seen) in sorted(per_task.items())
            },
            "held_kv_bytes": held,
            "kept_kv_bytes": kept,
            "full_kv_bytes": full,
            "held_kv_bytes_fraction": held / full if full else None,
            "kept_kv_bytes_fraction": kept / full if full else None,
            "held_kv_bytes_per_layer": list(self.held_kv_bytes),
            "kept_kv_bytes_per_layer": list(self.kept_kv_bytes),
            "full_kv_bytes_per_layer": list(self.full_kv_bytes),
            "scorer_latency_us_per_layer": {
                phase: [1e6 * s / c if c else 0.0 for s, c in zip(seconds, self.scorer_calls[phase])]
                for phase, seconds in self.scorer_seconds.items()
            },
            "scorer_calls_per_layer": {phase: list(calls) for phase, calls in self.scorer_calls.items()},
        }
