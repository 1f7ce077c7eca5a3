"""`kvzap-eval bench`: runtime benchmarks, each measured side by side in one run and printed as ratios.

Sub-benchmarks (`--only`, default all):
- scorer: decode scorer call per layer, [1, 1, D] for D = 576 (SmolLM2) and 4096 (Qwen3-8B shape), MLP surrogate:
  our torch backend vs a kvpress-style call (`module.to(device, dtype)` + forward + transpose on every call);
- generate: `generate` of N tokens after a ~1k-token prompt on SmolLM2: KVzap runtime vs the stock full cache;
- memory, decode, capacity: what the ragged KV storage makes of compression (bytes held, decode time, capacity
  under a budget), see `bench_kv.py`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..cli_args import (
    OneLineParser,
    batch_by_tokens,
    check_device,
    check_writable_file,
    finite_float,
    positive_float,
    positive_int,
)
from ..errors import ConfigError
from ..runtime.backends import TorchBackend
from ..surrogate import KVzapSurrogate, SurrogateConfig
from .latency import kvpress_style, time_interleaved

SCORER_SHAPES = {"SmolLM2-135M (D=576)": (576, 3), "Qwen3-8B (D=4096)": (4096, 8)}


def bench_scorer(threads: int, min_run_time: float = 1.0) -> list[dict]:
    """Seconds per decode call, ours vs kvpress-style, for each shape (same weights, same thread count), timed
    side by side by `latency.time_interleaved` (best of 3 interleaved rounds' medians)."""
    torch.set_num_threads(threads)
    rows = []
    for label, (dim, heads) in SCORER_SHAPES.items():
        surrogate = KVzapSurrogate(SurrogateConfig(input_dim=dim, output_dim=heads, n_modules=1, hidden_dim=dim // 8))
        surrogate.eval().requires_grad_(False)
        backend = TorchBackend(surrogate, [(torch.device("cpu"), torch.float32)])
        reference = kvpress_style(surrogate)
        hidden = torch.randn(1, 1, dim)
        calls = {"kvpress_style": lambda f=reference, h=hidden: f(0, h), "ours": lambda b=backend, h=hidden: b(0, h)}
        seconds = time_interleaved(calls, threads, min_run_time, rounds=3, device=torch.device("cpu"))
        us = {name: 1e6 * value for name, value in seconds.items()}
        rows.append(
            {
                "shape": label,
                "threads": threads,
                **{f"{k}_us": v for k, v in us.items()},
                "ratio": us["ours"] / us["kvpress_style"],
            }
        )
    return rows


def bench_generate(context_tokens: int, new_tokens: int, repeats: int, threshold: float | None) -> dict:
    """Median wall time of `generate` with the stock cache and with KVzap, alternated."""
    from ..llm.loading import load_causal_lm
    from ..runtime.methods import build_method
    from ..runtime.session import compress
    from .demo import needle_prompt

    model, tokenizer = load_causal_lm()
    text, _ = needle_prompt(tokenizer, context_tokens)
    inputs = tokenizer(text, return_tensors="pt")
    method = build_method(model, threshold=threshold)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    times = {"full": [], "kvzap": []}
    with torch.no_grad():
        model.generate(**inputs, **settings)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**inputs, **settings)
            times["full"].append(time.perf_counter() - start)
            with compress(model, method) as session:
                start = time.perf_counter()
                model.generate(**inputs, **settings)
                times["kvzap"].append(time.perf_counter() - start)
                stats = session.stats()
    full_s, kvzap_s = statistics.median(times["full"]), statistics.median(times["kvzap"])
    return {
        "prompt_tokens": inputs["input_ids"].shape[1],
        "new_tokens": new_tokens,
        "threshold": method.policy.threshold,
        "full_s": full_s,
        "kvzap_s": kvzap_s,
        "full_s_all": times["full"],
        "kvzap_s_all": times["kvzap"],
        "time_ratio": kvzap_s / full_s,
        "achieved_compression_ratio": stats.achieved_compression_ratio,
        "held_kv_bytes_fraction": stats.held_kv_bytes_fraction,
    }


BENCHMARKS = ("scorer", "generate", "memory", "decode", "capacity")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="kvzap-eval bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="sub-benchmarks")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--repeats", type=positive_int, default=5, help="generate: runs; decode: blocks (each)")
    parser.add_argument("--threshold", type=finite_float, default=None, help="generate: tau (default the surrogate's)")
    parser.add_argument("--context-tokens", type=positive_int, default=1000, help="generate: prompt tokens")
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="generate: tokens generated")
    parser.add_argument("--memory-taus", type=finite_float, nargs="+", default=[-5.0, -4.0, -3.0, -2.0])
    parser.add_argument("--memory-batches", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--memory-context-tokens", type=positive_int, default=4000)
    parser.add_argument("--memory-new-tokens", type=positive_int, default=16, help="memory, capacity: decode steps")
    parser.add_argument("--decode-runs", type=batch_by_tokens, nargs="+", default=[(1, 4000), (1, 8000), (8, 4000)],
                        metavar="BxT", help="decode: batch x prompt tokens, e.g. 1x4000 8x4000")  # fmt: skip
    parser.add_argument("--decode-steps", type=positive_int, default=16, help="decode: steps per timed block")
    parser.add_argument("--decode-threshold", type=finite_float, default=-3.0, help="decode, capacity: tau")
    parser.add_argument("--budget-mib", type=positive_float, default=256.0, help="capacity: KV budget")
    parser.add_argument("--capacity-contexts", type=positive_int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--device", default="cpu", help="memory, decode, capacity: cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="KV benchmarks")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None:
        check_writable_file(args.json, "--json")
    if len(args.capacity_contexts) < 2 and "capacity" in args.only:
        raise ConfigError("--capacity-contexts needs at least two prompt lengths (bytes per token come from two)")
    device = None
    if {"memory", "decode", "capacity"} & set(args.only):
        check_device(args.device)
        device = args.device
    results: dict = {}
    if "scorer" in args.only:
        results["scorer"] = [row for t in dict.fromkeys(args.threads) for row in bench_scorer(t)]
        print("(scorer) decode scorer call [1,1,D], MLP surrogate, median us per call")
        print("| shape | threads | kvpress-style | ours | ours / kvpress |\n|---|---|---|---|---|")
        for row in results["scorer"]:
            print(
                f"| {row['shape']} | {row['threads']} | {row['kvpress_style_us']:.1f} | {row['ours_us']:.1f} "
                f"| {row['ratio']:.2f}x |"
            )
    torch.set_num_threads(max(args.threads))
    if "generate" in args.only:
        gen = results["generate"] = bench_generate(args.context_tokens, args.new_tokens, args.repeats, args.threshold)
        print(
            f"\n(generate) {gen['new_tokens']} tokens after {gen['prompt_tokens']} prompt tokens, SmolLM2, "
            f"tau={gen['threshold']}: full {gen['full_s']:.2f} s, KVzap {gen['kvzap_s']:.2f} s "
            f"-> {gen['time_ratio']:.3f}x (compression {gen['achieved_compression_ratio']:.3f}, held / full "
            f"{gen['held_kv_bytes_fraction']:.3f})"
        )
    if device is not None:
        _run_kv_benchmarks(args, device, results)
    if args.json is not None:
        try:
            write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write --json {args.json} ({exc.strerror}): give another path") from None
    return 0


def _run_kv_benchmarks(args, device: str, results: dict) -> None:
    from ..llm.loading import load_causal_lm
    from . import bench_kv

    model, tokenizer = load_causal_lm(dtype=getattr(torch, args.dtype), device=device)
    with torch.no_grad():
        if "memory" in args.only:
            results["memory"] = bench_kv.bench_memory(
                model, tokenizer, args.memory_taus, args.memory_batches, args.memory_context_tokens,
                args.memory_new_tokens, device,
            )  # fmt: skip
            bench_kv.print_memory(results["memory"])
        if "decode" in args.only:
            results["decode"] = bench_kv.bench_decode(
                model, tokenizer, args.decode_runs, args.decode_threshold, args.decode_steps, args.repeats, device
            )
            bench_kv.print_decode(results["decode"])
        if "capacity" in args.only:
            results["capacity"] = bench_kv.bench_capacity(
                model, tokenizer, args.decode_threshold, args.budget_mib, args.capacity_contexts,
                args.memory_context_tokens, args.memory_new_tokens, device,
            )  # fmt: skip
            bench_kv.print_capacity(results["capacity"])


if __name__ == "__main__":
    raise SystemExit(main())
