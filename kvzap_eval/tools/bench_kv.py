"""`kvzap-eval bench` memory, decode and capacity: what the ragged KV storage turns compression into, on SmolLM2.

- memory: KV bytes held (allocated: arenas, free slots and bookkeeping) / full-cache bytes beside the target
  (1 - achieved compression) + 0.03, at several taus, after `generate` on ~4k-token prompts, batch 1 and batch 4
  (four different prompts, left-padded);
- decode: milliseconds per greedy decode step, full cache (stock `DynamicCache`) vs KVzap, for each BxT run (batch B
  of T-token prompts): both prefill the prompts (not timed), then decode in alternating blocks of `steps` steps,
  `repeats` blocks each; the median block;
- capacity: under a KV budget, the longest prompt and the largest batch of ~4k-token prompts each cache can serve.
  A full cache holds exactly `full bytes per token` x tokens (the model's shape). KVzap's bytes are measured on real
  runs: batch-1 prompts of several lengths give the bytes held per prompt; beyond the longest one measured (SmolLM2
  stops at 8,192 positions) the prompt length is extrapolated with the bytes per token of the last measured
  segment. A batch of four ~4k prompts gives the bytes held per row; the largest batch is the budget divided by it.

Prompts are the demo's needle prompts (a number hidden in a filler haystack), one seed per batch row, each row a
little shorter than the previous one so that batches are padded.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..runtime.methods import build_method
from ..runtime.session import compress
from ..runtime.stats import CompressionStats
from .demo import needle_prompt

#: Slack in the memory target: bytes held / full <= (1 - achieved compression) + this.
MEMORY_TARGET_SLACK = 0.03
#: Capacity target: KVzap serves >= this / (1 - compression) times what the full cache serves.
CAPACITY_TARGET_FACTOR = 0.9
#: Each batch row's prompt is this many tokens shorter than the previous row's.
ROW_STEP_TOKENS = 100


def prompts(tokenizer, batch: int, context_tokens: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A left-padded batch of `batch` different needle prompts of about `context_tokens` tokens."""
    texts = [needle_prompt(tokenizer, context_tokens - ROW_STEP_TOKENS * row, seed=row)[0] for row in range(batch)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, inputs: dict, new_tokens: int, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
    )


def kvzap_stats(model, method, inputs: dict, new_tokens: int) -> CompressionStats:
    """The cache statistics after KVzap `generate`s `new_tokens` tokens from `inputs`."""
    with compress(model, method) as session:
        _generate(model, inputs, new_tokens)
        return session.stats()


# --- memory --------------------------------------------------------------------------------------------------------
def bench_memory(model, tokenizer, taus, batches, context_tokens: int, new_tokens: int, device: str) -> list[dict]:
    """Per (batch, tau): achieved compression, bytes held / full and kept / full, the target and whether it is met."""
    rows = []
    for batch in batches:
        inputs = prompts(tokenizer, batch, context_tokens, device)
        width = inputs["input_ids"].shape[1]
        for tau in taus:
            stats = kvzap_stats(model, build_method(model, threshold=tau), inputs, new_tokens)
            target = 1 - stats.achieved_compression_ratio + MEMORY_TARGET_SLACK
            rows.append(
                {
                    "batch": batch,
                    "prompt_tokens": width,  # the longest row's; the others are padded to it
                    "new_tokens": new_tokens,
                    "threshold": tau,
                    "achieved_compression_ratio": stats.achieved_compression_ratio,
                    "held_kv_bytes": stats.held_kv_bytes,
                    "kept_kv_bytes": stats.kept_kv_bytes,
                    "full_kv_bytes": stats.full_kv_bytes,
                    "held_kv_bytes_fraction": stats.held_kv_bytes_fraction,
                    "kept_kv_bytes_fraction": stats.kept_kv_bytes_fraction,
                    "target_held_kv_bytes_fraction": target,
                    "met": stats.held_kv_bytes_fraction <= target,
                }
            )
    return rows


# --- decode --------------------------------------------------------------------------------------------------------
def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class Decoding:
    """One greedy decoding in progress: its cache, the 2-D mask so far, the next tokens and their positions."""

    cache: object
    mask: torch.Tensor
    tokens: torch.Tensor  # (B, 1)
    positions: torch.Tensor  # (B, 1)

    def forward(self, model, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        out = model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{_cache_kwarg(model): self.cache})  # fmt: skip
        self.tokens = out.logits[:, -1:].argmax(-1)

    def steps(self, model, n: int) -> float:
        """Seconds per step of `n` greedy decode steps."""
        device = self.mask.device
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            self.mask = torch.cat((self.mask, self.mask.new_ones(self.mask.shape[0], 1)), dim=1)
            self.forward(model, self.tokens, self.positions)
            self.positions = self.positions + 1
        _sync(device)
        return (time.perf_counter() - start) / n


def prefilled(model, inputs: dict, cache) -> Decoding:
    """Prefill the prompts into `cache` (positions counted over real tokens, as `generate` does)."""
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    state = Decoding(cache, mask, None, positions[:, -1:] + 1)
    state.forward(model, inputs["input_ids"], positions)
    return state


def bench_decode(model, tokenizer, runs, threshold: float, steps: int, repeats: int, device: str) -> list[dict]:
    """Per BxT run: median ms per decode step, full cache vs KVzap, measured in alternating blocks of `steps` steps
    (`repeats` blocks each) that continue the same two decodings, so both share any drift of the machine."""
    rows = []
    method = build_method(model, threshold=threshold)
    for batch, context_tokens in runs:
        inputs = prompts(tokenizer, batch, context_tokens, device)
        full = prefilled(model, inputs, DynamicCache(config=model.config))
        with compress(model, method) as session:
            kvzap = prefilled(model, inputs, session.new_cache())
            prefill_stats = session.stats()
        seconds = {"full": [], "kvzap": []}
        for _ in range(repeats):
            seconds["full"].append(full.steps(model, steps))
            with compress(model, method) as session:
                seconds["kvzap"].append(kvzap.steps(model, steps))
                stats = session.stats()
        full_ms, kvzap_ms = (1e3 * statistics.median(seconds[name]) for name in ("full", "kvzap"))
        rows.append(
            {
                "batch": batch,
                "prompt_tokens": inputs["input_ids"].shape[1],
                "steps": steps * repeats,
                "threshold": threshold,
                "prefill_achieved_compression_ratio": prefill_stats.achieved_compression_ratio,
                "achieved_compression_ratio": stats.achieved_compression_ratio,
                "held_kv_bytes_fraction": stats.held_kv_bytes_fraction,
                "full_ms_per_step": full_ms,
                "kvzap_ms_per_step": kvzap_ms,
                "full_tokens_per_s": 1e3 * batch / full_ms,
                "kvzap_tokens_per_s": 1e3 * batch / kvzap_ms,
                "speedup": full_ms / kvzap_ms,
                "full_ms_per_block": [1e3 * s for s in seconds["full"]],
                "kvzap_ms_per_block": [1e3 * s for s in seconds["kvzap"]],
            }
        )
    return rows


# --- capacity ------------------------------------------------------------------------------------------------------
def longest_prompt(points: list[tuple[int, int]], budget: int) -> float:
    """Tokens of the longest prompt whose bytes fit `budget`, from measured (tokens, bytes held) points: interpolated
    between measured points, extrapolated past the last with the bytes per token of the last segment."""
    points = sorted(points)
    for (n0, b0), (n1, b1) in zip(points, points[1:]):
        if b1 >= budget:
            return n0 + (budget - b0) * (n1 - n0) / (b1 - b0)
    (n0, b0), (n1, b1) = points[-2], points[-1]
    return n1 + (budget - b1) * (n1 - n0) / (b1 - b0)


def bench_capacity(
    model, tokenizer, threshold: float, budget_mib: float, contexts, batch_context: int, new_tokens: int, device: str
) -> dict:
    """Longest prompt and largest batch of ~`batch_context`-token prompts under the budget: full cache vs KVzap."""
    budget = int(budget_mib * 2**20)
    method = build_method(model, threshold=threshold)
    points, ratios = [], []
    for context in contexts:
        inputs = prompts(tokenizer, 1, context, device)
        stats = kvzap_stats(model, method, inputs, new_tokens)
        tokens = stats.layers[0].logical_length
        points.append((tokens, stats.held_kv_bytes))
        ratios.append(stats.achieved_compression_ratio)
    full_per_token = stats.full_kv_bytes / tokens
    batch = 4
    inputs = prompts(tokenizer, batch, batch_context, device)
    batch_stats = kvzap_stats(model, method, inputs, new_tokens)
    held_per_row = batch_stats.held_kv_bytes / batch
    full_per_row = batch_stats.full_kv_bytes / batch  # a full cache holds every row at the padded length
    full_longest, kvzap_longest = budget / full_per_token, longest_prompt(points, budget)
    full_batch, kvzap_batch = int(budget // full_per_row), int(budget // held_per_row)
    compression = batch_stats.achieved_compression_ratio
    return {
        "budget_mib": budget_mib,
        "threshold": threshold,
        "measured_prompts": [
            {"tokens": n, "held_kv_bytes": b, "achieved_compression_ratio": r} for (n, b), r in zip(points, ratios)
        ],
        "full_kv_bytes_per_token": full_per_token,
        "full_longest_prompt": full_longest,
        "kvzap_longest_prompt": kvzap_longest,
        "longest_prompt_ratio": kvzap_longest / full_longest,
        "longest_prompt_target": CAPACITY_TARGET_FACTOR / (1 - ratios[-1]),
        "batch_prompt_tokens": batch_stats.layers[0].logical_length - new_tokens,
        "batch_achieved_compression_ratio": compression,
        "full_kv_bytes_per_row": full_per_row,
        "held_kv_bytes_per_row": held_per_row,
        "full_batch": full_batch,
        "kvzap_batch": kvzap_batch,
        "batch_ratio": kvzap_batch / full_batch if full_batch else float("inf"),
        "batch_ratio_unrounded": full_per_row / held_per_row,
        "batch_target": CAPACITY_TARGET_FACTOR / (1 - compression),
    }


# --- printing ------------------------------------------------------------------------------------------------------
def print_memory(rows: list[dict]) -> None:
    print("\n(memory) KV bytes after generate, SmolLM2: held (allocated) and kept / full cache")
    print("| batch | prompt tokens | tau | compression | held / full | kept / full | target held <= | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['prompt_tokens']} | {r['threshold']:g} | {r['achieved_compression_ratio']:.3f} "
            f"| {r['held_kv_bytes_fraction']:.3f} | {r['kept_kv_bytes_fraction']:.3f} "
            f"| {r['target_held_kv_bytes_fraction']:.3f} | {'yes' if r['met'] else 'NO'} |"
        )


def print_decode(rows: list[dict]) -> None:
    print("\n(decode) ms per decode step (median), full cache vs KVzap, side by side")
    print("| batch x tokens | tau | compression | held / full | full ms | KVzap ms | speedup | KVzap tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} x {r['prompt_tokens']} | {r['threshold']:g} | {r['achieved_compression_ratio']:.3f} "
            f"| {r['held_kv_bytes_fraction']:.3f} | {r['full_ms_per_step']:.1f} | {r['kvzap_ms_per_step']:.1f} "
            f"| {r['speedup']:.2f}x | {r['kvzap_tokens_per_s']:.1f} |"
        )


def print_capacity(r: dict) -> None:
    print(f"\n(capacity) under {r['budget_mib']:g} MiB of KV, tau {r['threshold']:g}")
    measured = ", ".join(
        f"{p['tokens']} tokens: {p['held_kv_bytes'] / 2**20:.1f} MiB "
        f"(compression {p['achieved_compression_ratio']:.3f})"
        for p in r["measured_prompts"]
    )
    print(f"KVzap bytes held, batch 1: {measured}; full cache {r['full_kv_bytes_per_token'] / 1024:.1f} KiB per token")
    print(
        f"longest prompt: full {r['full_longest_prompt']:.0f} tokens, KVzap {r['kvzap_longest_prompt']:.0f} "
        f"-> {r['longest_prompt_ratio']:.2f}x (target >= {r['longest_prompt_target']:.2f}x)"
    )
    print(
        f"largest batch of {r['batch_prompt_tokens']}-token prompts "
        f"(compression {r['batch_achieved_compression_ratio']:.3f}): "
        f"full {r['full_batch']} ({r['full_kv_bytes_per_row'] / 2**20:.1f} MiB per row), KVzap {r['kvzap_batch']} "
        f"({r['held_kv_bytes_per_row'] / 2**20:.1f} MiB per row) -> {r['batch_ratio']:.2f}x "
        f"(unrounded {r['batch_ratio_unrounded']:.2f}x; target >= {r['batch_target']:.2f}x)"
    )
