"""`kvzap-eval bench`: runtime benchmarks, each measured side by side in one run and printed as ratios.

(a) decode scorer call per layer, [1, 1, D] for D = 576 (SmolLM2) and 4096 (Qwen3-8B shape), MLP surrogate:
    our torch backend vs a kvpress-style call (`module.to(device, dtype)` + forward + transpose on every call);
(b) `generate` of N tokens after a ~1k-token prompt on SmolLM2: KVzap runtime vs the stock full cache;
(c) KV bytes held after prefill / full-cache bytes, beside the achieved compression ratio.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..cli_args import OneLineParser, check_writable_file, finite_float, positive_int
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
    """Median wall time of `generate` with the stock cache and with KVzap, alternated; plus the bytes of (c)."""
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
        with compress(model, method) as session:
            model(**inputs)  # prefill only, for (c)
            prefill = session.stats()
    full_s, kvzap_s = statistics.median(times["full"]), statistics.median(times["kvzap"])
    kv_bytes = sum(layer.kv_nbytes() for layer in session.cache.layers)
    return {
        "prompt_tokens": inputs["input_ids"].shape[1],
        "new_tokens": new_tokens,
        "threshold": method.policy.threshold,
        "full_s": full_s,
        "kvzap_s": kvzap_s,
        "time_ratio": kvzap_s / full_s,
        "prefill_compression_ratio": prefill.achieved_compression_ratio,
        "prefill_kv_bytes_fraction": kv_bytes / prefill.full_kv_nbytes,
        "prefill_all_bytes_fraction": prefill.bytes_fraction,
        "target_bytes_fraction": 1 - prefill.achieved_compression_ratio + 0.05,
    }


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="kvzap-eval bench", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--context-tokens", type=positive_int, default=1000)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threshold", type=finite_float, default=None)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None:
        check_writable_file(args.json, "--json")
    results = {"scorer": [row for t in dict.fromkeys(args.threads) for row in bench_scorer(t)]}
    print("(a) decode scorer call [1,1,D], MLP surrogate, median us per call")
    print("| shape | threads | kvpress-style | ours | ours / kvpress |\n|---|---|---|---|---|")
    for row in results["scorer"]:
        print(
            f"| {row['shape']} | {row['threads']} | {row['kvpress_style_us']:.1f} | {row['ours_us']:.1f} "
            f"| {row['ratio']:.2f}x |"
        )
    if not args.skip_generate:
        torch.set_num_threads(max(args.threads))
        gen = results["generate"] = bench_generate(args.context_tokens, args.new_tokens, args.repeats, args.threshold)
        print(
            f"\n(b) generate {gen['new_tokens']} tokens after {gen['prompt_tokens']} prompt tokens, SmolLM2, "
            f"tau={gen['threshold']}: full {gen['full_s']:.2f} s, KVzap {gen['kvzap_s']:.2f} s "
            f"-> {gen['time_ratio']:.3f}x"
        )
        print(
            f"(c) after prefill: compression ratio {gen['prefill_compression_ratio']:.3f}, KV bytes held / full "
            f"{gen['prefill_kv_bytes_fraction']:.3f} (with slot bookkeeping {gen['prefill_all_bytes_fraction']:.3f}); "
            f"target <= {gen['target_bytes_fraction']:.3f}"
        )
    if args.json is not None:
        try:
            write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write --json {args.json} ({exc.strerror}): give another path") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
