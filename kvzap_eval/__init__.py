"""kvzap-eval: KVzap KV-cache pruning on Hugging Face transformers, with a cache that frees what it evicts.

The package imports lazily (torch and transformers load on first use), so the lm-eval startup hook costs nothing
in other programs. Its wings: `llm`, `surrogate` and `teacher` at the bottom (over `errors`, `atomic`, `settings`),
`runtime` (pruning while the model runs), `train` (surrogate training), `evaluation` (lm-eval, sweeps, reports)
and `tools` (demo, bench, latency, gate); README.md lists what each may import. The flat package's old module paths
still import, with a DeprecationWarning (`moved.py`).
"""

from __future__ import annotations

import importlib

from . import moved

moved.install()

__version__ = "0.1.0"
_EXPORTS = {
    "METHODS": "runtime.methods",
    "Method": "runtime.methods",
    "MethodConfig": "runtime.methods",
    "build_method": "runtime.methods",
    "KVzapSession": "runtime.session",
    "compress": "runtime.session",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kvzap_eval' has no attribute {name!r}")
