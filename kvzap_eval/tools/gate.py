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

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..atomic import write_json_atomic
from ..cli_args import OneLineParser, check_writable_file, finite_float, positive_int
from ..errors import ConfigError
from ..evaluation.sweep import Run, SweepConfig, run_sweep


class BaselineError(ConfigError):
    """A gate baseline file is missing, not JSON, or lacks or holds impossible fields."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Tolerances:
    accuracy_drop: float = 0.1  # absolute: one sample in ten
    compression_shift: float = 0.02  # absolute, on the compression ratio
    latency_slack: float = 0.5  # relative, on the best-backend / torch decode latency ratio

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not _is_number(value) or value < 0:
                raise BaselineError(f"tolerance {item.name} must be a finite number >= 0, got {value!r}")


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

    def __post_init__(self) -> None:
        """Refuse a subset that cannot be run or a gate that cannot fail (BaselineError, one line)."""
        if not isinstance(self.tasks, list) or not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise BaselineError(f"tasks must be a non-empty list of task names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise BaselineError(f"tasks lists a task twice: {self.tasks}")
        for name in ("length", "limit"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise BaselineError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not _is_number(self.threshold):
            raise BaselineError(f"threshold must be a finite number, got {self.threshold!r}")
        for name in ("pretrained", "surrogate"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise BaselineError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        if not isinstance(self.include_path, str):
            raise BaselineError(f"include_path must be a string, got {self.include_path!r}")
        for name in ("accuracy", "compression_ratio"):
            if not isinstance(getattr(self, name), dict):
                raise BaselineError(f"{name} must be an object task -> figure, got {getattr(self, name)!r}")
        if self.latency_ratio is not None and (not _is_number(self.latency_ratio) or self.latency_ratio <= 0):
            raise BaselineError(f"latency_ratio must be a finite number > 0 or null, got {self.latency_ratio!r}")

    def check_figures(self, path: Path | None = None) -> None:
        """Refuse a baseline without a finite figure in [0, 1] for every task: comparing with NaN never fails."""
        where = f"baseline {path}: " if path is not None else ""
        for name in ("accuracy", "compression_ratio"):
            figures = getattr(self, name)
            for task in self.tasks:
                value = figures.get(task)
                if not _is_number(value) or not 0.0 <= value <= 1.0:
                    raise BaselineError(
                        f"{where}{name} of {task} must be a finite number in [0, 1], got {value!r}: measure it with"
                        f" `kvzap-eval gate --baseline {path or 'B.json'} --update`"
                    )

    @classmethod
    def load(cls, path: Path) -> Baseline:
        if not path.is_file():
            if path.exists():
                raise BaselineError(f"baseline {path} is not a file: give the JSON file the gate wrote")
            raise BaselineError(
                f"baseline {path} does not exist: create it with `kvzap-eval gate --baseline {path} "
                "--update --tasks ...`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            message = f"baseline {path} is not valid JSON ({error}): fix it or write it again with --update"
            raise BaselineError(message) from None
        if not isinstance(data, dict):
            raise BaselineError(f"baseline {path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls._from_json(data)
        except BaselineError as error:
            raise BaselineError(f"baseline {path}: {error}") from None

    @classmethod
    def _from_json(cls, data: dict) -> Baseline:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BaselineError(f"unknown field(s) {', '.join(unknown)}: the fields are {', '.join(sorted(known))}")
        missing = [name for name in ("tasks", "length", "limit", "threshold") if name not in data]
        if missing:
            raise BaselineError(f"missing field(s) {', '.join(missing)}")
        tolerances = data.get("tolerances", {})
        if not isinstance(tolerances, dict) or set(tolerances) - {item.name for item in fields(Tolerances)}:
            raise BaselineError(f"tolerances must be an object of {', '.join(f.name for f in fields(Tolerances))}")
        return cls(**{**data, "tolerances": Tolerances(**tolerances)})

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
    baseline.check_figures()
    tol = baseline.tolerances
    failures = []
    for task in baseline.tasks:
        if not all(_is_number(getattr(measured, name).get(task)) for name in ("accuracy", "compression_ratio")):
            failures.append(f"{task}: no finite accuracy and compression ratio measured (got"
                            f" {measured.accuracy.get(task)!r}, {measured.compression_ratio.get(task)!r})")  # fmt: skip
            continue
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
    parser = OneLineParser(prog="kvzap-eval gate", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--update", action="store_true", help="measure and rewrite the baseline")
    parser.add_argument("--tasks", nargs="+", help="with --update on a new baseline: the subset")
    parser.add_argument("--length", type=positive_int, help="with --update on a new baseline (default 1024)")
    parser.add_argument("--limit", type=positive_int, help="with --update on a new baseline (default 10)")
    parser.add_argument("--threshold", type=finite_float, help="with --update: the threshold; without: a what-if run")
    parser.add_argument("--include-path", help="with --update on a new baseline (default tasks)")
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args(argv)
    new_only = [f"--{name.replace('_', '-')}" for name in ("tasks", "length", "limit", "include_path")
                if getattr(args, name) is not None]  # fmt: skip

    if args.update:
        check_writable_file(args.baseline, "--baseline")  # before minutes of measuring
        if args.baseline.exists():
            if new_only:
                raise ConfigError(
                    f"{', '.join(new_only)} set the subset of a new baseline, and {args.baseline} exists: edit it,"
                    " or give another --baseline path"
                )
            baseline = Baseline.load(args.baseline)
            if args.threshold is not None:
                baseline.threshold = args.threshold
        elif args.tasks and args.threshold is not None:
            baseline = Baseline(
                tasks=args.tasks,
                length=args.length or 1024,
                limit=args.limit or 10,
                threshold=args.threshold,
                include_path=args.include_path or "tasks",
            )
        else:
            raise ConfigError("a new baseline needs --tasks and --threshold")
        measured = measure(baseline, latency=not args.no_latency)
        baseline.accuracy, baseline.compression_ratio = measured.accuracy, measured.compression_ratio
        baseline.latency_ratio = measured.latency_ratio
        baseline.check_figures()  # never write a baseline that could not fail
        baseline.save(args.baseline)
        print(f"baseline written to {args.baseline}: {json.dumps(asdict(measured))}")
        return 0
    if new_only:
        raise ConfigError(f"{', '.join(new_only)} only apply with --update (the subset is the baseline's)")
    baseline = Baseline.load(args.baseline)
    baseline.check_figures(args.baseline)
    measured = measure(baseline, threshold=args.threshold, latency=not args.no_latency)
    print(f"measured: {json.dumps(asdict(measured))}")
    failures = compare(baseline, measured)
    for line in failures:
        print(f"REGRESSION {line}")
    print("gate: FAIL" if failures else "gate: pass")
    return 1 if failures else 0
