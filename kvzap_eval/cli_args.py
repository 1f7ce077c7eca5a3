"""Command-line arguments that fail in one line: a parser whose usage errors are `ConfigError`s, value types that
refuse zero, negative and non-finite numbers, and checks that an output path can be written and a device exists
before any work."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .errors import ConfigError


class UsageError(ConfigError):
    """A command-line argument is missing, unknown or malformed."""


class OneLineParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors raise `UsageError` (printed by `kvzap-eval` as one `error:` line)
    instead of printing the usage and exiting 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _number(text: str, cast, accept, requirement: str):
    """`text` read by `cast` (int or float), refused with `requirement` ("must be ...") unless `accept(value)`."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if cast is int else 'number'}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {value if cast is int else repr(text)}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sample counts, batch sizes, context lengths)."""
    return _number(text, int, lambda v: v >= 1, "at least 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (windows, seeds); see `cli_args.positive_int` for counts."""
    return _number(text, int, lambda v: v >= 0, "0 or more")


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    return _number(text, float, math.isfinite, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, durations, regularisation strengths)."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number above 0")


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (target compression ratios)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text!r}")
    return value


def batch_by_tokens(text: str) -> tuple[int, int]:
    """A run size written BxT: batch B of prompts of about T tokens each ("8x4000")."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxTOKENS with both at least 1, e.g. 8x4000")
    return int(parts[0]), int(parts[1])


def check_device(text: str, option: str = "--device"):
    """The torch device named by `text`, refused in one line when it is not a device or not on this machine."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option} {text!r} is not a torch device: e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} {text}: no CUDA GPU is visible here; use {option} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_writable_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that is a directory, lies under a file or cannot be written."""
    path = Path(path)
    if path.exists():
        if path.is_dir():
            raise ConfigError(f"{option} {path} is a directory: give a file path, e.g. {path / 'table.jsonl'}")
        if not path.is_file():
            raise ConfigError(f"{option} {path} is not a regular file: give a file path")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{option} {path} is not writable: give another path or fix its permissions")
        return
    _check_creatable(path, option)


def check_writable_dir(path: Path, option: str) -> None:
    """Refuse, before any work, an output directory that is a file or cannot be created or written."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a directory: give a directory (created if missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {path} is not writable: give another directory or fix its permissions")
        return
    _check_creatable(path, option)


def _check_creatable(path: Path, option: str) -> None:
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot create it in {ancestor} (not writable)")
