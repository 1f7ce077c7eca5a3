"""The shared-prefill sweep engine gives the per-method path's answers, rows and statistics, for every method."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from kvzap_eval.cli_args import UsageError  # noqa: E402
from kvzap_eval.errors import ConfigError  # noqa: E402
from kvzap_eval.evaluation.lm_eval_model import KVzapHFLM  # noqa: E402
from kvzap_eval.evaluation.sweep import SWEEP_METHODS, Run, Shard, main, merge_tables, plan, read_table, run_sweep  # noqa: E402
from kvzap_eval.evaluation.sweep_engine import SharedPrefillLM  # noqa: E402
from kvzap_eval.runtime import oracle  # noqa: E402
from kvzap_eval.runtime.methods import MethodConfig  # noqa: E402
from kvzap_eval.surrogate import random_surrogate, save_surrogate  # noqa: E402

from .lmeval_helpers import TASKS, sweep_config  # noqa: E402

FIGURES = ("key", "accuracy", "n", "compression_ratio", "kv_bytes_fraction", "setting_ratio", "identity")
TASK_NAMES = ["kvzap_tiny_generation", "kvzap_tiny_choice", "kvzap_tiny_rolling"]


@pytest.fixture(scope="module")
def hub(tiny, tmp_path_factory):
    """The tiny model's MLP and linear surrogates under kvpress's names in an offline hub cache, so that every
    sweep method (kvzap_linear included) finds its surrogate by the naming rule."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny["model"])
    cache = tmp_path_factory.mktemp("hub")
    for model_type, seed in (("mlp", 1), ("linear", 2)):
        folder = cache / f"models--nvidia--KVzap-{model_type}-model"
        save_surrogate(random_surrogate(config, model_type, seed=seed, scale=4.0), folder / "snapshots" / ("0" * 40))
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("0" * 40)
    return cache


@pytest.fixture
def offline_hub(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def figures(rows: list[dict]) -> dict[str, tuple]:
    return {row["key"]: tuple(json.dumps(row[name], sort_keys=True) for name in FIGURES) for row in rows}


def every_method_config(tiny, tmp_path, **overrides):
    settings = dict(
        methods=list(SWEEP_METHODS), thresholds=[0.0, 1.0], ratios=[0.5], model_args={"window": 8}, batch_size=2
    )
    settings.update(overrides)
    return sweep_config(tiny, tmp_path, **settings)


def test_engine_rows_equal_per_method_rows_for_every_method(tiny, tmp_path, offline_hub):
    per_method = run_sweep(every_method_config(tiny, tmp_path / "per-method.jsonl", engine="per-method"))
    methods = {row["method"] for row in per_method}
    assert methods == set(SWEEP_METHODS)
    assert {row["setting_ratio"] for row in per_method if row["method"] == "random"} >= {0.5}
    # an interrupted engine sweep (a pass half done) resumed, then everything: the same rows as per method
    config = every_method_config(tiny, tmp_path / "engine.jsonl")
    partial = [run for run in plan(config) if run.method in ("full", "kvzap_mlp", "random")][:3]
    run_sweep(config, runs=partial)
    engine = run_sweep(config)
    assert figures(engine) == figures(per_method)
    assert all(0 < row["compression_ratio"] < 1 for row in engine if row["method"] != "full")


def test_engine_shards_merged_equal_one_per_method_sweep(tiny, tmp_path):
    lengths = dict(lengths=[1024, 2048], methods=["full", "kvzap_mlp", "streaming"], thresholds=[0.0])
    whole = run_sweep(sweep_config(tiny, tmp_path / "whole.jsonl", engine="per-method", **lengths))
    for index in (0, 1):
        run_sweep(sweep_config(tiny, tmp_path / f"shard{index}.jsonl", shard=Shard(index, 2), **lengths))
    merge_tables(tmp_path / "merged.jsonl", [tmp_path / "shard0.jsonl", tmp_path / "shard1.jsonl"])
    assert figures(read_table(tmp_path / "merged.jsonl")) == figures(whole)


def evaluate_all(lm, configs, select) -> list[dict]:
    """Each method's lm-eval results on the tiny generation, multiple-choice and rolling tasks, with samples."""
    outcomes = []
    for index, config in enumerate(configs):
        select(index, config)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=TASK_NAMES,
            task_manager=TaskManager(include_path=TASKS, include_defaults=False),
            limit=3,
            bootstrap_iters=0,
            log_samples=True,
        )
        kvzap = {k: v for k, v in results["config"]["kvzap"].items() if not k.startswith("scorer_latency")}
        responses = {task: [s["resps"] for s in samples] for task, samples in results["samples"].items()}
        outcomes.append({"results": results["results"], "responses": responses, "kvzap": kvzap})
    return outcomes


@pytest.mark.parametrize("batch_size", [1, 3])
def test_engine_answers_equal_per_method_answers(tiny, tmp_path, batch_size):
    linear = save_surrogate(random_surrogate(_config(tiny), "linear", seed=2, scale=4.0), tmp_path / "linear")
    surrogate = {"surrogate": tiny["surrogate"]}
    configs = [
        MethodConfig(method="full"),
        MethodConfig(method="kvzap", threshold=0.0, window=8, **surrogate),
        MethodConfig(method="kvzap", threshold=0.5, window=8, surrogate=str(linear)),
        MethodConfig(method="kvzap_adakv", compression_ratio=0.6, **surrogate),
        MethodConfig(method="random", compression_ratio=0.5),
        MethodConfig(method="streaming", compression_ratio=0.7),
        MethodConfig(method="snapkv", compression_ratio=0.5),
        MethodConfig(method="kvzip_plus", threshold=0.0, window=8),
        MethodConfig(method="kvzip_plus", compression_ratio=0.6),
    ]
    settings = dict(pretrained=tiny["model"], method="full", device="cpu", dtype="float32", batch_size=batch_size)
    per_method_lm = KVzapHFLM(**settings)
    expected = evaluate_all(per_method_lm, configs, lambda index, config: per_method_lm.set_method(config))
    engine = SharedPrefillLM(**settings)
    engine.begin_pass(configs)
    waiting, waiting_bytes = [], []

    def select(index, config):
        waiting.append(engine.waiting_results())
        waiting_bytes.append(engine.waiting_nbytes())
        engine.use(index)

    got = evaluate_all(engine, configs, select)
    assert engine.waiting_results() == 0
    engine.end_pass()
    engine.set_method(configs[1])  # outside a pass it is kvzap_hf with one method
    assert evaluate_all(engine, configs[1:2], lambda index, config: None) == expected[1:2]
    for config, ours, theirs in zip(configs, got, expected):
        assert ours == theirs, config
    # the first evaluation computed every method's batches; each later one took its own and nothing else
    assert waiting[0] == 0 and waiting[1] > 0
    # no cache waits: per batch and method a few tokens and counts, under 1% of one full cache of the batch
    full_cache = got[0]["kvzap"]["full_kv_bytes"] / got[0]["kvzap"]["requests"] * batch_size
    assert 0 < waiting_bytes[1] / waiting[1] < 0.01 * full_cache
    assert all(earlier - later == waiting[1] // (len(configs) - 1) for earlier, later in zip(waiting[1:], waiting[2:]))
    assert len({json.dumps(o["responses"]) for o in expected}) > 3, "methods that all answer alike prove little"


def _config(tiny):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny["model"])


def test_the_teacher_runs_once_per_context_for_both_oracle_runs(tiny, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the teacher's scores wait between passes
    calls = {"n": 0}
    original = oracle.context_scores

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(oracle, "context_scores", counted)
    methods = dict(methods=["kvzap_mlp", "kvzip_plus", "kvzip_plus_threshold"], thresholds=[0.0])
    per_method = run_sweep(sweep_config(tiny, tmp_path / "per-method.jsonl", engine="per-method", **methods))
    assert calls["n"] == 6  # 3 contexts, 2 oracle runs
    calls["n"] = 0
    engine = run_sweep(sweep_config(tiny, tmp_path / "engine.jsonl", **methods))
    assert calls["n"] == 3  # once per context, across the two passes
    assert figures(engine) == figures(per_method)
    assert not list(tmp_path.glob("kvzap-teacher-*"))


def test_ratio_grid_runs_without_kvzap_and_beside_its_matched_ratios(tiny, tmp_path):
    grid_only = plan(sweep_config(tiny, tmp_path / "t.jsonl", methods=["full", "random"], ratios=[0.5, 0.9]))
    assert [(run.method, run.ratio) for run in grid_only] == [("full", None), ("random", 0.5), ("random", 0.9)]
    both = plan(sweep_config(tiny, tmp_path / "t.jsonl", methods=["kvzap_mlp", "snapkv"], ratios=[0.75]))
    assert [run.key.split("|")[:2] for run in both] == [["kvzap_mlp", "0.0"], ["snapkv", "ratio=0.75"],
                                                          ["snapkv", "0.0"]]  # fmt: skip
    assert Run("random", "t", 1024, ratio=0.5).surrogate_type is None  # no KVzap surrogate behind a grid run
    assert Run("kvzap_adakv", "t", 1024, ratio=0.5).surrogate_type == "mlp"
    rows = run_sweep(sweep_config(tiny, tmp_path / "grid.jsonl", methods=["random"], ratios=[0.5, 0.9]))
    ratios = {row["ratio"]: row["compression_ratio"] for row in rows}
    assert ratios[0.9] > ratios[0.5] > 0.3
    from kvzap_eval.evaluation.report import markdown

    text = markdown(rows, "kvzap-eval report grid.jsonl")  # each grid point is a setting of its own
    assert "| random | ratio=0.5 | " in text and "| random | ratio=0.9 | " in text and "(`sweep --ratios`)" in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(methods=["full", "random"]), "add kvzap_mlp, or give them their own --ratios"),
        (dict(methods=["full", "random"], ratios=[1.0]), r"compression_ratio must be in \[0, 1\)"),
        (dict(methods=["full", "kvzap_mlp"], ratios=[0.5]), "--ratios applies to kvzap_adakv, random"),
        (dict(methods=["full", "random"], ratios=[]), "--ratios is empty"),
        (dict(engine="fast"), "--engine 'fast': choose one of shared-prefill, per-method"),
    ],
)
def test_bad_ratio_grid_or_engine_is_one_line(tiny, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        sweep_config(tiny, tmp_path / "t.jsonl", **overrides)


def test_cli_takes_the_engine_and_the_ratio_grid(tiny, tmp_path):
    table = tmp_path / "cli.jsonl"
    argv = ["--output", str(table), "--tasks", "kvzap_tiny_generation", "--lengths", "1024", "--limit", "2",
            "--methods", "full", "streaming", "--ratios", "0.5", "--include-path", TASKS, "--pretrained",
            tiny["model"], "--no-chat-template"]  # fmt: skip
    assert main([*argv, "--engine", "per-method"]) == 0
    per_method = read_table(table)
    table.unlink()
    assert main(argv) == 0
    assert figures(read_table(table)) == figures(per_method)
    with pytest.raises(UsageError, match="--engine: invalid choice: 'fast'"):
        main([*argv, "--engine", "fast"])
    with pytest.raises(UsageError, match="--ratios: 'half' is not a number"):
        main([*argv, "--ratios", "half"])


@pytest.mark.slow
def test_smollm2_engine_rows_equal_per_method_rows(tmp_path):
    """The embedded SmolLM2 and its shipped surrogates on one real task, every sweep method: the same rows."""
    settings = dict(
        tasks=["kvzap_niah_single_repeat"],
        lengths=[1024],
        methods=list(SWEEP_METHODS),
        thresholds=[-3.0],
        limit=1,
        include_path="tasks",
    )
    from kvzap_eval.evaluation.sweep import SweepConfig

    per_method = run_sweep(SweepConfig(output=tmp_path / "per-method.jsonl", engine="per-method", **settings))
    engine = run_sweep(SweepConfig(output=tmp_path / "engine.jsonl", **settings))
    assert figures(engine) == figures(per_method)
    assert len(engine) == len(SWEEP_METHODS)
    assert next(row["accuracy"] for row in engine if row["method"] == "full") == 1.0


def test_sweep_bench_prints_both_wall_times_their_ratio_and_identical_rows(tiny, tmp_path, capsys):
    from kvzap_eval.cli import main as cli

    argv = ["sweep-bench", "--tasks", "kvzap_tiny_generation", "--limit", "2", "--methods", "full", "kvzap_mlp",
            "streaming", "--thresholds", "0.0", "--include-path", TASKS, "--pretrained", tiny["model"],
            "--no-chat-template", "--model-args", f"surrogate={tiny['surrogate']},window=8", "--out-dir",
            str(tmp_path)]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "3 rows (3 method settings x 1 tasks x 1 lengths), 2 contexts" in out
    assert "rows identical: 3/3" in out and "MISMATCH" not in out
    figures = {line.split(":")[0]: float(line.split()[1].rstrip("x")) for line in out.splitlines()[1:4]}
    assert figures["ratio"] == pytest.approx(figures["per-method"] / figures["shared-prefill"], abs=0.1)
    assert {path.name for path in tmp_path.iterdir()} >= {"per-method.jsonl", "shared-prefill.jsonl"}


def test_workers_split_the_sweep_and_merge_it_into_the_same_rows(tiny, tmp_path):
    """`sweep --workers 2`: two spawned processes (one (task, length) group each), their tables merged into the
    output and removed; the rows equal one process's, and a rerun finds everything done."""
    from kvzap_eval.evaluation.sweep_workers import run_with_workers, worker_paths

    lengths = dict(lengths=[1024, 2048], methods=["full", "kvzap_mlp", "streaming"], thresholds=[0.0])
    whole = run_sweep(sweep_config(tiny, tmp_path / "whole.jsonl", **lengths))
    config = sweep_config(tiny, tmp_path / "split.jsonl", **lengths)
    run_sweep(config, runs=plan(config)[:1])  # one run already there: the workers skip it
    split = run_with_workers(config, 2, threads=1)
    assert figures(split) == figures(whole)
    assert sorted(p.name for p in tmp_path.iterdir() if "worker" in p.name) == []
    assert worker_paths(config.output, 0)[0].name == "split.jsonl.worker-0.jsonl"
    assert figures(run_with_workers(config, 2, threads=1)) == figures(whole)  # nothing left to do


def test_workers_take_the_groups_with_the_most_runs_left_first(tiny, tmp_path):
    """The queue the workers draw from: groups with runs left, most first; a resumed sweep whose remaining groups
    would all have fallen into one fixed shard still gives both workers one."""
    from kvzap_eval.evaluation.sweep import identify, row_key
    from kvzap_eval.evaluation.sweep_workers import run_with_workers, units_to_run

    config = sweep_config(tiny, tmp_path / "t.jsonl", lengths=[1024, 2048, 3072], methods=["full", "kvzap_mlp"])
    runs, identity = plan(config), identify(config)
    done = {
        row_key(run, identity) for run in runs if run.length == 2048 or (run.length == 1024 and run.method == "full")
    }
    assert units_to_run(runs, done, identity, 2) == [
        ("full|None|kvzap_tiny_generation|3072", "kvzap_mlp|0.0|kvzap_tiny_generation|3072"),
        ("kvzap_mlp|0.0|kvzap_tiny_generation|1024",),
    ]
    assert units_to_run(runs, {row_key(run, identity) for run in runs}, identity, 2) == []

    whole = run_sweep(sweep_config(tiny, tmp_path / "whole.jsonl", lengths=[1024, 2048, 3072], methods=["full"]))
    split = sweep_config(tiny, tmp_path / "split.jsonl", lengths=[1024, 2048, 3072], methods=["full"])
    run_sweep(split, runs=[run for run in plan(split) if run.length == 2048])  # left: positions 0 and 2 (shard 0/2)
    assert figures(run_with_workers(split, 2, threads=1)) == figures(whole)


def test_fewer_groups_than_workers_are_cut_so_every_worker_has_runs(tiny, tmp_path):
    """One (task, length) group and two workers: the group is cut in two units of about equal size, each fixed-ratio
    run in the unit of the KVzap run it is matched to (unless that run is already in the table); the rows are one
    process's."""
    from kvzap_eval.evaluation.sweep import identify, row_key
    from kvzap_eval.evaluation.sweep_workers import run_with_workers, units_to_run

    methods = dict(methods=["full", "kvzap_mlp", "random", "streaming"], thresholds=[0.0, 1.0])
    config = sweep_config(tiny, tmp_path / "split.jsonl", **methods)
    runs, identity = plan(config), identify(config)
    units = units_to_run(runs, set(), identity, 2)
    assert sorted(key for unit in units for key in unit) == sorted(run.key for run in runs)  # each run once
    assert [len(unit) for unit in units] == [4, 3]  # each tau with its two matched runs; full joins the first
    for unit in units:
        for run in (run for run in runs if run.key in unit and run.matched_threshold is not None):
            assert run.reference().key in unit
            assert list(unit).index(run.reference().key) < list(unit).index(run.key)  # plan order inside a unit
    tau0 = {row_key(run, identity) for run in runs if run.threshold == 0.0}  # KVzap at tau 0 already in the table
    assert [len(unit) for unit in units_to_run(runs, tau0, identity, 2)] == [3, 3]  # its matched runs go anywhere
    assert units_to_run(runs, set(), identity, 1) == [tuple(run.key for run in runs)]  # enough groups: whole
    assert len(units_to_run(runs, set(), identity, 8)) == 3  # never more units than families

    whole = run_sweep(sweep_config(tiny, tmp_path / "whole.jsonl", **methods))
    assert figures(run_with_workers(config, 2, threads=1)) == figures(whole)


def test_a_pass_reports_its_runs_in_flight_context_by_context(tiny, tmp_path):
    """`run_sweep(progress=...)` hears the runs' worth of work done and not yet in the table: a pass of k runs rises
    to k as its contexts are computed (for all its runs at once), then falls by one as each row is written."""
    heard: list[float] = []
    rows = run_sweep(sweep_config(tiny, tmp_path / "t.jsonl"), progress=heard.append)
    assert len(rows) == 3  # pass 1: full and KVzap (3 contexts), pass 2: random at KVzap's ratio
    first, second = [2 / 3, 4 / 3, 2, 1, 0, 0], [1 / 3, 2 / 3, 1, 0, 0]
    assert heard == pytest.approx(first + second)
    heard.clear()
    run_sweep(sweep_config(tiny, tmp_path / "t.jsonl"), progress=heard.append)
    assert heard == []  # nothing left to do, nothing in flight


def test_the_workers_bar_counts_what_a_worker_has_in_flight(tmp_path):
    from kvzap_eval.evaluation.sweep_workers import _in_flight, progress_path

    path = progress_path(tmp_path / "t.jsonl", 1)
    assert path.name == "t.jsonl.worker-1.progress"
    assert _in_flight(path) == 0.0  # not written yet
    path.write_text("1.5000")
    assert _in_flight(path) == 1.5
    path.write_text("")  # a reader never sees this (atomic writes), but an empty file is no crash either
    assert _in_flight(path) == 0.0
