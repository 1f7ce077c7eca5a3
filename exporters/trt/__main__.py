"""`python -m exporters.trt <hub id | checkpoint dir | onnx dir>`: export ONNX if needed, then build one engine per
layer (decode profile [1, 1, D], prefill profile 1..--max-seq) into a cache keyed by TensorRT version and GPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvzap_eval.errors import KVzapError

from ..manifest import MANIFEST_NAME
from .build import BuildConfig, ensure_engines, import_tensorrt
from .profiles import DEFAULT_MAX_SEQ, EngineProfiles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m exporters.trt", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="hub id, checkpoint directory, or ONNX export directory (with manifest.json)")
    parser.add_argument("--out", help="engine directory (default: <onnx dir>/tensorrt)")
    parser.add_argument("--onnx-dir", help="where to export ONNX when given a checkpoint (default: the cache)")
    parser.add_argument(
        "--dtype",
        default="bf16",
        help="export dtype when given a checkpoint: bf16 (default, "
        "the dtype of most GPU LLMs; engines are strongly typed), fp16 or fp32",
    )
    parser.add_argument("--max-seq", type=int, default=DEFAULT_MAX_SEQ, help="prefill profile max tokens")
    parser.add_argument("--opt-seq", type=int, default=None, help="prefill profile opt tokens (default min(4096, max))")
    parser.add_argument("--max-batch", type=int, default=1, help="prefill profile max batch")
    parser.add_argument("--workspace-gb", type=float, default=1.0, help="builder workspace limit")
    parser.add_argument("--device", type=int, default=0, help="CUDA device to build for")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    profiles = EngineProfiles(max_seq=args.max_seq, opt_seq=args.opt_seq, max_batch=args.max_batch)
    import_tensorrt()  # fail before a long ONNX export when TensorRT is absent
    onnx_dir = Path(args.source)
    if not (onnx_dir / MANIFEST_NAME).is_file():
        from ..onnx import main_export

        onnx_dir = main_export(args.source, args.onnx_dir, dtype=args.dtype).directory
    config = BuildConfig(profiles, int(args.workspace_gb * (1 << 30)), args.device)
    engines = ensure_engines(onnx_dir, args.out, config)
    print(f"{len(engines.paths)} engines in {engines.engine_dir} ({engines.manifest.dtype}, {engines.keys[0].gpu}, "
          f"TensorRT {engines.keys[0].tensorrt})")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KVzapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
