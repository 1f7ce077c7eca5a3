"""`kvzap-eval sweep-bench`: the same sweep with both engines, taking turns task by task in one process; prints both
wall times, their ratio, whether every row is identical, and where the shared-prefill engine's model time went.

    kvzap-eval sweep-bench --limit 20        # 8 method settings x 9 tasks x 20 samples at 1k (about an hour on CPU)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_args import OneLineParser, finite_float, positive_int
from ..evaluation.suite import suite_tasks
from ..evaluation.sweep import ENGINES, SWEEP_METHODS, SweepConfig, execute, sweep_settings
from ..evaluation.sweep_engine import EngineWork, SharedPrefillLM

#: With one tau: full, three threshold methods and four matched to KVzap's ratio = 8 method settings.
DEFAULT_METHODS = ["full", "kvzap_mlp", "kvzap_linear", "kvzip_plus_threshold", "random", "streaming", "snapkv",
                   "kvzip_plus"]  # fmt: skip
#: What must agree between the engines' rows (the key holds the run and its identity).
FIGURES = ("key", "accuracy", "n", "compression_ratio", "kv_bytes_fraction", "setting_ratio", "identity")


@dataclass
class EngineRun:
    engine: str
    seconds: float = 0.0
    rows: dict[str, tuple] = field(default_factory=dict)
    work: EngineWork | None = None  # the shared-prefill engine's model time


def bench(settings: dict, out_dir: Path) -> list[EngineRun]:
    """Sweep `settings` (SweepConfig fields) with each engine into a fresh table of its own, timed.

    The engines take turns task by task (per-method first on even tasks, shared-prefill first on odd ones), so
    that both see the same machine load over the run; each engine's time is the sum of its turns."""
    runs = {engine: EngineRun(engine) for engine in reversed(ENGINES)}  # per-method, then shared-prefill
    for engine in runs:
        (out_dir / f"{engine}.jsonl").unlink(missing_ok=True)
    for turn, task in enumerate(settings["tasks"]):
        for engine in list(runs)[:: 1 if turn % 2 == 0 else -1]:
            start = time.perf_counter()
            state = execute(
                SweepConfig(output=out_dir / f"{engine}.jsonl", engine=engine, **{**settings, "tasks": [task]})
            )
            runs[engine].seconds += time.perf_counter() - start
            runs[engine].rows = {row["key"]: tuple(json.dumps(row[name], sort_keys=True) for name in FIGURES)
                                 for row in state.done.values()}  # fmt: skip
            if isinstance(state.lm, SharedPrefillLM):
                runs[engine].work = _sum(runs[engine].work or EngineWork(), state.lm.work)
    return list(runs.values())


def _sum(a: EngineWork, b: EngineWork) -> EngineWork:
    return EngineWork(a.contexts + b.contexts, a.shared_seconds + b.shared_seconds, a.method_seconds + b.method_seconds)


def summary(runs: list[EngineRun], settings: dict) -> tuple[list[str], bool]:
    """The lines to print and whether every row agrees."""
    per_method, shared = runs
    same = [key for key, figures in per_method.rows.items() if shared.rows.get(key) == figures]
    identical = len(same) == len(per_method.rows) == len(shared.rows)
    contexts = len(settings["tasks"]) * len(settings["lengths"]) * settings["limit"]
    lines = [
        f"{len(per_method.rows)} rows ({len(per_method.rows) // (len(settings['tasks']) * len(settings['lengths']))}"
        f" method settings x {len(settings['tasks'])} tasks x {len(settings['lengths'])} lengths), {contexts}"
        f" contexts, limit {settings['limit']}, batch size {settings['batch_size']}",
        f"per-method:     {per_method.seconds:9.1f} s",
        f"shared-prefill: {shared.seconds:9.1f} s",
        f"ratio:          {per_method.seconds / shared.seconds:9.2f}x less wall time (target >= 4x)",
        f"rows identical: {len(same)}/{len(per_method.rows)}" + ("" if identical else "  MISMATCH"),
    ]
    work = shared.work
    if work is not None:
        lines.append(
            f"shared-prefill model time: {work.shared_seconds:.1f} s shared (context prefills and KVzip+ teacher,"
            f" {work.contexts} context prefills), {work.method_seconds:.1f} s per method (caches derived, questions and"
            " answers); the rest is lm-eval's own work per run"
        )
    return lines, identical


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="kvzap-eval sweep-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=None, help="default: the kvzap_longctx group's tasks")
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[1024])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(SWEEP_METHODS))
    parser.add_argument("--thresholds", nargs="+", type=finite_float, default=None, help="default: the surrogate's")
    parser.add_argument("--ratios", nargs="+", type=finite_float, default=None)
    parser.add_argument("--limit", type=positive_int, default=20, help="samples per task and length")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--pretrained", default=None, help="model (default: the embedded SmolLM2)")
    parser.add_argument("--include-path", default="tasks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--model-args", default="", help="method settings for every run, as for kvzap-eval sweep")
    parser.add_argument("--out-dir", type=Path, default=None, help="where both tables go (default: a temporary one)")
    args = parser.parse_args(argv)
    settings = {**sweep_settings(args), "tasks": args.tasks or suite_tasks(args.include_path)}
    with tempfile.TemporaryDirectory(prefix="kvzap-sweep-bench-") as scratch:
        out_dir = args.out_dir or Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        lines, identical = summary(bench(settings, out_dir), settings)
    print("\n".join(lines))
    if not identical:
        print("error: the engines' rows differ (see MISMATCH above)", file=sys.stderr)
    return 0 if identical else 1
