"""`kvzap-eval sweep --workers N`: one sweep split over N processes on this machine, then joined.

The workers take whole (task, length) groups one at a time from a shared queue, the groups with the most runs
left first (a fixed `--shard i/N` split could leave one worker alone with the last groups while the other idled),
so a fixed-ratio run finds its KVzap reference in its own worker. Each worker runs in a spawned process with its
share of the CPU threads, loads the model once, and writes its own table beside `--output`
(`<output>.worker-i.jsonl`, its log `<output>.worker-i.log`). A worker's table starts as a copy of `--output`, so
the runs already there are skipped. When the workers end, their tables are merged into `--output` (`merge_tables`:
one row per run) and removed; a worker that failed leaves its log and is named in one error line, after the rows
that did finish were merged. The rows are the same as one process's: the same runs, each computed as `--engine`
computes it. Worker tables left by a sweep that was killed before it could merge them
(its process or its machine gone) are merged into `--output` by the next `kvzap-eval sweep` on it
(`recover_worker_tables`) before anything else, so a rerun resumes after every run any worker finished.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
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
    """Run `config` in `workers` parallel processes (its (task, length) groups shared out from a queue) and merge
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
    groups = context.Queue()
    for group in groups_to_run(runs, done, identity):
        groups.put(group)
    for _ in range(workers):
        groups.put(None)  # one "no more groups" for each worker
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
            target=_work, args=(replace(config, output=table), log, threads, progress, groups),
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


def groups_to_run(runs: list[Run], done: set[str], identity) -> list[tuple[str, int]]:
    """The (task, length) groups with runs not in the table, those with the most runs left first (in plan order
    among equals): the long groups start first, so the last ones to end are short."""
    left = Counter((run.task, run.length) for run in runs if row_key(run, identity) not in done)
    return sorted(left, key=lambda group: -left[group])


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


def _work(config: SweepConfig, log: Path, threads: int, progress: Path, groups) -> None:
    """One worker: (task, length) groups from the `groups` queue until it says None, one model for all of them; its
    output in its log, its work in flight in `progress`."""
    with open(log, "w", buffering=1) as stream:
        os.dup2(stream.fileno(), sys.stdout.fileno())
        os.dup2(stream.fileno(), sys.stderr.fileno())
        import torch

        torch.set_num_threads(threads)
        from .sweep import execute

        runs, lm = plan(config), None
        while (group := groups.get()) is not None:
            mine = [run for run in runs if (run.task, run.length) == tuple(group)]
            lm = execute(config, mine, lambda n: write_text_atomic(progress, f"{n:.4f}"), lm).lm or lm
