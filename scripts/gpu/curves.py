"""Many `kvzap-eval sweep` processes sharing one GPU, most important runs first, stopped at a time budget.

The work is a list of units in priority order, each one `kvzap-eval sweep` of one (task, length) and a few methods
into a table of its own (tables/<table>/<unit>.jsonl). `--workers` processes each claim the next unclaimed unit (a
claim file made with O_EXCL), run it in-process (the imports are paid once per worker) and go on; a unit that fails
(e.g. out of GPU memory) is logged and given back once for a later attempt, the worker pausing before its next
claim. At the budget every worker is interrupted; the rows of the runs a unit finished are kept
(a sweep appends each run's row when it is done), the unit's other runs are lost. Then each table's units are merged
(`kvzap-eval merge`) into <out>/<table>.jsonl, and units.jsonl says what each unit did and how long it took.

Used by scripts/gpu/curves.sh for reports/accuracy-curves (issue 15) and the old-vs-new surrogate comparison at 2k
(issue 16); `--dry-run` prints the units.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from kvzap_eval.evaluation.suite import suite_tasks

TASKS = suite_tasks(Path(__file__).resolve().parents[2] / "tasks")
TAUS = ["-5", "-4", "-3", "-2", "-1", "0"]  # KVzap and the KVzip+ oracle under the threshold policy
RATIOS = ["0.5", "0.6", "0.7", "0.8", "0.9"]  # the fixed-ratio methods' own grid
ON_CPU_1K = {"-4", "-3", "-2"}  # full and these taus at 1k, n = 100: reports/surrogates-1k (new.jsonl, old.jsonl)
OLD_TAUS = ["-4", "-3", "-2"]  # the old surrogate at 2k: the taus compared at 1k
MAX_ATTEMPTS = 2  # a failed unit is given back once
FAILURE_PAUSE = 15.0  # seconds a worker waits after a failure before it claims again


def units(old_surrogate: str, lengths: list[int]) -> list[dict]:
    """(name, table, sweep arguments) in priority order: the 2k backbone and the old surrogate (issue 16) first."""
    out: list[dict] = []

    def add(tier: str, length: int, methods: list[str], extra: list[str], table: str = "curves") -> None:
        for task in TASKS:
            name = f"{tier}-{length}-{task.removeprefix('kvzap_')}"
            args = ["--tasks", task, "--lengths", str(length), "--methods", *methods, *extra]
            out.append({"name": name, "table": table, "args": args})

    taus_1k = [t for t in TAUS if t not in ON_CPU_1K]
    if 2048 in lengths:
        add("mlp", 2048, ["full", "kvzap_mlp"], ["--thresholds", *TAUS])
        add("old", 2048, ["kvzap_mlp"], ["--thresholds", *OLD_TAUS, "--model-args", f"surrogate={old_surrogate}"],
            table="old-2k")  # fmt: skip
    if 1024 in lengths:
        add("mlp", 1024, ["kvzap_mlp"], ["--thresholds", *taus_1k])
    for length in lengths:
        add("rand", length, ["random", "streaming"], ["--ratios", *RATIOS])
    for length in lengths:
        add("lin", length, ["kvzap_linear"], ["--thresholds", *TAUS])
    for length in lengths:
        add("zip", length, ["kvzip_plus_threshold", "kvzip_plus"], ["--thresholds", *TAUS, "--ratios", *RATIOS])
    for length in lengths:
        add("ada", length, ["snapkv", "kvzap_adakv"], ["--ratios", *RATIOS])
    return out


def worker(index: int, tables: Path, plan: list[dict], common: list[str]) -> None:
    from kvzap_eval.evaluation.sweep import main as sweep

    claims = tables / "claims"
    while True:
        unit = _claim(claims, plan)
        if unit is None:
            return
        table = tables / unit["table"] / f"{unit['name']}.jsonl"
        start = time.time()
        status = "done"
        print(f"[worker {index}] {unit['name']} starts", flush=True)
        try:
            sweep([*unit["args"], *common, "--output", str(table)])
        except KeyboardInterrupt:
            status = "stopped"
        except BaseException:  # noqa: BLE001 - one unit's failure must not stop the others
            traceback.print_exc()
            status = "failed"
        with open(tables / "units.jsonl", "a") as log:
            log.write(json.dumps({"unit": unit["name"], "worker": index, "status": status,
                                  "seconds": round(time.time() - start, 1)}) + "\n")  # fmt: skip
        _release_gpu_memory()
        if status == "stopped":
            return
        if status == "failed":  # e.g. out of GPU memory while others held it: give the unit back, wait, go on
            failures = claims / f"{unit['name']}.failed"
            count = int(failures.read_text()) + 1 if failures.exists() else 1
            failures.write_text(str(count))
            if count < MAX_ATTEMPTS:
                (claims / unit["name"]).unlink()
            time.sleep(FAILURE_PAUSE)


def _release_gpu_memory() -> None:
    """Hand the unit's cached GPU memory back, for the other workers."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _claim(claims: Path, plan: list[dict]) -> dict | None:
    """The first unit nobody has claimed, now claimed by this worker (O_EXCL: one worker wins); None when none is
    left."""
    for unit in plan:
        try:
            os.close(os.open(claims / unit["name"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return unit
    return None


def rows(path: Path) -> int:
    return sum(sum(1 for _ in p.open()) for p in path.rglob("*.jsonl") if p.name != "units.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=Path, required=True, help="working folder (kept between reruns)")
    parser.add_argument("--out", type=Path, required=True, help="where the merged tables go")
    parser.add_argument("--old-surrogate", required=True)
    parser.add_argument("--budget", type=float, default=450.0, help="seconds until the workers are interrupted")
    # One H200 (2026-12-04): 14 workers at batch 34 ran out of its 139 GiB; a 2k process held 14-16.6 GiB (fp32 dense
    # cache, the method's derived cache, prefill activations, allocator slack), so about 0.22 MiB per context token.
    # 14 x 16 x ~2,150 tokens x 0.22 MiB is about 105 GiB.
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--limit", default="100")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 1024])
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    plan = units(args.old_surrogate, args.lengths)
    common = ["--limit", args.limit, "--batch-size", args.batch_size, "--device", args.device]
    if args.dry_run:
        for unit in plan:
            print(unit["table"], unit["name"], " ".join(unit["args"]))
        print(f"{len(plan)} units")
        return 0
    if args.worker is not None:
        worker(args.worker, args.tables, plan, common)
        return 0
    shutil.rmtree(args.tables / "claims", ignore_errors=True)  # claims hold within one run; the tables resume
    for folder in ("claims", "logs", *{unit["table"] for unit in plan}):
        (args.tables / folder).mkdir(parents=True, exist_ok=True)
    start = time.time()
    procs = []
    for index in range(args.workers):
        log = open(args.tables / "logs" / f"worker{index}.log", "a")
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", str(index)]
        procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    while any(p.poll() is None for p in procs) and time.time() - start < args.budget:
        time.sleep(5)
        if int(time.time() - start) % 30 < 5:
            claimed = sum(1 for p in (args.tables / "claims").iterdir() if not p.suffix)
            print(f"{time.time() - start:.0f} s: {claimed}/{len(plan)} units claimed, {rows(args.tables)} runs done",
                  flush=True)  # fmt: skip
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.time() + 15
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    from kvzap_eval.evaluation.sweep import merge_tables

    args.out.mkdir(parents=True, exist_ok=True)
    for table in sorted({unit["table"] for unit in plan}):
        parts = sorted((args.tables / table).glob("*.jsonl"))
        if parts:
            total, _ = merge_tables(args.out / f"{table}-gpu.jsonl", parts)
            print(f"{table}: {total} runs merged into {args.out / f'{table}-gpu.jsonl'}")
    print(f"curves sweep: {time.time() - start:.0f} s, {rows(args.tables)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
