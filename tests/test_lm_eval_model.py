"""The lm-eval model `kvzap_hf` on a tiny local model: protocols, loglikelihood under compression, batching,
statistics, the stock `lm_eval` and `kvzap-eval` commands, and bad model_args."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from kvzap_eval.errors import CheckpointError, ConfigError  # noqa: E402
from kvzap_eval.evaluation.lm_eval_model import KVzapHFLM  # noqa: E402
from kvzap_eval.evaluation.protocol import chunk_widths, split_context_question  # noqa: E402
from kvzap_eval.surrogate import random_surrogate, save_surrogate  # noqa: E402

from .lmeval_helpers import ENV, TASKS  # noqa: E402


def make_lm(tiny, **model_args):
    settings = dict(pretrained=tiny["model"], device="cpu", dtype="float32")
    if model_args.get("method", "kvzap") in ("kvzap", "kvzap_adakv"):
        settings["surrogate"] = tiny["surrogate"]  # only the KVzap methods take a surrogate
    settings.update(model_args)
    return KVzapHFLM(**settings)


def evaluate(lm, tasks, **kwargs):
    manager = TaskManager(include_path=TASKS, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, bootstrap_iters=0, **kwargs)


def requests(kind: str, pairs, task="kvzap_tiny"):
    return [Instance(kind, {}, pair, i, metadata=(task, i, 1)) for i, pair in enumerate(pairs)]


CHOICE_PAIRS = [
    ("alpha bravo charlie delta echo foxtrot golf hotel " * 6, " india juliet kilo"),
    ("lima mike november oscar papa " * 5, " quebec"),
    ("one two three four five six seven eight nine ten " * 4, " eleven twelve"),
]


def test_loglikelihood_reflects_compression(tiny):
    plain = HFLM(pretrained=tiny["model"], device="cpu", dtype="float32").loglikelihood(
        requests("loglikelihood", CHOICE_PAIRS)
    )
    untouched = make_lm(tiny, method="random", compression_ratio=0.0).loglikelihood(
        requests("loglikelihood", CHOICE_PAIRS)
    )
    pruned = make_lm(tiny, method="random", compression_ratio=0.9).loglikelihood(
        requests("loglikelihood", CHOICE_PAIRS)
    )
    for (p, _), (u, _), (c, _) in zip(plain, untouched, pruned):
        assert u == pytest.approx(p, abs=1e-3), "ratio 0 equals the full cache"
        assert abs(c - p) > 1e-2, "aggressive pruning changes the scores"


def test_batch_size_does_not_change_answers(tiny):
    pairs = [(p, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for p, _ in CHOICE_PAIRS]
    one = make_lm(tiny, threshold=0.0, window=8, batch_size=1)
    three = make_lm(tiny, threshold=0.0, window=8, batch_size=3)
    assert one.generate_until(requests("generate_until", pairs)) == three.generate_until(
        requests("generate_until", pairs)
    )
    scored_one = one.loglikelihood(requests("loglikelihood", CHOICE_PAIRS))
    scored_three = three.loglikelihood(requests("loglikelihood", CHOICE_PAIRS))
    for (a, ga), (b, gb) in zip(scored_one, scored_three):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb


def test_paper_protocol_processes_the_question_against_the_pruned_context(tiny):
    lm = make_lm(tiny, threshold=0.0, window=8, batch_size=2)
    results = evaluate(lm, ["kvzap_tiny_generation"], log_samples=True)
    info = results["config"]["kvzap"]
    assert info["protocol"] == "paper"
    assert 0.0 < info["achieved_compression_ratio"] < 1.0
    assert 0.0 < info["kept_kv_bytes_fraction"] <= info["held_kv_bytes_fraction"] < 1.0
    assert set(info["achieved_compression_ratio_per_task"]) == {"kvzap_tiny_generation"}
    assert len(info["scorer_latency_us_per_layer"]["prefill"]) == 2
    per_sample = [s["kv_compression"] for s in results["samples"]["kvzap_tiny_generation"]]
    assert all(0.0 < r < 1.0 for r in per_sample)
    assert results["results"]["kvzap_tiny_generation"]["kv_compression,none"] == pytest.approx(
        sum(per_sample) / len(per_sample)
    )


def test_protocols_agree_without_evictions_and_differ_with_them(tiny):
    prompts = [
        (p + "\nQuestion: what next?", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})
        for p, _ in CHOICE_PAIRS
    ]

    def run(**args):
        lm = make_lm(tiny, window=4, **args)
        reqs = requests("generate_until", prompts)
        for r in reqs:
            r.doc = {"kvzap_question": "\nQuestion: what next?"}
        return lm.generate_until(reqs)

    assert run(threshold=-1e9) == run(threshold=-1e9, protocol="dense") == run(threshold=-1e9, prefill_chunk=16)
    assert run(threshold=0.5) != run(threshold=0.5, protocol="dense")


def test_split_and_chunks():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch = split_context_question(ids, mask, [1, 2])
    assert batch.input_ids.tolist() == [[0, 5, 6, 7, 0, 8], [1, 2, 3, 4, 5, 6]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]]
    assert batch.prefill_chunks == [4]
    assert chunk_widths(10, 4) == [4, 4, 1]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"thresold": -5}, "unknown model_arg 'thresold'.*did you mean 'threshold'"),
        ({"method": "random", "threshold": -5, "compression_ratio": 0.5}, "method random does not take threshold"),
        ({"compression_ratio": 0.5}, "method kvzap does not take compression_ratio"),
        ({"protocol": "magic"}, "protocol must be one of"),
        ({"protocol": "chunked"}, "needs prefill_chunk"),
        ({"decoding": "maybe"}, "true or false"),
    ],
)
def test_bad_model_args_fail_clearly(tiny, args, message):
    with pytest.raises(ConfigError, match=message):
        make_lm(tiny, **args)


def test_surrogate_for_another_model_is_refused(tiny, tmp_path):
    other = random_surrogate(
        LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(CheckpointError, match="input_dim=32 does not match the model's hidden_size=64"):
        make_lm(tiny, surrogate=str(save_surrogate(other, tmp_path / "other")))


def test_prompt_longer_than_max_length_is_an_error(tiny):
    lm = make_lm(tiny, threshold=0.0, max_length=64)
    reqs = requests("generate_until", [("word " * 200, {"until": ["\n"], "max_gen_toks": 4})])
    with pytest.raises(ConfigError, match="exceeds max_length 64"):
        lm.generate_until(reqs)


def test_cuda_device_without_cuda_falls_back_to_cpu(tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    lm = make_lm(tiny, threshold=0.0, device="cuda:0")
    assert lm.device.type == "cpu"


@pytest.mark.parametrize("command", [["lm_eval"], ["kvzap-eval"]])
def test_stock_lm_eval_command_runs_kvzap_hf(tiny, tmp_path, command):
    executable = Path(sys.executable).parent / command[0]
    args = [
        str(executable),
        "--model",
        "kvzap_hf",
        "--model_args",
        f"pretrained={tiny['model']},surrogate={tiny['surrogate']},threshold=0,window=8,dtype=float32",
        "--device",
        "cpu",
        "--include_path",
        TASKS,
        "--tasks",
        "kvzap_tiny_generation",
        "--output_path",
        str(tmp_path),
        "--log_samples",
    ]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [results_file] = list(tmp_path.rglob("results_*.json"))
    config = json.loads(results_file.read_text())["config"]
    assert config["model"] == "kvzap_hf"
    assert config["kvzap"]["threshold"] == 0.0
    assert 0.0 < config["kvzap"]["achieved_compression_ratio"] < 1.0
    assert list(tmp_path.rglob("samples_kvzap_tiny_generation_*.jsonl"))


def test_kvzip_plus_oracle_prunes_the_context_at_its_ratio(tiny):
    lm = make_lm(tiny, method="kvzip_plus", compression_ratio=0.5, batch_size=2)
    results = evaluate(lm, ["kvzap_tiny_generation", "kvzap_tiny_choice"])
    per_task = results["config"]["kvzap"]["achieved_compression_ratio_per_task"]
    assert per_task["kvzap_tiny_generation"] == pytest.approx(0.5, abs=0.08)  # the question is not pruned
    assert per_task["kvzap_tiny_choice"] == pytest.approx(0.5, abs=0.08)
