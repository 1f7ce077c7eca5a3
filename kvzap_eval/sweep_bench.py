"""`kvzap-eval sweep-bench`: the same sweep with both engines, one after the other in one process; prints both wall
times, their ratio, whether every row is identical, and where the shared-prefill engine's model time went.

    kvzap-eval sweep-bench --limit 20        # 8 method settings x 9 tasks x 20 samples at 1k (about an hour on CPU)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .cli_args import OneLineParser, finite_float, positive_int
from .sweep import ENGINES, SWEEP_METHODS, SweepConfig, execute, parse_model_args

LONGCTX_TASKS = ["kvzap_niah_single_repeat", "kvzap_niah_single_essay", "kvzap_niah_multikey", "kvzap_niah_multivalue",
                 "kvzap_niah_multiquery", "kvzap_vt", "kvzap_cwe", "kvzap_kv", "kvzap_qa"]  # fmt: skip
#: With one tau: full, three threshold methods and four matched to KVzap's ratio = 8 method settings.
DEFAULT_METHODS = ["full", "kvzap_mlp", "kvzap_linear", "kvzip_plus_threshold", "random", "streaming", "snapkv",
                   "kvzip_plus"]  # fmt: skip
#: What must agree between the engines' rows (the key holds the run and its identity).
FIGURES = ("key", "accuracy", "n", "compression_ratio", "kv_bytes_fraction", "setting_ratio", "identity")


@dataclass
class EngineRun:
    engine: str
    seconds: float
    rows: dict[str, tuple]
    work: object = None  # the shared-prefill engine's `EngineWork`


def bench(settings: dict, out_dir: Path) -> list[EngineRun]:
    """Sweep `settings` (SweepConfig fields) into a fresh table per engine, per-method first; both timed."""
    results = []
    for engine in reversed(ENGINES):  # per-method, then shared-prefill
        output = out_dir / f"{engine}.jsonl"
        if output.exists():
            output.unlink()
        start = time.perf_counter()
        state = execute(SweepConfig(output=output, engine=engine, **settings))
        seconds = time.perf_counter() - start
        rows = {row["key"]: tuple(json.dumps(row[name], sort_keys=True) for name in FIGURES) for row in
                state.done.values()}  # fmt: skip
        results.append(EngineRun(engine, seconds, rows, getattr(state.lm, "work", None)))
    return results


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
    parser.add_argument("--tasks", nargs="+", default=LONGCTX_TASKS)
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
    settings = dict(
        tasks=args.tasks,
        lengths=args.lengths,
        methods=args.methods,
        thresholds=args.thresholds,
        ratios=args.ratios,
        limit=args.limit,
        batch_size=args.batch_size,
        pretrained=args.pretrained,
        include_path=args.include_path,
        device=args.device,
        apply_chat_template=not args.no_chat_template,
        model_args=parse_model_args(args.model_args),
    )
    with tempfile.TemporaryDirectory(prefix="kvzap-sweep-bench-") as scratch:
        out_dir = args.out_dir or Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        lines, identical = summary(bench(settings, out_dir), settings)
    print("\n".join(lines))
    if not identical:
        print("error: the engines' rows differ (see MISMATCH above)", file=sys.stderr)
    return 0 if identical else 1
