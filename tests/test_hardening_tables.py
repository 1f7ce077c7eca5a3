"""Result tables under faults and mistakes: torn writes, runs of another identity, baselines that could not fail,
missing or malformed tables, and every bad argument of sweep, merge, report and gate (one `error:` line each)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from kvzap_eval import cli  # noqa: E402
from kvzap_eval.errors import ConfigError  # noqa: E402
from kvzap_eval.evaluation.sweep import merge_tables, run_sweep  # noqa: E402
from kvzap_eval.evaluation.table import TORN_SUFFIX, append_row, load_table, read_table, repair_table  # noqa: E402

from .lmeval_helpers import TASKS  # noqa: E402
from .lmeval_helpers import sweep_config as config_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY_TASK = "kvzap_tiny_generation"


def row(method="full", task="a", accuracy=0.5, ratio=0.0, identity=None, **extra) -> dict:
    """A valid table row (identity None: a legacy row without one)."""
    found = {"method": method, "task": task, "length": 1024, "accuracy": accuracy, "compression_ratio": ratio, "n": 4}
    found.update({"threshold": None, "matched_threshold": None, "key": f"{method}|{task}|{json.dumps(identity)}"})
    found.update(extra)
    if identity is not None:
        found["identity"] = {"identity_version": 1, **identity}
    return found


def write_rows(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows) + tail)
    return path


def one_error_line(capsys, argv: list[str]) -> str:
    """Run `kvzap-eval argv`: it must exit non-zero with exactly one line on stderr, `error: ...`."""
    assert cli.main(argv) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --- torn tables -------------------------------------------------------------------------------------------------


def test_a_row_appended_after_a_torn_line_starts_its_own_line_and_the_fragment_is_kept(tmp_path, capsys):
    table = write_rows(tmp_path / "t.jsonl", [row(task="a")], tail='{"accuracy": 0.9, "key": "tor')
    append_row(table, row(task="b"))
    assert [r["task"] for r in read_table(table)] == ["a", "b"]
    assert table.read_text().endswith("\n") and all(json.loads(line) for line in table.read_text().splitlines())
    assert (tmp_path / f"t.jsonl{TORN_SUFFIX}").read_text() == '{"accuracy": 0.9, "key": "tor\n'
    assert capsys.readouterr().err.count("warning:") == 1
    append_row(table, row(task="c"))  # nothing left to repair: no second warning
    assert len(read_table(table)) == 3 and capsys.readouterr().err == ""


def test_a_row_glued_to_a_torn_fragment_by_an_older_kvzap_eval_is_recovered(tmp_path):
    glued = '{"key": "torn' + json.dumps(row(task="b"), sort_keys=True)
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps(row(task="a")) + "\n" + glued + "\n" + json.dumps(row(task="c")) + "\n")
    assert [r["task"] for r in read_table(table)] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="line 2 is not a JSON row"):
        load_table(table)  # a report says so rather than guessing
    repair_table(table)
    assert [r["task"] for r in load_table(table)] == ["a", "b", "c"]
    assert (tmp_path / f"t.jsonl{TORN_SUFFIX}").read_text() == '{"key": "torn\n'


def test_sweep_rerun_after_a_torn_write_keeps_every_finished_run(tiny, tmp_path):
    config = config_for(tiny, tmp_path / "table.jsonl", methods=["full"], limit=2)
    [full] = run_sweep(config)
    with open(config.output, "a") as handle:
        handle.write('{"accuracy": 0.5, "key": "kvzap_m')  # a crash in the middle of the next row
    rows = run_sweep(config_for(tiny, config.output, methods=["full", "kvzap_mlp"], limit=2))
    on_disk = read_table(config.output)
    assert len(on_disk) == len(rows) == 2 and {r["method"] for r in on_disk} == {"full", "kvzap_mlp"}
    assert all(json.loads(line) for line in config.output.read_text().splitlines())
    assert on_disk[0] == full
    assert (tmp_path / f"table.jsonl{TORN_SUFFIX}").read_text() == '{"accuracy": 0.5, "key": "kvzap_m\n'


APPENDER = """
import sys
from pathlib import Path
from kvzap_eval.evaluation.table import append_row
table, writer, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(count):
    append_row(table, {"writer": writer, "i": i, "pad": "x" * 3000})
"""


def test_concurrent_writers_and_a_repair_lose_no_row(tmp_path):
    # two sweeps into one table at a time (README): the torn line one of them finds is moved aside once, under the
    # writers' lock, and no row goes to the file the repair replaced
    import subprocess
    import sys

    table = write_rows(tmp_path / "t.jsonl", [row()], tail='{"torn')
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(table), str(w), "40"], cwd=REPO) for w in range(4)]
    assert [writer.wait(timeout=120) for writer in writers] == [0] * 4
    rows = read_table(table)
    assert len(rows) == 1 + 4 * 40 and all(json.loads(line) for line in table.read_text().splitlines())
    assert sorted((r["writer"], r["i"]) for r in rows[1:]) == [(str(w), i) for w in range(4) for i in range(40)]
    assert (tmp_path / f"t.jsonl{TORN_SUFFIX}").read_text() == '{"torn\n'


def test_rows_of_workers_killed_before_their_merge_are_kept_by_the_next_sweep(tmp_path, capsys):
    """A `--workers` sweep whose parent (or machine) died leaves `<output>.worker-i.jsonl` unmerged; the next
    `kvzap-eval sweep` on that output merges them first (a rerun used to copy the output over them: rows lost)."""
    from kvzap_eval.evaluation.sweep_workers import recover_worker_tables, worker_paths

    identity = {"model": "m"}
    output = write_rows(tmp_path / "t.jsonl", [row(task="a", identity=identity)])
    first, second = worker_paths(output, 0)[0], worker_paths(output, 1)[0]
    write_rows(first, [row(task="a", identity=identity), row(task="b", identity=identity)], tail='{"torn')
    write_rows(second, [row(task="a", identity=identity), row(task="c", identity=identity)])
    write_rows(tmp_path / "other.jsonl.worker-0.jsonl", [row(task="z", identity=identity)])  # another sweep's

    assert recover_worker_tables(output) == 2
    assert [r["task"] for r in load_table(output)] == ["a", "b", "c"]
    assert recover_worker_tables(output) == 0  # merging them again adds nothing
    assert [r["task"] for r in load_table(output)] == ["a", "b", "c"]  # and "z" of another sweep is not taken

    write_rows(first, [row(task="d", identity=identity)])
    argv = ["sweep", "--output", str(output), "--tasks", TINY_TASK, "--methods", "random", "--ratios", "1.5"]
    assert cli.main(argv) != 0  # the sweep itself refuses --ratios 1.5; the leftover rows were kept before that
    assert "kept 1 rows an interrupted --workers sweep had left" in capsys.readouterr().out
    assert [r["task"] for r in load_table(output)] == ["a", "b", "c", "d"]


def test_merge_leaves_out_an_inputs_torn_line_and_moves_the_outputs_aside(tmp_path, capsys):
    identity = {"model": "m"}
    shard = write_rows(tmp_path / "s.jsonl", [row(task="a", identity=identity)], tail='{"acc')
    merged = write_rows(tmp_path / "m.jsonl", [row(task="b", identity=identity)], tail='{"tor')
    assert merge_tables(merged, [shard]) == (2, 1)
    assert shard.read_text().endswith('{"acc')  # an input is never changed
    assert [r["task"] for r in load_table(merged)] == ["b", "a"]
    assert (tmp_path / f"m.jsonl{TORN_SUFFIX}").read_text() == '{"tor\n'
    assert "s.jsonl line 2" in capsys.readouterr().err


# --- run identity: a row carries what determines its result; a table holds one configuration ---------------------


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory) -> Path:
    """A finished tiny sweep (full, KVzap at tau 0, random at its ratio), copied by each test that reruns it."""
    table = tmp_path_factory.mktemp("swept") / "table.jsonl"
    run_sweep(config_for(tiny, table))
    return table


@pytest.fixture
def table_copy(swept, tmp_path) -> Path:
    return Path(shutil.copy(swept, tmp_path / "table.jsonl"))


def other_model(tiny, root: Path) -> str:
    """The tiny model with one weight changed (same config and tokenizer): another model."""
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(tiny["model"], root / "other-model")
    weights = load_file(str(copy / "model.safetensors"))
    name = sorted(weights)[-1]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return str(copy)


def other_surrogate(tiny, root: Path) -> str:
    from transformers import AutoConfig

    from kvzap_eval.surrogate import random_surrogate, save_surrogate

    path = root / "other-surrogate"
    save_surrogate(random_surrogate(AutoConfig.from_pretrained(tiny["model"]), "mlp", seed=7, scale=4.0), path)
    return str(path)


def test_rows_carry_their_identity_and_its_hash_is_in_the_key(swept, tiny):
    rows = {r["method"]: r for r in read_table(swept)}
    kvzap = rows["kvzap_mlp"]["identity"]
    assert kvzap["limit"] == 3 and kvzap["window"] == 8 and kvzap["chat_template"] is False
    assert kvzap["model"].startswith("model@") and kvzap["surrogate_mlp"].startswith("surrogate@")
    assert (kvzap["dtype"], kvzap["protocol"], kvzap["task_version"]) == ("float32", "paper", 1.0)
    assert rows["random"]["identity"]["surrogate_mlp"] == kvzap["surrogate_mlp"], "matched to KVzap's ratio"
    assert "surrogate_mlp" not in rows["full"]["identity"], "the full cache does not depend on a surrogate"
    for found in rows.values():
        assert found["key"].startswith(f"{found['method']}|") and len(found["key"].rsplit("|", 1)[1]) == 12
        assert (found["device"], found["batch_size"], found["ranks"]) == ("cpu", 1, 1)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("model", lambda tiny, root: {"pretrained": other_model(tiny, root)}),
        ("surrogate_mlp", lambda tiny, root: {"model_args": {"surrogate": other_surrogate(tiny, root), "window": 8}}),
        ("limit", lambda tiny, root: {"limit": 2}),
        ("window", lambda tiny, root: {"model_args": {"surrogate": tiny["surrogate"], "window": 16}}),
        ("chat_template", lambda tiny, root: {"apply_chat_template": True}),
        ("backend", lambda tiny, root: {"model_args": {**tiny_args(tiny), "backend": "onnxruntime"}}),
    ],
)
def test_a_rerun_with_another_identity_is_refused_not_skipped(tiny, table_copy, tmp_path, field, change):
    before = table_copy.read_text()
    config = config_for(tiny, table_copy, **change(tiny, tmp_path))
    with pytest.raises(ConfigError, match=rf"holds runs with {field}=.*this sweep has {field}=.*another --output"):
        run_sweep(config)
    assert table_copy.read_text() == before


def tiny_args(tiny) -> dict:
    return {"surrogate": tiny["surrogate"], "window": 8}


def test_the_same_sweep_again_skips_everything(tiny, table_copy, monkeypatch):
    from kvzap_eval.evaluation import lm_eval_model

    monkeypatch.setattr(lm_eval_model, "KVzapHFLM", lambda *a, **k: pytest.fail("nothing should be evaluated"))
    assert len(run_sweep(config_for(tiny, table_copy))) == 3
    # device, batch size and the export location change how fast a run goes, not its result: still done
    again = config_for(tiny, table_copy, batch_size=2, model_args={**tiny_args(tiny), "backend_threads": 1})
    assert len(run_sweep(again)) == 3


def test_another_identity_into_another_table_runs_and_gets_other_keys(tiny, swept, tmp_path):
    rows = run_sweep(config_for(tiny, tmp_path / "limit2.jsonl", methods=["full"], limit=2))
    [first] = [r for r in read_table(swept) if r["method"] == "full"]
    assert rows[0]["key"] != first["key"] and rows[0]["key"].split("|")[:4] == first["key"].split("|")[:4]


def test_a_sweep_into_a_table_without_identities_is_refused(tiny, tmp_path):
    legacy = write_rows(tmp_path / "old.jsonl", [row(task=TINY_TASK)])
    with pytest.raises(ConfigError, match="without a run identity .* another --output"):
        run_sweep(config_for(tiny, legacy))


def test_merge_refuses_tables_of_other_identities_unless_on_purpose(tmp_path):
    three = write_rows(tmp_path / "a.jsonl", [row(task="a", identity={"limit": 3})])
    two = write_rows(tmp_path / "b.jsonl", [row(task="a", identity={"limit": 2})])
    out = tmp_path / "m.jsonl"
    with pytest.raises(ConfigError, match="limit=2, .* limit=3: these are different runs; .* --allow-mixed"):
        merge_tables(out, [three, two])
    assert not out.exists()
    assert merge_tables(out, [three, two], allow_mixed=True) == (2, 2)
    legacy = write_rows(tmp_path / "legacy.jsonl", [row(task="b")])
    with pytest.raises(ConfigError, match="no run identity"):
        merge_tables(tmp_path / "m2.jsonl", [three, legacy])


def test_a_mixed_table_gets_one_report_per_identity(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from kvzap_eval.evaluation.report import write_report

    rows = [row("full", task="a", accuracy=0.9, identity={"limit": 3})]
    for name, accuracy in (("s1", 0.8), ("s2", 0.4)):
        rows.append(row("kvzap_mlp", "a", accuracy, 0.7, threshold=-3.0, identity={"limit": 3, "surrogate_mlp": name}))
    index = write_report(write_rows(tmp_path / "t.jsonl", rows), tmp_path / "out", "kvzap-eval report t.jsonl")
    text = index.read_text()
    assert "mixes runs of 2 identities" in text and 'surrogate_mlp="s1"' in text and 'surrogate_mlp="s2"' in text
    first = (tmp_path / "out" / "identity-1" / "README.md").read_text()
    second = (tmp_path / "out" / "identity-2" / "README.md").read_text()
    # the full cache (no surrogate) is the reference of both; each KVzap run only in its own report
    assert (
        "| full | full | 0.000 | 90.0 | 31.9 | 4 |" in first and "| full | full | 0.000 | 90.0 | 31.9 | 4 |" in second
    )
    assert "| kvzap_mlp | tau=-3.0 | 0.700 | 80.0 | 39.2 | 4 |" in first and "80.0" not in second
    assert "mixes runs of 2 identities" in capsys.readouterr().err


def test_report_without_out_writes_beside_its_table_never_into_reports(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [row("full", task="a", accuracy=0.9), row("kvzap_mlp", "a", 0.8, 0.7, threshold=-3.0)]
    table = write_rows(tmp_path / "runs" / "mine.jsonl", rows) if (tmp_path / "runs").mkdir() is None else None
    monkeypatch.chdir(tmp_path)  # a checkout's reports/ would be here
    assert cli.main(["report", str(table)]) == 0
    assert (tmp_path / "runs" / "mine-report" / "README.md").is_file()
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("name", ["accuracy", "accuracy-n50", "accuracy-curves"])
def test_the_committed_reports_are_what_their_tables_give(name):
    # the older two tables predate run identities (they must still report the same); the curves table has them
    from kvzap_eval.evaluation.report import markdown

    table = REPO / "reports" / name / "smollm2.jsonl"
    rows = list({r["key"]: r for r in load_table(table)}.values())
    text = markdown(rows, f"kvzap-eval report reports/{name}/smollm2.jsonl --out reports/{name}")
    committed = (REPO / "reports" / name / "README.md").read_text()
    assert committed.startswith(text + "\n## Plots")


# --- the gate cannot be made unfailable ------------------------------------------------------------------------------


GOOD_BASELINE = {
    "tasks": ["t"],
    "length": 1024,
    "limit": 10,
    "threshold": -3.0,
    "accuracy": {"t": 0.7},
    "compression_ratio": {"t": 0.6},
}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (json.dumps({**GOOD_BASELINE, "accuracy": {"t": math.nan}}), "accuracy of t must be a finite number"),
        (json.dumps({**GOOD_BASELINE, "compression_ratio": {"t": math.inf}}), "compression_ratio of t must be"),
        (json.dumps({**GOOD_BASELINE, "accuracy": {}}), "accuracy of t must be a finite number in .0, 1., got None"),
        (json.dumps({**GOOD_BASELINE, "tasks": []}), "tasks must be a non-empty list"),
        (json.dumps({k: v for k, v in GOOD_BASELINE.items() if k != "threshold"}), "missing field.* threshold"),
        (json.dumps({**GOOD_BASELINE, "treshold": 1}), "unknown field.* treshold"),
        (json.dumps({**GOOD_BASELINE, "limit": 0}), "limit must be a whole number >= 1"),
        (json.dumps({**GOOD_BASELINE, "tolerances": {"accuracy_drop": math.nan}}), "tolerance accuracy_drop"),
        (json.dumps({**GOOD_BASELINE, "latency_ratio": -1}), "latency_ratio must be"),
        ('{"tasks": ["t"], ', "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_a_baseline_that_could_not_fail_or_cannot_be_read_is_refused(tmp_path, capsys, text, says):
    from kvzap_eval.tools.gate import Baseline

    baseline = tmp_path / "b.json"
    baseline.write_text(text)
    line = one_error_line(capsys, ["gate", "--baseline", str(baseline), "--no-latency"])
    assert re.search(says, line) and line.startswith(f"error: baseline {baseline}"), line

    with pytest.raises(ConfigError, match=says):
        Baseline.load(baseline).check_figures()


def test_a_gate_measuring_nan_fails():
    from kvzap_eval.tools.gate import Baseline, Measurement, Tolerances, compare

    baseline = Baseline(**{**GOOD_BASELINE, "tolerances": Tolerances()})
    failures = compare(baseline, Measurement({"t": math.nan}, {"t": 0.6}, None))
    assert len(failures) == 1 and "no finite accuracy" in failures[0]
    assert compare(baseline, Measurement({}, {}, None)) != []


def test_gate_options_that_would_be_ignored_are_refused(tmp_path, capsys):
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps(GOOD_BASELINE))
    line = one_error_line(capsys, ["gate", "--baseline", str(baseline), "--tasks", "x"])
    assert "--tasks only apply with --update" in line
    line = one_error_line(capsys, ["gate", "--baseline", str(baseline), "--update", "--limit", "5"])
    assert "--limit set the subset of a new baseline" in line
    assert "must be at least 1" in one_error_line(capsys, ["gate", "--baseline", str(baseline), "--length", "0"])
    assert "not a file" in one_error_line(capsys, ["gate", "--baseline", str(tmp_path)])
    line = one_error_line(capsys, ["gate", "--baseline", str(baseline / "x.json"), "--update", "--tasks", "t"])
    assert "is a file, not a directory" in line


# --- report: the table and --out are checked before any work ------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no table at"),
        ("", "holds no rows"),
        ("\n\n", "holds no rows"),
        (json.dumps(row()) + "\nnot json\n" + json.dumps(row(task="b")) + "\n", "line 2 is not a JSON row"),
        ("[1, 2]\n", "line 1 is not a JSON row"),
        (json.dumps({k: v for k, v in row().items() if k != "accuracy"}) + "\n", "line 1: the row has no 'accuracy'"),
        (json.dumps(row(accuracy=math.nan)) + "\n", "accuracy must be a number in"),
        (json.dumps(row(n=0)) + "\n", "n must be a whole number >= 1"),
    ],
)
def test_report_refuses_a_missing_empty_or_malformed_table(tmp_path, capsys, content, says):
    table = tmp_path / "t.jsonl"
    if content is not None:
        table.write_text(content)
    assert says in one_error_line(capsys, ["report", str(table), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_report_leaves_out_a_torn_last_line_with_a_warning(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    table = write_rows(tmp_path / "t.jsonl", [row()], tail='{"acc')
    assert cli.main(["report", str(table), "--out", str(tmp_path / "out")]) == 0
    assert "last line is torn" in capsys.readouterr().err
    assert "| a | 1024 | full | full | 0.000 | 50.0 | 49.0 | 4 |" in (tmp_path / "out" / "README.md").read_text()


def test_report_refuses_an_out_that_is_a_file_or_under_one(tmp_path, capsys):
    assert "is not a file" in one_error_line(capsys, ["report", str(tmp_path), "--out", str(tmp_path / "out")])
    table = write_rows(tmp_path / "t.jsonl", [row()])
    assert "is a file, not a directory" in one_error_line(capsys, ["report", str(table), "--out", str(table)])
    line = one_error_line(capsys, ["report", str(table), "--out", str(table / "sub")])
    assert "is a file, not a directory" in line


# --- sweep and merge arguments ------------------------------------------------------------------------------------


@pytest.fixture
def sweep_argv(tiny, tmp_path):
    def argv(**changes) -> list[str]:
        options = {
            "--output": str(tmp_path / "t.jsonl"),
            "--tasks": TINY_TASK,
            "--lengths": "1024",
            "--methods": "full",
            "--thresholds": "0",
            "--limit": "1",
            "--include-path": TASKS,
            "--pretrained": tiny["model"],
            "--model-args": f"surrogate={tiny['surrogate']}",
        }
        options.update(changes)
        found = ["sweep", "--no-chat-template"]
        for name, value in options.items():
            found += [name, *value.split(" ")] if value is not None else []
        return found

    return argv


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"--limit": "0"}, "--limit: must be at least 1, got 0"),
        ({"--limit": "-3"}, "--limit: must be at least 1"),
        ({"--batch-size": "0"}, "--batch-size: must be at least 1"),
        ({"--lengths": "0"}, "--lengths: must be at least 1"),
        ({"--lengths": "-1024"}, "--lengths: must be at least 1"),
        ({"--lengths": "1k"}, "--lengths: '1k' is not a whole number"),
        ({"--thresholds": "nan"}, "--thresholds: must be a finite number"),
        ({"--methods": "kvzap"}, "--methods: invalid choice"),
        ({"--tasks": None}, "the following arguments are required: --tasks"),
        ({"--tasks": "kvzap_tiny_generaton"}, "unknown task 'kvzap_tiny_generaton'.*mean 'kvzap_tiny_generation'"),
        ({"--tasks": "kvzap_qa", "--include-path": str(REPO / "tasks"), "--lengths": "1000"},
         "task kvzap_qa offers context lengths 1024, 2048, 4096, 8192, not 1000"),
        ({"--tasks": "kvzap_longctx", "--include-path": str(REPO / "tasks")}, "is a group of tasks, not a task"),
        ({"--include-path": "/no/such/dir"}, "--include-path '/no/such/dir' is not a directory"),
        ({"--pretrained": "/no/such/model"}, "'/no/such/model'.* (does not exist|is not a model directory)"),
        ({"--model-args": "window=8,window=16"}, "--model-args gives window twice"),
        ({"--model-args": "surrogate="}, "has no value"),
        ({"--model-args": "surrogate=/no/such/surrogate", "--methods": "kvzap_mlp"}, "does not exist"),
        ({"--device": "gpu0"}, "--device 'gpu0' is not a torch device"),
        ({"--shard": "2/2"}, "--shard '2/2'"),
        ({"--workers": "0"}, "--workers: must be at least 1"),
        ({"--workers": "2", "--shard": "1/2"}, "groups out itself: leave out --shard"),
    ],
)  # fmt: skip
def test_every_bad_sweep_argument_is_one_line(sweep_argv, capsys, tmp_path, changes, says):
    line = one_error_line(capsys, sweep_argv(**changes))
    assert re.search(says, line), line
    assert not (tmp_path / "t.jsonl").exists()


def test_a_sweep_output_that_is_a_directory_or_under_a_file_is_refused(sweep_argv, capsys, tmp_path):
    assert "is a directory" in one_error_line(capsys, sweep_argv(**{"--output": str(tmp_path)}))
    afile = tmp_path / "file"
    afile.write_text("")
    line = one_error_line(capsys, sweep_argv(**{"--output": str(afile / "t.jsonl")}))
    assert "is a file, not a directory" in line


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 146.00 MiB."),
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried ..."),
    ],
)
def test_a_sweep_out_of_memory_is_one_line_naming_the_batch_and_keeps_finished_runs(
    sweep_argv, capsys, tmp_path, monkeypatch, error
):
    """As on the lent H200 (14 sweeps filled it): the second run fails to allocate; the first run's row stays, and
    the error names --batch-size and the resume."""
    from kvzap_eval.evaluation.sweep import SweepState

    evaluate, calls = SweepState.evaluate, []

    def failing_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(SweepState, "evaluate", failing_second)
    assert cli.main(sweep_argv(**{"--methods": "full kvzap_mlp", "--batch-size": "3"})) == 1
    err = capsys.readouterr().err  # progress bars above, then the one error line, not the allocator's traceback
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "OutOfMemoryError" not in err and "alloc_cpu" not in err
    assert "ran out of memory at --batch-size 3 with 1024-token contexts: lower --batch-size" in line
    assert "the same command resumes after them" in line
    assert len(load_table(tmp_path / "t.jsonl")) == 1


def test_every_bad_merge_argument_is_one_line(tmp_path, capsys):
    good = write_rows(tmp_path / "a.jsonl", [row()])
    assert "is a directory" in one_error_line(capsys, ["merge", "--output", str(tmp_path), str(good)])
    assert "no sweep table at" in one_error_line(capsys, ["merge", "--output", str(tmp_path / "m"), "missing"])
    bad = write_rows(tmp_path / "b.jsonl", [{k: v for k, v in row().items() if k != "key"}])
    assert "has no 'key'" in one_error_line(capsys, ["merge", "--output", str(tmp_path / "m"), str(bad)])
    assert "required" in one_error_line(capsys, ["merge", str(good)])


def test_a_full_disk_mid_command_is_one_line_and_keeps_the_table(tmp_path, capsys, monkeypatch):
    import errno

    from kvzap_eval.evaluation import sweep

    def full_disk(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    good = write_rows(tmp_path / "a.jsonl", [row()])
    monkeypatch.setattr(sweep, "write_table", full_disk)
    line = one_error_line(capsys, ["merge", "--output", str(tmp_path / "m.jsonl"), str(good)])
    assert line.startswith("error: OSError: [Errno 28] No space left on device") and "m.jsonl" in line
    assert load_table(good) == [row()]  # the input is untouched


def test_a_shard_without_runs_says_so(tiny, tmp_path, capsys):
    from kvzap_eval.evaluation.sweep import Shard, plan

    assert plan(config_for(tiny, tmp_path / "t.jsonl", shard=Shard(1, 2))) == []
    assert "shard 1/2 holds none of the 1 (task, length) groups" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"limit": 0}, "--limit must be a whole number >= 1, got 0"),
        ({"batch_size": -1}, "--batch-size must be"),
        ({"lengths": [1024, 0]}, "--lengths must be"),
        ({"lengths": []}, "--lengths is empty"),
        ({"tasks": []}, "--tasks is empty"),
        ({"thresholds": [float("inf")]}, "threshold must be finite"),
        ({"limit": True}, "--limit must be"),
    ],
)
def test_the_sweep_api_refuses_what_the_cli_refuses(tiny, tmp_path, change, says):
    with pytest.raises(ConfigError, match=says):
        config_for(tiny, tmp_path / "t.jsonl", **change)
