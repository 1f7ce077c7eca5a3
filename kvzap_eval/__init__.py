"""kvzap-eval: KVzap KV-cache pruning on Hugging Face transformers, with a cache that frees what it evicts.

The package imports lazily (torch and transformers load on first use), so the lm-eval startup hook costs nothing
in other programs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "METHODS": "methods",
    "Method": "methods",
    "MethodConfig": "methods",
    "build_method": "methods",
    "KVzapSession": "runtime",
    "compress": "runtime",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kvzap_eval' has no attribute {name!r}")
