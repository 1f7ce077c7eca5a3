"""The lm-eval front door: lm-eval's own RULER tasks on kvzap_hf's default model with no `pretrained`, tasks that
cannot run offline refused in one line, the KVzap summary under lm-eval's table (and never in its files), and our
tasks' table rows limited to the lengths that ran."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import make_table  # noqa: E402

from kvzap_eval.errors import ConfigError  # noqa: E402
from kvzap_eval.evaluation import lm_eval_preflight as preflight  # noqa: E402
from kvzap_eval.evaluation import lm_eval_summary  # noqa: E402
from kvzap_eval.evaluation.lm_eval_model import KVzapHFLM  # noqa: E402
from kvzap_eval.llm.embedded import _MARKER, EMBEDDED_NAME, embedded_model_path  # noqa: E402

from .lmeval_helpers import ENV  # noqa: E402

REPO_TASKS = str(Path(__file__).resolve().parent.parent / "tasks")
RULER_DIR = Path(lm_eval.__file__).parent / "tasks" / "ruler"
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------- reading the command line


def test_the_command_line_is_read_as_lm_eval_reads_it():
    command = preflight.parse(
        ["--model", "kvzap_hf", "--model_args", "threshold=-5", "--tasks", "niah_single_1,ruler_vt", "ruler_cwe",
         "--metadata", '{"max_seq_lengths":[1024]}']
    )  # fmt: skip
    assert command.model == "kvzap_hf"
    assert command.model_args == {"threshold": -5.0}
    assert command.tasks == ("niah_single_1", "ruler_vt", "ruler_cwe")
    assert command.metadata == {"max_seq_lengths": [1024]}
    assert preflight.parse(["ls", "tasks"]) is None
    assert preflight.parse(["--model", "kvzap_hf", "--no_such_flag"]) is None  # lm-eval reports it itself


def test_default_model_is_added_only_when_kvzap_hf_names_none():
    embedded = str(embedded_model_path())
    argv = ["--model", "kvzap_hf", "--model_args", "threshold=-5", "--tasks", "niah_single_1"]
    added = preflight.with_default_model(argv, preflight.parse(argv))
    assert preflight.parse(added).model_args == {"threshold": -5.0, "pretrained": embedded}
    for alias in ("embedded", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        aliased = ["--model", "kvzap_hf", "--model_args", f"pretrained={alias}", "--tasks", "niah_single_1"]
        assert preflight.parse(preflight.with_default_model(aliased, preflight.parse(aliased))).model_args == {
            "pretrained": embedded
        }
    for unchanged in (
        ["--model", "kvzap_hf", "--model_args", "pretrained=/some/dir", "--tasks", "niah_single_1"],
        ["--model", "hf", "--tasks", "niah_single_1"],
        ["ls", "tasks"],
        [*argv[:-1], "--model_args", json.dumps({"pretrained": embedded})],
    ):
        assert preflight.with_default_model(unchanged, preflight.parse(unchanged)) == unchanged


def test_default_model_keeps_the_model_args_of_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "kvzap_hf", "model_args": {"threshold": -3}, "tasks": "ruler_vt"}))
    argv = ["--config", str(config)]
    command = preflight.parse(argv)
    assert (command.model, command.tasks, command.model_args_on_command_line) == ("kvzap_hf", ("ruler_vt",), False)
    added = preflight.parse(preflight.with_default_model(argv, command))
    assert added.model_args == {"threshold": -3, "pretrained": str(embedded_model_path())}


# ----------------------------------------------------------------------------- tasks that cannot run offline


def _custom_dataset_functions() -> dict[str, str]:
    """lm-eval's RULER task name -> `module.function` building its data, read from the installed YAML files."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    found = {}
    for path in RULER_DIR.glob("*.yaml"):
        config = yaml.load(path.read_text(), Loader=Loader)
        if "custom_dataset" in config:
            found[config["task"]] = config["custom_dataset"]
    return found


def _function_source(qualified: str) -> str:
    module, function = qualified.split(".")
    source = (RULER_DIR / f"{module}.py").read_text()
    [node] = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == function]
    return ast.get_source_segment(source, node)


def test_offline_table_matches_the_installed_lm_eval():
    functions = _custom_dataset_functions()
    group = yaml.safe_load((RULER_DIR / "ruler.yaml").read_text())
    assert sorted(group["task"]) == sorted(functions) == sorted(preflight.GROUPS["ruler"])
    assert set(preflight.DOWNLOADS).isdisjoint(preflight.RULER_OFFLINE)
    for task, function in functions.items():
        body = _function_source(function)
        fetches = 'type_haystack="essay"' in body or 'get_qa_dataset("' in body
        assert fetches == (task in preflight.DOWNLOADS), (task, function)
    for module in ("cwe_utils", "fwe_utils", "vt_utils"):  # the synthetic ones read nothing from the network
        source = (RULER_DIR / f"{module}.py").read_text()
        assert "load_dataset(" not in source and "requests" not in source, module


def test_offline_refuses_tasks_that_fetch_data_naming_each(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(preflight, "_hub_dataset_cached", lambda dataset: False)
    preflight.check_offline(["niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe",
                             "ruler_fwe", "kvzap_longctx"])  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        preflight.check_offline(["niah_single_1", "niah_single_2", "ruler_qa_squad"])
    message = str(refused.value)
    assert "\n" not in message
    assert "niah_single_2 needs the Hub dataset baber/paul_graham_essays" in message
    assert "ruler_qa_squad needs SQuAD v2 dev from rajpurkar.github.io" in message
    assert "niah_single_1," in message.split("generate their data:")[1]  # the alternatives, not the refused
    with pytest.raises(ConfigError, match="ruler_qa_hotpot needs HotpotQA"):
        preflight.check_offline(["ruler"])


def test_a_cached_essay_dataset_or_network_access_lets_them_run(monkeypatch):
    offline_variables = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    online = {name: value for name, value in ENV.items() if name not in offline_variables}
    code = "from kvzap_eval.evaluation.lm_eval_preflight import offline_problems; print(offline_problems(['ruler']))"
    done = subprocess.run([sys.executable, "-c", code], env=online, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "{}", done.stderr[-2000:]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(preflight, "_hub_dataset_cached", lambda dataset: dataset == "baber/paul_graham_essays")
    remaining = preflight.offline_problems(["ruler"])
    assert sorted(task for group in remaining.values() for task in group) == ["ruler_qa_hotpot", "ruler_qa_squad"]


def test_an_uncached_hub_dataset_is_not_cached_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert not preflight._hub_dataset_cached("baber/paul_graham_essays")


def test_kvzap_hf_refuses_the_remembered_command_before_loading(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(preflight, "_hub_dataset_cached", lambda dataset: False)
    monkeypatch.setattr(preflight, "_command", preflight.parse(["--model", "kvzap_hf", "--tasks", "niah_multivalue"]))
    with pytest.raises(ConfigError, match="niah_multivalue needs the Hub dataset"):
        KVzapHFLM(pretrained="/no/such/model")  # refused before the model is even looked for


# --------------------------------------------------------------------------------------------- the summary


def test_summary_shows_the_kept_layout_only_when_the_statistics_have_it():
    info = {
        "method": "kvzap", "threshold": -5.0, "window": 128, "decoding": True, "model_type": "mlp",
        "backend": "torch", "protocol": "paper", "prefill_chunk": None, "ranks": 1, "requests": 3,
        "achieved_compression_ratio": 0.5, "achieved_compression_ratio_per_task": {"a": 0.25, "bb": 0.75},
        "kv_bytes": 3 * 2**20, "full_kv_bytes": 6 * 2**20,
        "scorer_latency_us_per_layer": {"prefill": [100.0, 300.0], "decode": [10.0, 30.0]},
        "scorer_calls_per_layer": {"prefill": [3, 3], "decode": [12, 12]},
    }  # fmt: skip
    text = lm_eval_summary.format_summary(info)
    assert "kvzap: threshold -5.0, window 128, decoding True, model_type mlp, protocol paper" in text
    assert "0.500 overall (3 requests)" in text and "a   0.250" in text and "bb  0.750" in text
    assert "3.00 MiB held vs 6.00 MiB full (50.0%)" in text and "exactly the kept" not in text
    assert "prefill 200 us per layer call (layers 100-300, 3 calls per layer)" in text
    assert "decode 20 us per layer call (layers 10-30, 12 calls per layer)" in text
    kept = lm_eval_summary.format_summary({**info, "held_kv_bytes": 3 * 2**20, "kept_kv_bytes": 2**20})
    assert "a layout holding exactly the kept entries: 1.00 MiB (16.7%)" in kept
    baseline = lm_eval_summary.format_summary({**info, "method": "random", "backend": None})
    assert "none (method random runs no surrogate)" in baseline


# --------------------------------------------------------- our tasks: only the lengths that ran get a table row


def test_our_tasks_show_only_the_lengths_that_ran(tiny):
    lm = KVzapHFLM(pretrained=tiny["model"], surrogate=tiny["surrogate"], threshold=0.0, window=8, device="cpu",
                   dtype="float32")  # fmt: skip
    manager = TaskManager(include_path=REPO_TASKS, include_defaults=False,
                          metadata={"max_seq_lengths": [1024], "num_samples": 2})  # fmt: skip
    results = lm_eval.simple_evaluate(model=lm, tasks=["kvzap_niah_single_repeat"], task_manager=manager, limit=2,
                                      bootstrap_iters=0)  # fmt: skip
    metrics = results["results"]["kvzap_niah_single_repeat"]
    assert "1024,none" in metrics and 0.0 <= metrics["1024,none"] <= 1.0
    assert not {"2048,none", "4096,none", "8192,none"} & set(metrics)
    table = make_table(results)
    assert "|1024|" in table.replace(" ", "") and "-1" not in table


# ------------------------------------------- the commands as a user types them (subprocesses, offline, tiny model)


@pytest.fixture(scope="module")
def tiny_as_embedded(tiny, tmp_path_factory):
    """A kvzap-eval cache whose embedded model is the tiny one (with SmolLM2's tokenizer): the default without
    the 20 s SmolLM2 conversion and a 135M model."""
    cache = tmp_path_factory.mktemp("embedded-cache")
    shutil.copytree(tiny["model"], cache / EMBEDDED_NAME)
    (cache / EMBEDDED_NAME / _MARKER).write_text("tiny test model\n")
    return {**ENV, "KVZAP_EVAL_CACHE": str(cache)}, cache / EMBEDDED_NAME


@pytest.mark.parametrize("program", ["lm_eval", "kvzap-eval"])
def test_ruler_without_pretrained_prints_the_summary_after_the_table_only(tiny, tiny_as_embedded, tmp_path, program):
    env, embedded = tiny_as_embedded
    args = [str(BIN / program), "--model", "kvzap_hf", "--model_args",
            f"threshold=0,surrogate={tiny['surrogate']},window=8", "--tasks", "niah_single_1",
            "--metadata", '{"max_seq_lengths":[1024]}', "--device", "cpu", "--limit", "2",
            "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith(lm_eval_summary.TITLE))
    table_rows = [i for i, line in enumerate(lines) if line.startswith("|niah_single_1")]
    assert table_rows and max(table_rows) < title, done.stdout
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_args"]["pretrained"] == str(embedded)  # the default, made explicit
    ratio = results["config"]["kvzap"]["achieved_compression_ratio"]
    assert 0.0 < ratio < 1.0
    summary = "\n".join(lines[title:])
    assert f"{ratio:.3f} overall (2 requests)" in summary and f"niah_single_1  {ratio:.3f}" in summary
    assert "backend      torch" in summary and "scorer time  prefill" in summary
    written = list((tmp_path / "out").rglob("*"))
    assert len([p for p in written if p.is_file()]) == 2  # results and samples
    for path in written:
        assert path.is_dir() or lm_eval_summary.TITLE not in path.read_text()


def test_stock_lm_eval_refuses_a_task_that_needs_a_download(tiny_as_embedded):
    env, _ = tiny_as_embedded
    args = [str(BIN / "lm_eval"), "--model", "kvzap_hf", "--model_args", "threshold=-5", "--tasks",
            "niah_single_1,niah_single_2", "--metadata", '{"max_seq_lengths":[1024]}', "--device", "cpu"]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kvzap_eval.errors.ConfigError: lm-eval tasks that fetch data cannot run offline"), last
    assert "niah_single_2 needs the Hub dataset baber/paul_graham_essays" in last
    assert lm_eval_summary.TITLE not in done.stdout


def test_kvzap_eval_refuses_a_task_that_needs_a_download_in_one_line(tiny_as_embedded):
    env, _ = tiny_as_embedded
    args = [str(BIN / "kvzap-eval"), "--model", "kvzap_hf", "--tasks", "ruler_qa_squad", "--device", "cpu"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [done.stderr.strip().splitlines()[-1]]
    assert "ruler_qa_squad needs SQuAD v2 dev from rajpurkar.github.io" in errors[0]


@pytest.mark.slow
def test_headline_ruler_command_on_the_embedded_smollm2(tmp_path):
    """The command of the README, as written (plus CPU and a small limit), on the real embedded model."""
    args = [str(BIN / "lm_eval"), "--model", "kvzap_hf", "--model_args", "threshold=-5", "--tasks", "niah_single_1",
            "--metadata", '{"max_seq_lengths":[1024]}', "--device", "cpu", "--limit", "2",
            "--output_path", str(tmp_path)]  # fmt: skip
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [results_file] = tmp_path.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["niah_single_1"]["1024,none"] >= 0.0
    ratio = results["config"]["kvzap"]["achieved_compression_ratio"]
    assert 0.0 < ratio < 1.0 and f"{ratio:.3f} overall" in done.stdout
