"""`kvzap-eval gate`: CI regression gate on a small fixed subset, against a committed baseline.

    kvzap-eval gate --baseline baselines/gate-smollm2.json            # fails (exit 1) on a regression
    kvzap-eval gate --baseline baselines/gate-smollm2.json --update   # rewrites the baseline, explicitly

The baseline file holds the subset (model, tasks, length, limit, threshold) and the figures it produced. The gate
re-runs the subset with KVzap at that threshold and fails when, on any task, accuracy drops by more than
`accuracy_drop` or the achieved compression ratio moves by more than `compression_shift`, or when the best scorer
backend's decode latency relative to the torch backend (both measured in this run) exceeds the baseline ratio by
more than `latency_slack` (relative).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_json_atomic
from .errors import ConfigError
from .sweep import Run, SweepConfig, run_sweep


@dataclass
class Tolerances:
    accuracy_drop: float = 0.1  # absolute: one sample in ten
    compression_shift: float = 0.02  # absolute, on the compression ratio
    latency_slack: float = 0.5  # relative, on the best-backend / torch decode latency ratio


@dataclass
class Baseline:
    tasks: list[str]
    length: int
    limit: int
    threshold: float
    pretrained: str | None = None
    surrogate: str | None = None
    include_path: str = "tasks"
    accuracy: dict[str, float] = field(default_factory=dict)
    compression_ratio: dict[str, float] = field(default_factory=dict)
    latency_ratio: float | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)

    @classmethod
    def load(cls, path: Path) -> Baseline:
        if not path.is_file():
            raise ConfigError(
                f"baseline {path} does not exist: create it with `kvzap-eval gate --baseline {path} "
                "--update --tasks ...`"
            )
        data = json.loads(path.read_text())
        data["tolerances"] = Tolerances(**data.get("tolerances", {}))
        return cls(**data)

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self), sort_keys=True)


@dataclass
class Measurement:
    accuracy: dict[str, float]
    compression_ratio: dict[str, float]
    latency_ratio: float | None


def measure(baseline: Baseline, threshold: float | None = None, latency: bool = True) -> Measurement:
    """Run the baseline's subset (optionally at another threshold, e.g. to test the gate itself)."""
    tau = baseline.threshold if threshold is None else threshold
    with tempfile.TemporaryDirectory() as tmp:
        config = SweepConfig(
            output=Path(tmp) / "gate.jsonl",
            tasks=baseline.tasks,
            lengths=[baseline.length],
            methods=["kvzap_mlp"],
            thresholds=[tau],
            limit=baseline.limit,
            include_path=baseline.include_path,
            pretrained=baseline.pretrained,
            model_args={"surrogate": baseline.surrogate} if baseline.surrogate else {},
        )
        rows = run_sweep(config, [Run("kvzap_mlp", task, baseline.length, threshold=tau) for task in baseline.tasks])
    return Measurement(
        accuracy={r["task"]: r["accuracy"] for r in rows},
        compression_ratio={r["task"]: r["compression_ratio"] for r in rows},
        latency_ratio=_latency_ratio() if latency else None,
    )


def _latency_ratio() -> float | None:
    """Best available backend's decode scorer latency / the torch backend's, measured now (None: torch only)."""
    from .latency import best_backend_decode_ratio

    best = best_backend_decode_ratio()
    if best is None:
        print("gate: no scorer backend besides torch is installed here, the latency check is skipped")
        return None
    name, ratio = best
    print(f"gate: best decode backend {name}, {ratio:.3f} x the torch backend's latency")
    return ratio


def compare(baseline: Baseline, measured: Measurement) -> list[str]:
    """Every regression, one line each (empty: the gate passes)."""
    tol = baseline.tolerances
    failures = []
    for task in baseline.tasks:
        before, now = baseline.accuracy[task], measured.accuracy[task]
        if now < before - tol.accuracy_drop - 1e-9:
            failures.append(f"{task}: accuracy {now:.3f} < baseline {before:.3f} - {tol.accuracy_drop}")
        before, now = baseline.compression_ratio[task], measured.compression_ratio[task]
        if abs(now - before) > tol.compression_shift + 1e-9:
            failures.append(
                f"{task}: compression ratio {now:.3f} moved from baseline {before:.3f} "
                f"by more than {tol.compression_shift}"
            )
    if baseline.latency_ratio is not None and measured.latency_ratio is not None:
        limit = baseline.latency_ratio * (1 + tol.latency_slack)
        if measured.latency_ratio > limit:
            failures.append(
                f"decode scorer latency ratio {measured.latency_ratio:.3f} > baseline "
                f"{baseline.latency_ratio:.3f} x {1 + tol.latency_slack}"
            )
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvzap-eval gate", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--update", action="store_true", help="measure and rewrite the baseline")
    parser.add_argument("--tasks", nargs="+", help="with --update on a new baseline: the subset")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--threshold", type=float, help="with --update: the threshold; without: a what-if run")
    parser.add_argument("--include-path", default="tasks")
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args(argv)

    if args.update:
        if args.baseline.exists():
            baseline = Baseline.load(args.baseline)
            if args.threshold is not None:
                baseline.threshold = args.threshold
        elif args.tasks and args.threshold is not None:
            baseline = Baseline(
                tasks=args.tasks,
                length=args.length,
                limit=args.limit,
                threshold=args.threshold,
                include_path=args.include_path,
            )
        else:
            raise ConfigError("a new baseline needs --tasks and --threshold")
        measured = measure(baseline, latency=not args.no_latency)
        baseline.accuracy, baseline.compression_ratio = measured.accuracy, measured.compression_ratio
        baseline.latency_ratio = measured.latency_ratio
        baseline.save(args.baseline)
        print(f"baseline written to {args.baseline}: {json.dumps(asdict(measured))}")
        return 0
    baseline = Baseline.load(args.baseline)
    measured = measure(baseline, threshold=args.threshold, latency=not args.no_latency)
    print(f"measured: {json.dumps(asdict(measured))}")
    failures = compare(baseline, measured)
    for line in failures:
        print(f"REGRESSION {line}")
    print("gate: FAIL" if failures else "gate: pass")
    return 1 if failures else 0
