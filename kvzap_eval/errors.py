"""Exception classes: every error a user can cause has its own type and a one-line message that names the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable


class KVzapError(Exception):
    """Base class of all kvzap-eval errors."""


class ConfigError(KVzapError, ValueError):
    """A setting is out of range or unknown (threshold, window, ratio, method, backend...)."""


class CheckpointError(KVzapError):
    """A surrogate checkpoint is missing, malformed, unsafe (pickle) or does not match the LLM."""


class MissingExtraError(KVzapError, ImportError):
    """An optional backend was requested but its extra is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: pip install 'kvzap-eval[{extra}]'")
        self.package = package
        self.extra = extra


class ArtifactError(KVzapError):
    """An exported scorer artifact (ONNX file, TensorRT engine, manifest) is missing, corrupt or made for another
    surrogate, model, runtime or GPU."""


class EmbeddedModelError(KVzapError):
    """The embedded SmolLM2 model package is missing or cannot be converted."""


class CacheMismatchError(KVzapError):
    """A KV cache holds entries of another dtype or device than the keys and values the model now gives it."""


class UnsupportedModelError(KVzapError):
    """The LLM's architecture is not one the runtime supports."""


class ModelNotFoundError(KVzapError):
    """The LLM named by a directory or hub id cannot be found or loaded."""


# --- surrogate training (teacher, corpus, collection) ---------------------------------------------------------------
class TeacherError(KVzapError):
    """The model cannot produce KVzip+ teacher scores (no attention probabilities, unusable prompt)."""


class CorpusError(ConfigError):
    """The training corpus is missing, unreadable, or too short for the token window."""


class OutputDirError(KVzapError):
    """The output directory is not empty, or its collection was made with other settings than this run's."""


def require(module: str, extra: str):
    """Import an optional dependency or raise `MissingExtraError` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised through the tests with a fake module name
        raise MissingExtraError(module, extra) from exc


def exit_code(run: Callable[[], int], code: int = 1) -> int:
    """`run()`'s exit code; a kvzap-eval error, or an OS error (a full disk, a file gone mid-run), is printed as one
    `error:` line instead of a traceback and gives `code`. The one error printer of the command-line entry points."""
    try:
        return run()
    except KVzapError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
    return code
