"""`kvzap-eval demo`: one KVzap generation on a long prompt, printed beside the full-cache answer.

The prompt hides a number in a filler haystack of about `--context-tokens` tokens and asks for it; the demo prints
both answers, the achieved compression ratio and the KV bytes held against a full cache.
"""

from __future__ import annotations

import random
import time

import torch

from ..cli_args import OneLineParser, finite_float, non_negative_int, positive_int
from ..llm.loading import load_causal_lm
from ..runtime.methods import METHODS, MethodConfig, build_method
from ..runtime.session import compress

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def needle_prompt(tokenizer, context_tokens: int, seed: int = 0) -> tuple[str, str]:
    """A chat prompt with a 7-digit number hidden at a random depth of a filler haystack, and the number."""
    rng = random.Random(seed)
    number = str(rng.randint(1_000_000, 9_999_999))
    repeats = max(1, context_tokens // len(tokenizer(FILLER).input_ids))
    sentences = [FILLER] * repeats
    sentences.insert(rng.randint(0, repeats), f"The special magic number is {number}. ")
    question = "What is the special magic number mentioned in the text above? Answer with the number only."
    messages = [{"role": "user", "content": "".join(sentences) + "\n\n" + question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, number


def _generate(model, tokenizer, inputs, max_new_tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip(), seconds


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="kvzap-eval demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default="kvzap", choices=METHODS)
    parser.add_argument("--threshold", type=finite_float, default=None, help="kvzap tau (default: the surrogate's)")
    parser.add_argument("--compression-ratio", type=finite_float, default=None, help="for fixed-ratio methods")
    parser.add_argument("--surrogate", default=None, help="surrogate hub id or directory (default: naming rule)")
    parser.add_argument("--model-type", default=None, choices=["linear", "mlp"], help="surrogate type (default mlp)")
    parser.add_argument("--window", type=non_negative_int, default=None, help="kvzap window (default 128)")
    parser.add_argument("--context-tokens", type=positive_int, default=1000)
    parser.add_argument("--max-new-tokens", type=positive_int, default=24)
    parser.add_argument("--seed", type=non_negative_int, default=0, help="where the number hides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {"threshold": args.threshold, "compression_ratio": args.compression_ratio, "surrogate": args.surrogate,
                "model_type": args.model_type, "window": args.window}  # fmt: skip
    config = MethodConfig(method=args.method, **{name: value for name, value in settings.items() if value is not None})
    model, tokenizer = load_causal_lm(args.model)
    method = build_method(model, config, tokenizer=tokenizer)
    text, number = needle_prompt(tokenizer, args.context_tokens, args.seed)
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        full_answer, full_seconds = _generate(model, tokenizer, inputs, args.max_new_tokens)
        if method.scorer is not None:
            method.scorer.prepare(inputs["input_ids"], inputs["attention_mask"])
        with compress(model, method) as session:
            answer, seconds = _generate(model, tokenizer, inputs, args.max_new_tokens)
            stats = session.stats()
    held_mib, kept_mib, full_mib = (n / 2**20 for n in (stats.held_kv_bytes, stats.kept_kv_bytes, stats.full_kv_bytes))
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, hidden number {number}")
    print(f"full cache answer: {full_answer!r} ({full_seconds:.1f} s)")
    print(f"{args.method} answer:   {answer!r} ({seconds:.1f} s)")
    ratio = stats.achieved_compression_ratio
    print(f"compression ratio: {ratio:.3f} ({1 / max(1e-9, 1 - ratio):.2f}x)")
    print(
        f"KV bytes held: {held_mib:.2f} MiB vs {full_mib:.2f} MiB for a full cache "
        f"({stats.held_kv_bytes_fraction:.1%}); the kept entries alone: {kept_mib:.2f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
