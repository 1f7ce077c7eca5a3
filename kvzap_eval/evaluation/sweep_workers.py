"""`kvzap-eval sweep --workers N`: one sweep split over N processes on this machine, then joined.

The workers take units of work one at a time from a shared queue, the largest first (a fixed `--shard i/N` split
could leave one worker alone with the last groups while the other idled). A unit is a whole (task, length) group,
whose runs share one prefill per context; when there are fewer groups than workers, each group is cut into as many
units as it takes to give every worker one (each its own prefill: more work in all, less wall time than one worker
alone), and a fixed-ratio run stays in the unit of the KVzap run whose achieved ratio it needs (`units_to_run`).
Each worker runs in a spawned process with its share of the CPU threads, loads the model once, and writes its own
table beside `--output` (`<output>.worker-i.jsonl`, its log `<output>.worker-i.log`). A worker's table starts as a
copy of `--output`, so the runs already there are skipped. When the workers end, their tables are merged into
`--output` (`merge_tables`: one row per run) and removed; a worker that failed leaves its log and is named in one
error line, after the rows that did finish were merged. The rows are the same as one process's: the same runs, each
computed as `--engine` computes it. Worker tables left by a sweep that was killed before it could merge them (its
process or its machine gone) are merged into `--output` by the next `kvzap-eval sweep` on it
(`recover_worker_tables`) before anything else, so a rerun resumes after every run any worker finished.
"""

from __future__ import annotations

import glob
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from ..atomic import write_text_atomic
from ..errors import ConfigError
from .sweep import Run, Shard, SweepConfig, identify, merge_tables, plan, refuse_other_identities, row_key
from .table import read_table


def _worker_file(output: Path, index: int | str, suffix: str) -> Path:
    """`<output>.worker-<index>.<suffix>`: the one naming rule of a worker's files (index "*": a glob pattern)."""
    return output.with_name(f"{output.name}.worker-{index}.{suffix}")


def worker_paths(output: Path, index: int) -> tuple[Path, Path]:
    """Worker `index`'s table and log, beside the sweep's table."""
    return _worker_file(output, index, "jsonl"), _worker_file(output, index, "log")


def progress_path(output: Path, index: int) -> Path:
    """Where worker `index` keeps the runs' worth of work it has done and not yet written (`run_sweep`'s
    `progress`), one number, for the parent's progress bar."""
    return _worker_file(output, index, "progress")


def recover_worker_tables(output: Path) -> int:
    """Merge into `output` the worker tables an interrupted `--workers` sweep left beside it (any worker count);
    returns the rows this added. The tables stay (they may be a live sweep's; `run_with_workers` replaces them and
    removes them when it ends); merging them again adds nothing. A torn last line is left out."""
    pattern = _worker_file(Path(glob.escape(str(output))), "*", "jsonl")
    tables = sorted(Path(path) for path in glob.glob(str(pattern)))
    return merge_tables(output, tables)[1] if tables else 0


def run_with_workers(config: SweepConfig, workers: int, threads: int | None = None) -> list[dict]:
    """Run `config` in `workers` parallel processes (its runs shared out from a queue, `units_to_run`) and merge
    their tables into `config.output`; returns its rows. `threads`: torch threads per worker (default: this
    machine's CPUs shared out, at least 1)."""
    if workers < 2:
        raise ConfigError(f"--workers {workers}: give 2 or more (or leave it out for one process)")
    if config.shard != Shard():
        raise ConfigError("--workers shares the sweep's (task, length) groups out itself: leave out --shard")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    recover_worker_tables(config.output)
    runs = plan(config)
    identity = identify(config)  # the checks a worker would make, made once before any process starts
    existing = read_table(config.output)
    refuse_other_identities(config.output, existing, runs, identity)
    done = {row["key"] for row in existing}
    todo = sum(1 for run in runs if row_key(run, identity) not in done)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for unit in units_to_run(runs, done, identity, workers):
        queue.put(unit)
    for _ in range(workers):
        queue.put(None)  # one "no more units" for each worker
    processes = []
    for index in range(workers):
        table, log = worker_paths(config.output, index)
        if config.output.exists():
            shutil.copyfile(config.output, table)
        else:
            table.unlink(missing_ok=True)
        progress = progress_path(config.output, index)
        progress.unlink(missing_ok=True)
        process = context.Process(
            target=_work, args=(replace(config, output=table), log, threads, progress, queue),
            name=f"kvzap-sweep-worker-{index}",
        )  # fmt: skip
        process.start()
        processes.append(process)
    try:
        _follow(processes, config, workers, len(done), todo)
    except BaseException:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        _join(config, workers)
        raise
    _join(config, workers)
    failed = [(index, p.exitcode) for index, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        index, code = failed[0]
        raise ConfigError(
            f"sweep worker {index} failed (exit code {code}; {len(failed)} of {workers} failed): see"
            f" {worker_paths(config.output, index)[1]}; the runs that finished are in {config.output}, and the same"
            " command resumes after them"
        )
    for index in range(workers):
        worker_paths(config.output, index)[1].unlink(missing_ok=True)
    return read_table(config.output)


def units_to_run(runs: list[Run], done: set[str], identity, workers: int) -> list[tuple[str, ...]]:
    """The units of work the workers draw from the queue, largest first (in plan order among equals), each the
    keys of the runs it evaluates: the (task, length) groups with runs not in the table, whole while there are at
    least `workers` of them (their runs share a prefill per context), else each cut into `ceil(workers / groups)`
    units of about equal run counts, so that no worker waits with nothing to do. A run matched to a KVzap run
    that is not in the table goes with it (it needs that run's achieved ratio)."""
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        if row_key(run, identity) not in done:
            groups.setdefault((run.task, run.length), []).append(run)
    parts = 1 if len(groups) >= workers else math.ceil(workers / max(1, len(groups)))
    units = [unit for group in groups.values() for unit in _cut(group, parts, done, identity)]
    return sorted(units, key=lambda unit: -len(unit))


def _cut(group: list[Run], parts: int, done: set[str], identity) -> list[tuple[str, ...]]:
    """`group`'s runs in at most `parts` units of about equal size (largest families first, each to the smallest
    unit), a family being a KVzap run and the runs matched to its ratio, or any other run alone."""
    families: dict[str, list[Run]] = {}
    for run in group:
        reference = run.reference()
        pending = reference is not None and row_key(reference, identity) not in done
        families.setdefault(reference.key if pending else run.key, []).append(run)
    units: list[list[Run]] = [[] for _ in range(min(parts, len(families)))]
    for family in sorted(families.values(), key=len, reverse=True):
        min(units, key=len).extend(family)
    order = {run.key: index for index, run in enumerate(group)}  # plan order: a KVzap run before its matched runs
    return [tuple(run.key for run in sorted(unit, key=lambda run: order[run.key])) for unit in units]


def _follow(processes, config: SweepConfig, workers: int, before: int, todo: int) -> None:
    """A progress bar over the runs the workers finish, until every worker has ended."""
    with tqdm(total=todo, desc=f"sweep ({workers} workers)", unit="run", bar_format=_BAR) as bar:
        while any(process.is_alive() for process in processes):
            time.sleep(1.0)
            finished = sum(_rows(worker_paths(config.output, i)[0]) - before for i in range(workers))
            in_flight = sum(_in_flight(progress_path(config.output, i)) for i in range(workers))
            bar.n = min(todo, max(bar.n, finished + in_flight))  # runs written, and the parts of runs computed
            bar.refresh()
        for process in processes:
            process.join()


#: tqdm's default bar with the runs done shown to one decimal (a pass's runs advance together, context by context)
_BAR = "{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _rows(table: Path) -> int:
    return len(read_table(table)) if table.exists() else 0


def _in_flight(path: Path) -> float:
    """A worker's runs' worth of work done and not yet written; 0 when it has not said (or is mid-write)."""
    try:
        return max(0.0, float(path.read_text()))
    except (OSError, ValueError):
        return 0.0


def _join(config: SweepConfig, workers: int) -> None:
    """Merge the workers' tables into the sweep's table and remove them."""
    tables = [worker_paths(config.output, index)[0] for index in range(workers)]
    present = [table for table in tables if table.exists()]
    if present:
        merge_tables(config.output, present)
    for index, table in enumerate(tables):
        table.unlink(missing_ok=True)
        progress_path(config.output, index).unlink(missing_ok=True)


def _work(config: SweepConfig, log: Path, threads: int, progress: Path, queue) -> None:
    """One worker: units of runs (their keys) from the `queue` until it says None, one model for all of them; its
    output in its log, its work in flight in `progress`."""
    with open(log, "w", buffering=1) as stream:
        os.dup2(stream.fileno(), sys.stdout.fileno())
        os.dup2(stream.fileno(), sys.stderr.fileno())
        import torch

        torch.set_num_threads(threads)
        from .sweep import execute

        runs, lm = plan(config), None
        while (unit := queue.get()) is not None:
            mine = [run for run in runs if run.key in unit]
            lm = execute(config, mine, lambda n: write_text_atomic(progress, f"{n:.4f}"), lm).lm or lm
