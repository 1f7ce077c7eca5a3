"""Decode attention over the ragged KV storage: one SDPA call per (batch, KV head) row against one SDPA over the rows
gathered into a masked rectangle, for one SmolLM2-shaped layer (3 KV heads, G = 3, d = 64) whose heads keep
different numbers of entries. Prints, per batch size, the median time of each (interleaved, side by side) and the
number of torch operators one call dispatches (on CUDA each is at least one kernel launch).

    python scripts/attention_layouts.py [--device cpu|cuda] [--batches 1 8 34] [--tokens 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvzap_eval.runtime.attention import gathered_attention, row_attention
from kvzap_eval.runtime.cache import CompactLayer
from kvzap_eval.runtime.policies import ThresholdPolicy

HEADS, GROUP, DIM = 3, 3, 64


def layer_for(batch: int, tokens: int, device: str) -> CompactLayer:
    """A layer after a pruned prefill of `tokens` per row (about a quarter kept, each head its own share) and one
    decode step's new entry."""
    torch.manual_seed(0)
    layer = CompactLayer()
    keys = torch.randn(batch, HEADS, tokens, DIM, device=device)
    layer.update(keys, keys.flip(-1))
    scale = torch.tensor([0.5, 1.0, 1.5], device=device)[None, :, None]  # heads keep different shares
    scores = torch.randn(batch, HEADS, tokens, device=device) * scale - 0.7
    layer.set_pending_scores(scores)
    layer.evict(ThresholdPolicy(0.0, window=128).decide(layer, scores), compact=True)
    new = torch.randn(batch, HEADS, 1, DIM, device=device)
    layer.update(new, new.flip(-1))
    return layer


def timed(function, layer, query, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        function(layer, query, 0.125)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / 20


def operators(function, layer, query, device: str) -> int:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        function(layer, query, 0.125)
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 34])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{args.device}, {args.tokens} tokens per row, {torch.get_num_threads()} thread(s)")
    print("| batch | entries per row | per row | gathered | gathered / per row | operators: per row, gathered |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        layer = layer_for(batch, args.tokens, args.device)
        query = torch.randn(batch, HEADS * GROUP, 1, DIM, device=args.device)
        torch.testing.assert_close(gathered_attention(layer, query, 0.125), row_attention(layer, query, 0.125),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        times = {row_attention: [], gathered_attention: []}
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            for function in times:
                times[function].append(timed(function, layer, query, args.device))
        per_row, gathered = (statistics.median(times[f]) * 1e6 for f in (row_attention, gathered_attention))
        ops = [operators(f, layer, query, args.device) for f in (row_attention, gathered_attention)]
        kept = f"{int(layer.count.min())}-{int(layer.count.max())}"
        print(f"| {batch} | {kept} | {per_row:,.0f} µs | {gathered:,.0f} µs | {gathered / per_row:.2f}x"
              f" | {ops[0]}, {ops[1]} |")  # fmt: skip


if __name__ == "__main__":
    main()
