"""Per-sample achieved compression, recorded by the lm-eval adapter and read by our tasks' `process_results`.

All generation of an lm-eval run finishes before any `process_results` runs, so a process-wide table keyed by the
task's own sample id (`doc["kvzap_uid"]`) is enough; a sample nothing was recorded for ran with a full cache.
"""

from __future__ import annotations

_RATIOS: dict[str, float] = {}


def record(uid: str, compression_ratio: float) -> None:
    _RATIOS[uid] = float(compression_ratio)


def lookup(uid: str) -> float:
    return _RATIOS.get(uid, 0.0)


def clear() -> None:
    _RATIOS.clear()
