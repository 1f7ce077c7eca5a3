"""Data parallel `kvzap_hf` and sweeps under `accelerate launch` (two CPU processes), and sweep shards.

On a machine without GPUs, `accelerate launch --cpu` starts a single process unless MPI is set up; two gloo
processes come from accelerate's torchrun launcher with `ACCELERATE_USE_CPU=true` (see README "Several GPUs and
nodes"). Every comparison is against one process evaluating the same requests.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from kvzap_eval.errors import ConfigError  # noqa: E402
from kvzap_eval.evaluation.sweep import Shard, merge_tables, read_table, run_sweep  # noqa: E402

from .lmeval_helpers import ENV, TASKS  # noqa: E402
from .lmeval_helpers import sweep_config as tiny_sweep  # noqa: E402

BIN = Path(sys.executable).parent
#: lengths are labels for the tiny tasks (they ignore them): two (task, length) groups to shard
LENGTHS = [512, 1024]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*program: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` of `program` over `processes` CPU processes."""
    args = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes)]
    args += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args += ["--main_process_port", str(free_port()), *program]
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def lm_eval_args(tiny) -> list[str]:
    """kvzap_hf on the tiny model; the caller adds tasks, limit and output."""
    model_args = f"pretrained={tiny['model']},surrogate={tiny['surrogate']},threshold=0,window=8,dtype=float32"
    return ["--model", "kvzap_hf", "--model_args", model_args, "--include_path", TASKS]


def results_of(output: Path) -> tuple[dict, dict[str, dict]]:
    [results_file] = list(output.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    samples = {}
    for path in output.rglob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            samples[(path.name.split("_2")[0], sample["doc_id"])] = sample["filtered_resps"]
    return results, samples


def leaves(value) -> list:
    """A sample's answers or a task's metrics, flattened, numeric strings as floats."""
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in [key, *leaves(value[key])]]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in leaves(item)]
    if isinstance(value, str):
        try:
            return [float(value)]
        except ValueError:
            return [value]
    return [value]


def same(one, two) -> bool:
    """Equal texts and flags; numbers equal to float32 rounding."""
    a, b = leaves(one), leaves(two)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, float) and isinstance(y, float):
            if x != pytest.approx(y, rel=1e-6):
                return False
        elif x != y:
            return False
    return True


def test_accelerate_data_parallel_equals_one_process(tiny, tmp_path):
    # 3 samples over 2 ranks: lm-eval pads rank 1 with copies (and rank 0 with extra perplexity windows), which must
    # not count in the statistics
    tasks = "kvzap_tiny_generation,kvzap_tiny_choice,kvzap_tiny_rolling"
    common = ["--tasks", tasks, "--limit", "3", "--log_samples"]
    single = subprocess.run(
        [str(BIN / "lm_eval"), *lm_eval_args(tiny), *common, "--output_path", str(tmp_path / "one")],
        env={**ENV, "OMP_NUM_THREADS": "1"},  # the ranks' thread count: the same float sums
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    launch("-m", "lm_eval", *lm_eval_args(tiny), *common, "--output_path", str(tmp_path / "two"))

    one, one_samples = results_of(tmp_path / "one")
    two, two_samples = results_of(tmp_path / "two")
    # same per-sample answers: generations and choices exactly, log-likelihoods to float32 rounding (two processes
    # may sum in another order: BLAS paths depend on memory alignment)
    assert len(one_samples) == 9 and one_samples.keys() == two_samples.keys()
    for key, answer in one_samples.items():
        assert same(answer, two_samples[key]), key
    assert same(one["results"], two["results"])
    kv_one, kv_two = one["config"]["kvzap"], two["config"]["kvzap"]
    assert (kv_one["ranks"], kv_two["ranks"]) == (1, 2)
    windows = kv_one["requests"] - 3 - 3 * 3
    assert windows > 3, "the perplexity texts span several windows"
    assert kv_two["requests"] == kv_one["requests"], "padding copies and windows are not counted"
    figures = ("achieved_compression_ratio", "held_kv_bytes", "kept_kv_bytes", "full_kv_bytes")
    for key in figures:
        assert kv_two[key] == pytest.approx(kv_one[key], rel=1e-12), key
    assert kv_two["achieved_compression_ratio_per_task"] == pytest.approx(kv_one["achieved_compression_ratio_per_task"])
    assert kv_two["scorer_calls_per_layer"] == kv_one["scorer_calls_per_layer"]


FIGURES = ("accuracy", "n", "compression_ratio", "kv_bytes_fraction", "setting_ratio")


def figures(rows: list[dict]) -> dict[str, tuple]:
    return {row["key"]: tuple(row[name] for name in FIGURES) for row in rows}


def test_shards_merge_into_the_unsharded_table_without_duplicates(tiny, tmp_path):
    whole = run_sweep(tiny_sweep(tiny, tmp_path / "whole.jsonl", lengths=LENGTHS))
    shard_rows = []
    for index in range(2):
        path = tmp_path / f"shard{index}.jsonl"
        shard_rows.append(run_sweep(tiny_sweep(tiny, path, lengths=LENGTHS, shard=Shard(index, 2))))
    assert {row["length"] for row in shard_rows[0]} == {512} and {row["length"] for row in shard_rows[1]} == {1024}
    merged = tmp_path / "merged.jsonl"
    assert merge_tables(merged, [tmp_path / "shard0.jsonl", tmp_path / "shard1.jsonl"]) == (6, 6)
    assert figures(read_table(merged)) == figures(whole)
    # a shard merged again (or a shard's rerun) adds nothing
    assert merge_tables(merged, [tmp_path / "shard1.jsonl", tmp_path / "shard1.jsonl"]) == (6, 0)
    assert len(read_table(merged)) == 6
    # one key with two different results is refused, and the merged table is left as it was
    conflicting = tmp_path / "conflict.jsonl"
    first = read_table(tmp_path / "shard0.jsonl")[0]
    row = {**first, "accuracy": 0.5 if first["accuracy"] != 0.5 else 0.25}
    conflicting.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match="different results"):
        merge_tables(merged, [conflicting])
    assert len(read_table(merged)) == 6


def test_accelerate_sweep_equals_one_process(tiny, tmp_path):
    single = run_sweep(tiny_sweep(tiny, tmp_path / "one.jsonl"))
    launch(
        "-m", "kvzap_eval", "sweep", "--output", str(tmp_path / "two.jsonl"), "--tasks", "kvzap_tiny_generation",
        "--lengths", "1024", "--methods", "full", "kvzap_mlp", "random", "--thresholds", "0", "--limit", "3",
        "--include-path", TASKS, "--pretrained", tiny["model"], "--no-chat-template",
        "--model-args", f"surrogate={tiny['surrogate']},window=8",
    )  # fmt: skip
    rows = read_table(tmp_path / "two.jsonl")
    assert len(rows) == 3 and {row["ranks"] for row in rows} == {2}, "rank 0 alone writes, once per run"
    assert figures(rows) == figures(single)


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "0/0", "-1/2"])
def test_bad_shard_is_refused(text):
    with pytest.raises(ConfigError, match="--shard"):
        Shard.parse(text)


def test_bad_sweep_model_args_are_refused():
    from kvzap_eval.evaluation.sweep import parse_model_args

    assert parse_model_args("window=64,backend=onnxruntime") == {"window": 64, "backend": "onnxruntime"}
    with pytest.raises(ConfigError, match="name=value"):
        parse_model_args("threshold=-3")
    with pytest.raises(ConfigError, match="window"):
        parse_model_args("window=big")
