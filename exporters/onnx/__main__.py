"""`python -m exporters.onnx <hub id | checkpoint dir> [--out DIR] [--dtype fp32|fp16|bf16] [--threshold T]`."""

from __future__ import annotations

import argparse
import sys

from kvzap_eval.errors import exit_code
from kvzap_eval.settings import DEFAULT_THRESHOLD

from .export import main_export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m exporters.onnx",
        description="Export a KVzap surrogate to one ONNX file per layer (opset 20) plus manifest.json; validate it.",
    )
    parser.add_argument("source", help="hub id (e.g. nvidia/KVzap-mlp-Qwen3-8B) or checkpoint directory")
    parser.add_argument("--out", help="output directory (default: the kvzap-eval cache, where backends look)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), fp16, bf16, or int8 (weight-only, for ORT)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="tau for the keep/evict check")
    parser.add_argument("--revision", help="hub revision of a hub id")
    parser.add_argument("--no-validate", action="store_true", help="skip validation")
    parser.add_argument("--allow-mismatch", action="store_true", help="keep the export although validation failed")
    parser.add_argument(
        "--hidden-states-model",
        default="auto",
        help="LLM (directory or hub id) whose hidden states validate the export; 'auto' (default) = the embedded "
        "SmolLM2 when the surrogate has its shape; 'none' = random inputs only",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    result = main_export(
        args.source,
        args.out,
        dtype=args.dtype,
        threshold=args.threshold,
        validate=not args.no_validate,
        allow_mismatch=args.allow_mismatch,
        hidden_states_model=args.hidden_states_model,
        revision=args.revision,
    )
    for report in result.reports:
        print(("ok    " if report.passed else "FAILED ") + report.summary())
    print(f"manifest: {result.directory / 'manifest.json'} (validation {result.manifest.validation})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
