"""Issue 12, command lines: every user mistake in `kvzap-eval demo/bench/latency/train`, `python -m kvzap_eval.train`
and the lm-eval passthrough ends in one `error:` line and a non-zero exit, before any long work; files the training
reads are checked before use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from kvzap_eval import cli, train
from kvzap_eval.errors import ConfigError, CorpusError, OutputDirError
from kvzap_eval.runtime.methods import MethodConfig
from kvzap_eval.runtime.policies import FixedRatioPolicy, ThresholdPolicy
from kvzap_eval.train.collect import CollectConfig, CollectedData, collect
from kvzap_eval.train.corpus import CorpusConfig, build_corpus, text_files

from .lmeval_helpers import ENV, TASKS


def one_error_line(capsys, code: int, expected_code: int = 1) -> str:
    """The single stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config-only")
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------------------- demo


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "error: model directory '/no/such/model' does not exist"),
        (["--model", "nobody/no-such-model"], "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"),
        (["--context-tokens", "0"], "argument --context-tokens: must be at least 1, got 0"),
        (["--max-new-tokens", "-2"], "argument --max-new-tokens: must be at least 1, got -2"),
        (["--window", "2.5"], "argument --window: '2.5' is not a whole number"),
        (["--threshold", "nan"], "argument --threshold: must be a finite number"),
        (["--method", "random", "--threshold", "-4"], "method random does not take threshold"),
        (["--method", "random"], "needs compression_ratio"),
        (["--method", "streaming", "--compression-ratio", "0.5", "--window", "8"], "does not take window"),
    ],
)
def test_demo_mistakes_are_one_line(capsys, monkeypatch, args, message):
    from kvzap_eval.llm import hub_cache

    monkeypatch.setattr(hub_cache, "offline", lambda: True)
    assert message in one_error_line(capsys, cli.main(["demo", *args]))


def test_demo_refuses_an_unsupported_architecture_and_a_model_without_weights(capsys, gpt2_dir, config_only_dir):
    line = one_error_line(capsys, cli.main(["demo", "--model", gpt2_dir]))
    assert "architecture 'gpt2' is not supported by the KVzap runtime: use one of llama" in line
    line = one_error_line(capsys, cli.main(["demo", "--model", config_only_dir, "--method", "full"]))
    assert f"cannot load model {config_only_dir!r}" in line


@pytest.mark.parametrize(
    "method", [["random", "--compression-ratio", "0.5"], ["kvzip_plus", "--compression-ratio", "0.5"]]
)
def test_demo_runs_the_methods_with_their_own_settings(tiny, capsys, method):
    code = cli.main(["demo", "--model", tiny["model"], "--method", *method, "--context-tokens", "60",
                     "--max-new-tokens", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "compression ratio: 0.496 (1.98x)" in out, out  # 112-token prompt, 2 unpruned new tokens


# ------------------------------------------------------------------------------------------------ bench, latency


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--repeats", "0"], "argument --repeats: must be at least 1"),
        (["--context-tokens", "-5"], "argument --context-tokens: must be at least 1"),
        (["--new-tokens", "x"], "argument --new-tokens: 'x' is not a whole number"),
        (["--threshold", "inf"], "must be a finite number"),
    ],
)
def test_bench_mistakes_are_one_line(capsys, args, message):
    assert message in one_error_line(capsys, cli.main(["bench", *args]))


def test_bench_json_that_is_a_directory_is_refused_before_measuring(capsys, tmp_path):
    line = one_error_line(capsys, cli.main(["bench", "--json", str(tmp_path), "--threads", "1", "--only", "scorer"]))
    assert f"--json {tmp_path} is a directory" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "0"], "argument --threads: must be at least 1"),
        (["--prefill", "0"], "argument --prefill: must be at least 1"),
        (["--rounds", "0"], "argument --rounds: must be at least 1"),
        (["--min-run-time", "0"], "argument --min-run-time: must be a finite number above 0"),
        (["--device", "gpu"], "--device 'gpu'"),
    ],
)
def test_latency_mistakes_are_one_line(capsys, tmp_path, args, message):
    assert message in one_error_line(capsys, cli.main(["latency", "--out", str(tmp_path / "out"), *args]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["latency", "--device", "cuda", "--out", "OUT"],
        ["bench", "--device", "cuda:1", "--only", "memory"],
        ["sweep", "--device", "cuda", "--output", "OUT/t.jsonl", "--tasks", "t", "--thresholds", "-3"],
    ],
)
def test_every_cli_refuses_a_cuda_device_this_machine_lacks_the_same_way(capsys, tmp_path, argv):
    argv = [part.replace("OUT", str(tmp_path / "out")) for part in argv]
    line = one_error_line(capsys, cli.main(argv))
    assert "no CUDA GPU is visible here; use --device cpu" in line


def test_latency_out_and_from_json_mistakes_are_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in one_error_line(
        capsys, cli.main(["latency", "--out", str(tmp_path / "file")])
    )
    out = ["--out", str(tmp_path / "out"), "--from-json"]
    assert "no such file" in one_error_line(capsys, cli.main(["latency", *out, str(tmp_path / "missing.json")]))
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not readable JSON" in one_error_line(capsys, cli.main(["latency", *out, str(tmp_path / "bad.json")]))
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"surrogate": "x"}]}))
    line = one_error_line(capsys, cli.main(["latency", *out, str(tmp_path / "other.json")]))
    assert "is not a latency.json written by kvzap-eval latency" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ train


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens-per-prompt", "0"], "argument --tokens-per-prompt: must be at least 1"),
        (["--train-prompts", "-1"], "argument --train-prompts: must be at least 1"),
        (["--epochs", "0"], "argument --epochs: must be at least 1"),
        (["--threads", "0"], "argument --threads: must be at least 1"),
        (["--lr", "0"], "argument --lr: must be a finite number above 0"),
        (["--alpha", "nan"], "argument --alpha: must be a finite number above 0"),
        (["--target-ratio", "1.5"], "argument --target-ratio: must be between 0 and 1"),
        (["--window", "-1"], "argument --window: must be 0 or more"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--model", "/no/such/model"], "model directory '/no/such/model' does not exist"),
        (["--corpus", "/no/such/file.txt"], "corpus path '/no/such/file.txt' does not exist"),
    ],
)
def test_train_mistakes_are_one_line(capsys, tmp_path, args, message):
    code = train.main(["--out", str(tmp_path / "out"), *args])
    assert message in one_error_line(capsys, code, expected_code=2)
    assert not (tmp_path / "out").exists(), "nothing is created before the inputs are checked"


def test_train_out_that_is_a_file_or_cannot_be_created(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_error_line(capsys, train.main(["--out", str(tmp_path / "file")]), expected_code=2)
    assert "is a file, not a directory" in line
    line = one_error_line(capsys, train.main(["--out", str(tmp_path / "file" / "below")]), expected_code=2)
    assert "is a file, not a directory" in line
    assert "required: --out" in one_error_line(capsys, train.main([]), expected_code=2)


def test_train_force_with_a_bad_model_keeps_earlier_results(capsys, tmp_path):
    out = tmp_path / "out"
    (out / "KVzap-mlp-x").mkdir(parents=True)
    (out / "training_report.json").write_text("{}")
    code = train.main(["--out", str(out), "--force", "--model", str(tmp_path / "missing")])
    assert "does not exist" in one_error_line(capsys, code, expected_code=2)
    assert (out / "KVzap-mlp-x").is_dir() and (out / "training_report.json").is_file()


def test_train_refuses_an_unsupported_architecture_through_kvzap_eval(capsys, tmp_path, gpt2_dir):
    code = cli.main(["train", "--out", str(tmp_path / "out"), "--model", gpt2_dir])
    assert "architecture 'gpt2' is not supported" in one_error_line(capsys, code, expected_code=2)


def test_corpus_file_that_is_not_text_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CorpusError, match="weights.bin' is not UTF-8 text"):
        text_files([tmp_path / "weights.bin"])


# ------------------------------------------------------------------------------------- collection files on resume


@pytest.fixture
def collected(tmp_path, llama):
    from .test_collect_train import SMALL, write_corpus
    from .test_teacher import word_tokenizer

    tokenizer = word_tokenizer()
    corpus = build_corpus(tokenizer, CorpusConfig(files=(str(write_corpus(tmp_path / "corpus")),), n_train=2, **SMALL))
    config = CollectConfig(tokens_per_prompt=8, x_dtype="float32")
    directory = tmp_path / "data"
    collect(llama, tokenizer, corpus, directory, config, progress=False)
    return llama, tokenizer, corpus, directory, config


def test_resume_into_a_damaged_collection_file_is_refused(collected):
    llama, tokenizer, corpus, directory, config = collected
    x_file = directory / "X_001.npy"
    x_file.write_bytes(x_file.read_bytes()[:200])  # truncated
    with pytest.raises(OutputDirError, match="X_001.npy is missing or damaged.*--force"):
        collect(llama, tokenizer, corpus, directory, config, resume=True, progress=False)
    x_file.unlink()
    with pytest.raises(OutputDirError, match="X_001.npy is missing or damaged"):
        collect(llama, tokenizer, corpus, directory, config, resume=True, progress=False)


def test_resume_into_a_collection_file_of_another_shape_is_refused(collected):
    llama, tokenizer, corpus, directory, config = collected
    np.save(directory / "y.npy", np.zeros((3, 2, 2), dtype=np.float32))
    with pytest.raises(OutputDirError, match=r"y.npy holds \(3, 2, 2\) float32, this run needs"):
        collect(llama, tokenizer, corpus, directory, config, resume=True, progress=False)


def test_a_manifest_without_its_fields_is_refused(collected):
    directory = collected[3]
    (directory / "manifest.json").write_text(json.dumps({"done": []}))
    with pytest.raises(OutputDirError, match="is not a collection manifest \\(missing tokens_per_prompt"):
        CollectedData(directory)


# ---------------------------------------------------------------------------------------- policies, oracle


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
def test_policies_and_the_oracle_method_refuse_alpha_outside_the_unit_interval(alpha):
    with pytest.raises(ConfigError, match="alpha must be a number in \\[0, 1\\]"):
        FixedRatioPolicy(0.5, scope="layer", alpha=alpha)
    with pytest.raises(ConfigError, match="alpha"):
        MethodConfig(method="kvzip_plus", compression_ratio=0.5, alpha=alpha)


@pytest.mark.parametrize("window", [float("nan"), float("inf"), True, "8"])
def test_threshold_policy_refuses_windows_that_are_not_whole_numbers(window):
    with pytest.raises(ConfigError, match="window must be a non-negative integer"):
        ThresholdPolicy(-4.0, window)


# ---------------------------------------------------------------------------------------- lm-eval passthrough


def test_kvzap_eval_passthrough_ends_in_our_line(capsys, tmp_path):
    args = ["--model", "kvzap_hf", "--model_args", f"pretrained={tmp_path / 'missing'}", "--tasks",
            "kvzap_tiny_generation", "--include_path", TASKS]  # fmt: skip
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(f"error: model directory '{tmp_path / 'missing'}' does not exist"), err


def test_stock_lm_eval_prints_our_one_line_message_last(gpt2_dir, tmp_path):
    lm_eval = Path(sys.executable).parent / "lm_eval"
    args = [str(lm_eval), "--model", "kvzap_hf", "--model_args", f"pretrained={gpt2_dir}", "--tasks",
            "kvzap_tiny_generation", "--include_path", TASKS, "--output_path", str(tmp_path)]  # fmt: skip
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kvzap_eval.errors.UnsupportedModelError: architecture 'gpt2' is not supported"), last
