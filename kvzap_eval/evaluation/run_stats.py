"""Statistics of an evaluation run: achieved compression per request, KV bytes, scorer latency per layer.

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
    kv_bytes: int = 0  # bytes the compressed caches held, summed over batches
    full_kv_bytes: int = 0  # bytes full caches of the same lengths would have held
    scorer_seconds: dict[str, list[float]] = field(default_factory=dict)  # phase -> per layer
    scorer_calls: dict[str, list[int]] = field(default_factory=dict)

    def add(self, stats: CompressionStats, timer, tasks: list[str | None]) -> None:
        """Record one batch: `stats` of its cache, the session's scorer `timer`, each row's task."""
        per_layer_head = stats.per_layer_head()
        evicted = per_layer_head["evicted"].sum(dim=(0, 2)).tolist()  # per batch row
        entries = (per_layer_head["kept"] + per_layer_head["evicted"]).sum(dim=(0, 2)).tolist()
        for task, out, seen in zip(tasks, evicted, entries):
            self.records.append(RequestRecord(task, int(out), int(seen)))
        self.kv_bytes += stats.nbytes
        self.full_kv_bytes += stats.full_kv_nbytes
        for phase in PHASES:
            self._add_timings(phase, timer.seconds[phase], timer.calls[phase])

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
            total.kv_bytes += part.kv_bytes
            total.full_kv_bytes += part.full_kv_bytes
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
        evicted = sum(r.evicted for r in self.records)
        entries = sum(r.entries for r in self.records)
        return {
            "requests": len(self.records),
            "achieved_compression_ratio": evicted / entries if entries else None,
            "achieved_compression_ratio_per_task": {
                task: out / seen if seen else 0.0 for task, (out, seen) in sorted(per_task.items())
            },
            "kv_bytes": self.kv_bytes,
            "full_kv_bytes": self.full_kv_bytes,
            "kv_bytes_fraction": self.kv_bytes / self.full_kv_bytes if self.full_kv_bytes else None,
            "scorer_latency_us_per_layer": {
                phase: [1e6 * s / c if c else 0.0 for s, c in zip(seconds, self.scorer_calls[phase])]
                for phase, seconds in self.scorer_seconds.items()
            },
            "scorer_calls_per_layer": {phase: list(calls) for phase, calls in self.scorer_calls.items()},
        }
