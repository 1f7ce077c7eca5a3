"""`kvzap-eval sweep`: methods x settings x tasks x context lengths through lm-eval, one row per run in a JSONL table.

The model is loaded once; each run switches the method and evaluates one (task, length). KVzap runs first, so the
fixed-ratio methods can be run at the ratio KVzap achieved on the same (task, length): every comparison is at
equal compression. With `--ratios` they also run on their own grid of compression ratios, so their curves do not
depend on KVzap's. Two engines give the same rows: `shared-prefill` (default, `sweep_engine.py`) prefills each
context once for all the runs of a (task, length) that can share it and derives every method's pruned cache from
that one forward; `per-method` evaluates each run on its own.

Rows are appended and fsync'ed one by one, whole lines only (`table.py`); a rerun skips the rows already in the
table, so an interrupted sweep loses nothing it finished. Each row carries its run identity (model,
surrogate, limit, settings, task version: `run_identity.py`), hashed into its key: a table holds one configuration,
and a sweep into a table of another is refused, naming the field that differs.

Beyond one process: under `accelerate launch` every run's requests are split over the ranks (rank 0 writes the
rows); `--shard i/n` evaluates only every n-th (task, length) group of the run list, so n machines can each take a
shard into their own table, and `kvzap-eval merge` joins the tables without losing or duplicating rows; on one
machine `--workers n` does both (`sweep_workers.py`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..cli_args import OneLineParser, check_device, check_writable_file, finite_float, positive_int
from ..errors import ConfigError
from ..runtime.methods import FIXED_RATIO_METHODS, MethodConfig, default_threshold
from ..settings import validate_ratio, validate_threshold
from .model_args import OWN_ARGS, coerce
from .run_identity import DTYPE, PROTOCOL, SweepIdentity, digest, sweep_identity, task_infos
from .table import (
    TableError,
    append_row,
    check_row,
    identity_conflict,
    read_table,
    repair_table,
    scan_table,
    write_table,
)

#: Sweep method names -> MethodConfig settings. Threshold methods take taus, the others KVzap's achieved ratios.
SWEEP_METHODS = {
    "full": {"method": "full"},
    "kvzap_mlp": {"method": "kvzap", "model_type": "mlp"},
    "kvzap_linear": {"method": "kvzap", "model_type": "linear"},
    "kvzap_adakv": {"method": "kvzap_adakv", "model_type": "mlp"},
    "random": {"method": "random"},
    "streaming": {"method": "streaming"},
    "snapkv": {"method": "snapkv"},
    "kvzip_plus": {"method": "kvzip_plus"},  # the oracle at KVzap's ratio, AdaKV policy (as kvzap_adakv)
    "kvzip_plus_threshold": {"method": "kvzip_plus"},  # the oracle's own scores under KVzap's threshold policy
}
THRESHOLD_METHODS = ("kvzap_mlp", "kvzap_linear", "kvzip_plus_threshold")
#: Sweep methods run at the compression ratio KVzap-MLP achieved on the same task and length (and on `--ratios`).
MATCHED_METHODS = tuple(m for m, s in SWEEP_METHODS.items() if s["method"] in FIXED_RATIO_METHODS) + ("kvzip_plus",)
REFERENCE = "kvzap_mlp"  # the method whose achieved ratios the fixed-ratio methods are matched to
#: How runs are evaluated (the rows are the same): one prefill per context for many runs, or each run on its own.
ENGINES = ("shared-prefill", "per-method")


@dataclass(frozen=True)
class Run:
    """One evaluation: a method at one setting on one task at one context length."""

    method: str
    task: str
    length: int
    threshold: float | None = None
    matched_threshold: float | None = None  # fixed-ratio methods: the KVzap tau whose achieved ratio they use
    ratio: float | None = None  # fixed-ratio methods on their own grid: the compression ratio they are set to

    @property
    def key(self) -> str:
        """method|setting|task|length: the run within one configuration (rows' keys add the identity's hash)."""
        if self.ratio is not None:
            return f"{self.method}|ratio={self.ratio}|{self.task}|{self.length}"
        setting = self.threshold if self.threshold is not None else self.matched_threshold
        return f"{self.method}|{setting}|{self.task}|{self.length}"

    @property
    def surrogate_type(self) -> str | None:
        """The KVzap surrogate this run's result depends on: its own (KVzap methods), its reference's (methods
        matched to KVzap's ratio), or none."""
        settings = SWEEP_METHODS[self.method]
        if settings["method"].startswith("kvzap"):
            return settings["model_type"]
        return SWEEP_METHODS[REFERENCE]["model_type"] if self.matched_threshold is not None else None

    def reference(self) -> Run | None:
        """The KVzap run whose achieved ratio this fixed-ratio run uses."""
        if self.matched_threshold is None:
            return None
        return Run(REFERENCE, self.task, self.length, threshold=self.matched_threshold)


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count): the (task, length) groups whose position % count == index.

    A whole group stays in one shard, so the fixed-ratio runs find their KVzap reference in their own table.
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {text!r} must be i/n, e.g. --shard 0/2 and --shard 1/2") from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"--shard {text!r}: need 0 <= i < n, e.g. --shard 0/{max(count, 2)}")
        return cls(index, count)

    def select(self, runs: list[Run]) -> list[Run]:
        groups = list(dict.fromkeys((run.task, run.length) for run in runs))
        mine = {group for position, group in enumerate(groups) if position % self.count == self.index}
        if groups and not mine:
            print(
                f"warning: shard {self.index}/{self.count} holds none of the {len(groups)} (task, length) groups:"
                " nothing to run (give fewer shards than groups)",
                file=sys.stderr,
            )
        return [run for run in runs if (run.task, run.length) in mine]


@dataclass
class SweepConfig:
    output: Path
    tasks: list[str]
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    methods: list[str] = field(default_factory=lambda: ["full", "kvzap_mlp", "random", "streaming"])
    thresholds: list[float] | None = None  # None: the tau recommended for the model's MLP surrogate
    ratios: list[float] | None = None  # fixed-ratio methods' own grid (besides KVzap's achieved ratios)
    limit: int | None = None
    include_path: str = "tasks"
    pretrained: str | None = None
    batch_size: int = 1
    device: str = "cpu"
    apply_chat_template: bool = True
    model_args: dict = field(default_factory=dict)
    shard: Shard = field(default_factory=Shard)
    engine: str = ENGINES[0]

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        check_writable_file(self.output, "--output")
        self.tasks, self.lengths, self.methods = _unique(self.tasks), _unique(self.lengths), _unique(self.methods)
        self._check_counts()
        check_device(self.device)
        if self.thresholds is None:
            self.thresholds = [_default_threshold(self.pretrained, self.model_args.get("surrogate"))]
        self.thresholds = _unique([validate_threshold(t) for t in self.thresholds])
        if not self.thresholds:
            raise ConfigError("--thresholds is empty: give at least one KVzap tau, e.g. -4")
        unknown = [m for m in self.methods if m not in SWEEP_METHODS]
        if unknown:
            raise ConfigError(f"unknown sweep method(s) {unknown}: choose among {', '.join(SWEEP_METHODS)}")
        self._check_ratios()
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")

    def _check_ratios(self) -> None:
        """`--ratios` values in [0, 1) for a method that takes them; fixed-ratio methods without a grid need KVzap."""
        matched = [m for m in self.methods if m in MATCHED_METHODS]
        if self.ratios is not None:
            if not self.ratios:
                raise ConfigError("--ratios is empty: give compression ratios in [0, 1), e.g. --ratios 0.5 0.75 0.9")
            self.ratios = _unique([validate_ratio(r) for r in self.ratios])
            if not matched:
                raise ConfigError(f"--ratios applies to {', '.join(MATCHED_METHODS)}: add one of them to --methods")
        elif matched and REFERENCE not in self.methods:
            raise ConfigError(
                f"fixed-ratio methods are matched to {REFERENCE}'s achieved ratios: add {REFERENCE}, or give them their"
                " own --ratios"
            )

    def _check_counts(self) -> None:
        """Tasks, lengths and methods given; lengths, limit and batch size whole numbers >= 1."""
        for option, values in (("--tasks", self.tasks), ("--lengths", self.lengths), ("--methods", self.methods)):
            if not values:
                raise ConfigError(f"{option} is empty: give at least one")
        counts = [("--lengths", n) for n in self.lengths] + [("--limit", self.limit), ("--batch-size", self.batch_size)]
        for option, value in counts:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{option} must be a whole number >= 1, got {value!r}")


def _unique(values: Iterable) -> list:
    """`values` in order, each once (a repeated task, length or method would only repeat a row's key)."""
    return list(dict.fromkeys(values))


def _default_threshold(pretrained: str | None, surrogate: str | None) -> float:
    """The tau that `kvzap_hf` uses by default for this model: its MLP surrogate's recommended one, else -4."""
    from ..llm.embedded import resolve_pretrained
    from ..surrogate import surrogate_source_for

    return default_threshold(surrogate_source_for(resolve_pretrained(pretrained), surrogate, "mlp"))


def plan(config: SweepConfig) -> list[Run]:
    """The runs of this shard: those with a setting of their own first (threshold, full, `--ratios`), then those
    matched to KVzap's achieved ratios (they need KVzap's rows)."""
    runs = []
    for task in config.tasks:
        for length in config.lengths:
            for method in config.methods:
                if method in THRESHOLD_METHODS:
                    runs += [Run(method, task, length, threshold=t) for t in config.thresholds]
                elif method == "full":
                    runs.append(Run(method, task, length))
                elif method in MATCHED_METHODS:
                    runs += [Run(method, task, length, ratio=r) for r in config.ratios or ()]
    if REFERENCE in config.methods:
        for task in config.tasks:
            for length in config.lengths:
                for method in config.methods:
                    if method in MATCHED_METHODS:
                        runs += [Run(method, task, length, matched_threshold=t) for t in config.thresholds]
    return config.shard.select(runs)


def merge_tables(output: Path, inputs: list[Path], allow_mixed: bool = False) -> tuple[int, int]:
    """Join sweep tables into `output` (kept, then extended): one row per run key, written atomically.

    Returns (rows in the merged table, rows added). The same key with different figures in two tables is an error:
    it means two different runs were given one name. Tables whose runs differ in identity (model, surrogate,
    limit, ...) are refused unless `allow_mixed` (then `kvzap-eval report` reports each identity on its own).
    A torn or malformed line of an input is left out with a warning (the input is not changed); one of `output` is
    moved to `<output>.torn`.
    """
    output = Path(output)
    check_writable_file(output, "--output")
    tables = [(Path(path), _merge_input(Path(path))) for path in inputs]
    merged = {row["key"]: row for row in _checked(output, repair_table(output))}
    before = len(merged)
    for path, rows in tables:
        if not allow_mixed:
            _refuse_mixed_merge(path, list(merged.values()), rows, output)
        for row in rows:
            known = merged.get(row["key"])
            if known is None:
                merged[row["key"]] = row
            elif _figures(known) != _figures(row):
                raise ConfigError(
                    f"run {row['key']} has different results in {path} and an earlier table: rerun one of them"
                )
    write_table(output, merged.values())
    return len(merged), len(merged) - before


def _checked(path: Path, rows: list[dict]) -> list[dict]:
    return [check_row(row, f"{path} row {number}") for number, row in enumerate(rows, 1)]


def _merge_input(path: Path) -> list[dict]:
    """The whole rows of a table to merge; a line that holds none is left out with a warning."""
    if not path.exists():
        raise ConfigError(f"no sweep table at {path}: give the JSONL files the shards wrote")
    scan = scan_table(path)
    for line in scan.damaged:
        shown = line.fragment if len(line.fragment) <= 60 else line.fragment[:57] + "..."
        print(f"warning: {path} line {line.number} is not a JSON row ({shown!r}): left out", file=sys.stderr)
    return [check_row(line.row, f"{path} line {line.number}") for line in scan.lines if line.row is not None]


def _refuse_mixed_merge(path: Path, earlier: list[dict], rows: list[dict], output: Path) -> None:
    conflict = identity_conflict(earlier or rows, rows)
    if conflict is None:
        return
    where = f"{output} and the tables before it" if earlier else "its own rows"
    if conflict.legacy:
        detail = f"{path} and {where}: some rows carry no run identity (written by an older kvzap-eval), others do"
    else:
        field = conflict.field
        detail = f"{path} holds runs with {field}={conflict.theirs}, {where} with {field}={conflict.ours}"
    raise TableError(
        f"{detail}: these are different runs; join them on purpose with --allow-mixed (the report then has one"
        " report per identity), or keep them in separate tables"
    )


def _figures(row: dict) -> tuple:
    return tuple(row.get(name) for name in ("accuracy", "n", "compression_ratio", "kv_bytes_fraction", "setting_ratio"))


def accuracy_of(task_results: dict, length: int) -> float:
    """The task's accuracy at `length`: the per-length RULER-style metric, else the first non-stat metric."""
    for key, value in task_results.items():
        if key.split(",")[0] == str(length) and isinstance(value, (int, float)):
            return float(value)
    for key, value in task_results.items():
        name = key.split(",")[0]
        if isinstance(value, (int, float)) and "stderr" not in name and name not in ("kv_compression", "sample_len"):
            return float(value)
    raise ConfigError(f"no accuracy metric in the results of this run: {sorted(task_results)}")


def method_config(run: Run, done: dict[str, dict], model_args: dict) -> MethodConfig:
    """The run's settings: its method's, its tau or matched ratio, and of the shared `model_args` those its method
    takes (`methods.applicable`: e.g. `window` goes to kvzap and the KVzip+ threshold oracle, not to random)."""
    from ..runtime.methods import applicable

    settings = dict(SWEEP_METHODS[run.method])
    if run.threshold is not None:
        settings["threshold"] = run.threshold
    if run.ratio is not None:
        settings["compression_ratio"] = run.ratio
    if run.matched_threshold is not None:
        reference = done.get(Run(REFERENCE, run.task, run.length, threshold=run.matched_threshold).key)
        if reference is None:
            raise ConfigError(f"run {run.key} needs the {REFERENCE} run at tau={run.matched_threshold} first")
        settings["compression_ratio"] = min(0.999, reference["compression_ratio"])
    return MethodConfig(**applicable(settings["method"], {**model_args, **settings}))


def identify(config: SweepConfig) -> SweepIdentity:
    """The identity builder of a sweep: checks its tasks, lengths, model and surrogate before any model is loaded."""
    from ..llm.embedded import resolve_pretrained

    tasks = task_infos(config.tasks, config.lengths, config.include_path)
    return sweep_identity(
        resolve_pretrained(config.pretrained), config.model_args, config.limit, config.apply_chat_template, tasks
    )


def run_identity(run: Run, identity: SweepIdentity) -> dict:
    return identity.of(run.method, run.task, run.surrogate_type)


def row_key(run: Run, identity: SweepIdentity) -> str:
    """A row's key: the run's, then the hash of its identity (so another model or limit is another run)."""
    return f"{run.key}|{digest(run_identity(run, identity))}"


def refuse_other_identities(output: Path, rows: list[dict], runs: list[Run], identity: SweepIdentity) -> None:
    """A one-line `TableError` when the table's rows were run with another identity than this sweep's runs."""
    ours = [{"task": run.task, "identity": run_identity(run, identity)} for run in runs]
    conflict = identity_conflict(ours, rows)
    if conflict is None:
        return
    if conflict.legacy:
        raise TableError(
            f"{output} holds rows without a run identity (written by an older kvzap-eval), so a resumed sweep cannot"
            " tell whether they match this one: sweep into another --output (`kvzap-eval report` still reads it)"
        )
    raise TableError(
        f"{output} holds runs with {conflict.field}={conflict.theirs}, this sweep has {conflict.field}="
        f"{conflict.ours}: a table holds one configuration; sweep into another --output, or rerun with the table's"
        " settings"
    )


def run_sweep(config: SweepConfig, runs: Iterable[Run] | None = None, progress: Progress | None = None) -> list[dict]:
    """Evaluate every run not already in `config.output` with `config.engine`; returns the whole table.

    `progress(runs)`, when given, hears how many runs' worth of work is done but not yet in the table (a fraction
    of the current pass's runs, as its contexts are computed; 0 between passes): the shared-prefill engine writes
    a pass's rows only at its end, so a caller that follows the table alone would see nothing move for minutes."""
    return list(execute(config, runs, progress).done.values())


def execute(
    config: SweepConfig, runs: Iterable[Run] | None = None, progress: Progress | None = None, lm=None
) -> SweepState:
    """`run_sweep`, returning the sweep's state: the whole table (`done`) and the model it used (None when every
    run was already in the table). `lm`: a model an earlier `execute` of the same `config` loaded, used again."""
    runs = list(plan(config) if runs is None else runs)
    identity = identify(config)
    planned = {row_key(run, identity): run for run in runs}
    rows = read_table(config.output)
    refuse_other_identities(config.output, rows, runs, identity)
    done = {row["key"]: row for row in rows}
    if all(key in done for key in planned):
        return SweepState(config, identity, None, done, {})
    lm = lm if lm is not None else load_lm(config, identity.pretrained)
    if lm.rank == 0:  # the only writer: torn or malformed lines go to <table>.torn before anything is appended
        done = {row["key"]: row for row in repair_table(config.output)}
    done = _from_rank_zero(lm, done)  # under accelerate, rank 0's table decides what is left
    references = {row_key(ref, identity): ref for ref in filter(None, (run.reference() for run in runs))}
    by_run = {run.key: done[key] for key, run in {**references, **planned}.items() if key in done}
    todo = [(key, run) for key, run in planned.items() if key not in done]
    state = SweepState(config, identity, lm, done, by_run, progress=progress or _no_progress)
    with tqdm(total=len(todo), desc="sweep", unit="run", disable=lm.rank != 0) as state.bar:
        if config.engine == "per-method":
            for key, run in todo:
                lm.set_method(state.settings(run))
                state.evaluate(key, run)
        else:
            from .sweep_engine import run_shared_prefill

            run_shared_prefill(state, todo)
    return state


def load_lm(config: SweepConfig, pretrained: str):
    """The lm-eval model of a sweep (the engine's), loaded once; each run then sets its method."""
    if config.engine == "per-method":
        from .lm_eval_model import KVzapHFLM as model_class
    else:
        from .sweep_engine import SharedPrefillLM as model_class
    return model_class(
        pretrained=pretrained,
        method="full",
        device=config.device,
        batch_size=config.batch_size,
        dtype=DTYPE,
        protocol=PROTOCOL,
    )


#: `progress(runs)`: runs' worth of work done and not yet written (see `run_sweep`).
Progress = Callable[[float], None]


def _no_progress(runs: float) -> None:
    return None


@dataclass
class SweepState:
    """A sweep in progress: its configuration, the model, and the rows done (by row key, and by run key)."""

    config: SweepConfig
    identity: SweepIdentity
    lm: object  # KVzapHFLM, or the engine's subclass (None: nothing was left to evaluate)
    done: dict[str, dict]
    by_run: dict[str, dict]
    bar: object = None  # tqdm over the runs to evaluate
    progress: Progress = _no_progress  # see `run_sweep`

    def settings(self, run: Run) -> MethodConfig:
        """The run's method settings (a run matched to KVzap's ratio needs that KVzap row done)."""
        return method_config(run, self.by_run, self.config.model_args)

    def evaluate(self, key: str, run: Run, seconds=None) -> dict | None:
        """Evaluate `run` with the method the model is set to, append its row (rank 0) and return it.

        `seconds(wall)` turns the evaluation's wall time into the row's `seconds` (the engine attributes its shared
        work to the runs that share it); by default the wall time itself."""
        import lm_eval
        from lm_eval.tasks import TaskManager

        config, lm = self.config, self.lm
        manager = TaskManager(
            include_path=config.include_path,
            include_defaults=False,
            metadata={"max_seq_lengths": [run.length], "pretrained": self.identity.pretrained},
        )
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[run.task],
            task_manager=manager,
            limit=config.limit,
            bootstrap_iters=0,
            apply_chat_template=config.apply_chat_template,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        wall = time.perf_counter() - start
        row = None
        if lm.rank == 0:
            info = lm.get_model_info()["kvzap"]
            row = {
                **asdict(run),
                "key": key,
                "identity": run_identity(run, self.identity),
                "accuracy": accuracy_of(results["results"][run.task], run.length),
                "n": int(results["n-samples"][run.task]["effective"]),
                "compression_ratio": info["achieved_compression_ratio"] or 0.0,
                "kv_bytes_fraction": info["held_kv_bytes_fraction"],  # bytes allocated / a full cache's
                "setting_ratio": lm.method_config.compression_ratio,
                "seconds": seconds(wall) if seconds is not None else wall,
                "pretrained": self.identity.pretrained,
                "device": config.device,
                "batch_size": config.batch_size,
                "ranks": lm.world_size,
            }
            append_row(config.output, row)
        self.done[key] = self.by_run[run.key] = _from_rank_zero(lm, row)
        if self.bar is not None:
            self.bar.update(1)
        return self.done[key]


def _from_rank_zero(lm, value):
    """Rank 0's `value` on every rank of a data-parallel sweep (the value itself in one process)."""
    if lm.world_size <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="kvzap-eval sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="JSONL results table (appended, resumable)")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[1024, 2048])
    parser.add_argument(
        "--methods", nargs="+", default=["full", "kvzap_mlp", "random", "streaming"], choices=list(SWEEP_METHODS)
    )
    parser.add_argument(
        "--thresholds", nargs="+", type=finite_float, default=None, help="KVzap taus (default: the surrogate's)"
    )
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=finite_float,
        default=None,
        help="compression ratios in [0, 1) at which the fixed-ratio methods also run (their own grid)",
    )
    parser.add_argument("--limit", type=positive_int, default=None, help="samples per task and length")
    parser.add_argument(
        "--engine",
        default=ENGINES[0],
        choices=ENGINES,
        help="shared-prefill: one prefill per context for the runs that can share it; per-method: each run on its own"
        " (the same rows)",
    )
    parser.add_argument("--include-path", default="tasks")
    parser.add_argument("--pretrained", default=None, help="model (default: the embedded SmolLM2)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument(
        "--model-args",
        default="",
        help="method settings for every run, e.g. surrogate=DIR,window=128,backend=onnxruntime",
    )
    parser.add_argument(
        "--shard", default="0/1", help="evaluate shard i of n (i/n, 0-based) of the (task, length) groups; see merge"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="split the sweep over this many processes here (each a --shard, with its share of the CPU threads),"
        " merged into --output",
    )
    args = parser.parse_args(argv)
    from .sweep_workers import recover_worker_tables, run_with_workers

    recovered = recover_worker_tables(args.output)  # first: they are the user's rows whatever else is wrong
    if recovered:
        print(f"kept {recovered} rows an interrupted --workers sweep had left beside {args.output}")
    config = SweepConfig(output=args.output, shard=Shard.parse(args.shard), engine=args.engine, **sweep_settings(args))
    try:
        if args.workers > 1:
            rows = run_with_workers(config, args.workers)
        else:
            rows = run_sweep(config)
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        raise ConfigError(
            f"--device {config.device} ran out of memory at --batch-size {config.batch_size} with"
            f" {max(config.lengths)}-token contexts: lower --batch-size (or run fewer processes on the device); the"
            f" runs already finished are in {config.output}, and the same command resumes after them"
        ) from None
    finally:
        _leave_process_group()
    print(f"{len(rows)} rows in {config.output}")
    return 0


def sweep_settings(args) -> dict:
    """The `SweepConfig` settings that `kvzap-eval sweep` and `kvzap-eval sweep-bench` take from the same options
    (what to run, on which model and device; not where the rows go or how the work is split)."""
    return dict(
        tasks=args.tasks,
        lengths=args.lengths,
        methods=args.methods,
        thresholds=args.thresholds,
        ratios=args.ratios,
        limit=args.limit,
        include_path=args.include_path,
        pretrained=args.pretrained,
        batch_size=args.batch_size,
        device=args.device,
        apply_chat_template=not args.no_chat_template,
        model_args=parse_model_args(args.model_args),
    )


def _out_of_memory(exc: BaseException) -> bool:
    """A device (CUDA) or host allocation that failed."""
    import torch

    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if k is not None)
    return isinstance(exc, kinds) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _leave_process_group() -> None:
    """Leave the process group that lm-eval's accelerate set-up joined under `accelerate launch`: left to the
    interpreter's exit, its gloo threads can be torn down mid-flight ('terminate called without an active
    exception', the process aborts after the table was written)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parse_model_args(text: str) -> dict:
    """`name=value,...` method settings, coerced like kvzap_hf's model_args; each name once, each value given."""
    allowed = sorted(set(OWN_ARGS) - {"method", "threshold", "compression_ratio", "protocol", "prefill_chunk"})
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in allowed:
            raise ConfigError(f"--model-args {item!r}: give name=value with name one of {', '.join(allowed)}")
        if name in settings:
            raise ConfigError(f"--model-args gives {name} twice: give it once")
        if not value.strip():
            raise ConfigError(f"--model-args {item!r} has no value: give {name}=<value> or leave {name} out")
        settings[name] = coerce(name, value)
    return settings


def merge_main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="kvzap-eval merge", description="Join sweep tables (e.g. the shards of a sweep) into one, no duplicates."
    )
    parser.add_argument("--output", required=True, type=Path, help="merged JSONL table (kept and extended)")
    parser.add_argument("tables", nargs="+", type=Path, help="JSONL tables written by kvzap-eval sweep")
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="join tables whose runs differ in identity (model, surrogate, limit, ...) on purpose",
    )
    args = parser.parse_args(argv)
    total, added = merge_tables(args.output, args.tables, allow_mixed=args.allow_mixed)
    print(f"{total} rows in {args.output} ({added} added)")
    return 0


def __getattr__(name: str):
    # sweep.recommended_threshold(pretrained, surrogate) shared its name with surrogate.report's: now private.
    if name == "recommended_threshold":
        from ..moved import warn_moved

        warn_moved(f"{__name__}.recommended_threshold", "kvzap_eval.runtime.methods.default_threshold", depth=1)
        return _default_threshold
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
