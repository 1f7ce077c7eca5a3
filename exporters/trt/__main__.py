"""`python -m exporters.trt <hub id | checkpoint dir | onnx dir>`: export ONNX if needed, then build one engine per
layer (decode profile [1, 1, D], prefill profile 1..--max-seq) into a cache keyed by TensorRT version and GPU."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kvzap_eval.errors import ConfigError, exit_code
from kvzap_eval.surrogate import CONFIG_NAME

from ..dtypes import WEIGHT_ONLY_BITS, parse_dtype
from ..manifest import MANIFEST_NAME
from ..output import writable_directory
from . import build
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


def build_config(args: argparse.Namespace) -> build.BuildConfig:
    """The profiles, workspace and device of the arguments (`ConfigError` for any that make no sense)."""
    profiles = EngineProfiles(max_seq=args.max_seq, opt_seq=args.opt_seq, max_batch=args.max_batch)
    if not math.isfinite(args.workspace_gb) or args.workspace_gb <= 0:
        raise ConfigError(f"--workspace-gb {args.workspace_gb} must be a positive number of GiB (default 1)")
    if args.device < 0:
        raise ConfigError(f"--device {args.device} must be a CUDA device index (0, 1, ...)")
    return build.BuildConfig(profiles, max(1, int(args.workspace_gb * (1 << 30))), args.device)


def onnx_export_dir(source: str) -> Path | None:
    """`source` as an ONNX export directory, None when it names a checkpoint (directory or hub id) to export first;
    `ConfigError` for a directory that is neither."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    if (path / MANIFEST_NAME).is_file():
        return path
    if (path / CONFIG_NAME).is_file():
        return None
    raise ConfigError(
        f"{source!r} is neither an ONNX export (no {MANIFEST_NAME}) nor a surrogate checkpoint (no {CONFIG_NAME}): "
        "pass an export directory (python -m exporters.onnx <surrogate> --out DIR), a checkpoint directory or a hub id"
    )


def export_dtype(value: str) -> str:
    """The export dtype TensorRT can build from (`ConfigError` for unknown or weight-only dtypes)."""
    dtype = parse_dtype(value)
    if dtype in WEIGHT_ONLY_BITS:
        raise ConfigError(f"--dtype {value} is weight-only (onnxruntime MatMulNBits), which TensorRT cannot parse: "
                          "use bf16, fp16 or fp32")  # fmt: skip
    return dtype


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    onnx_dir = onnx_export_dir(args.source)
    dtype = export_dtype(args.dtype) if onnx_dir is None else None
    for option, value in (("--out", args.out), ("--onnx-dir", args.onnx_dir)):
        if value is not None:
            writable_directory(value, option, create=False)
    build.import_tensorrt()  # fail before a long ONNX export when TensorRT is absent
    if onnx_dir is None:
        from ..onnx import main_export

        onnx_dir = main_export(args.source, args.onnx_dir, dtype=dtype).directory
    engines = build.ensure_engines(onnx_dir, args.out, config)
    print(f"{len(engines.paths)} engines in {engines.engine_dir} ({engines.manifest.dtype}, {engines.keys[0].gpu}, "
          f"TensorRT {engines.keys[0].tensorrt})")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
