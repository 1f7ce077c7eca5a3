"""Old import paths of the flat package, kept for one release: each one is the module at its new home, with a
`DeprecationWarning` that names the new path.

`kvzap_eval/__init__.py` installs `MovedFinder` at the front of `sys.meta_path`. Importing an old dotted name (or
anything under an old package, e.g. `kvzap_eval.backends.onnxruntime_backend`) imports the new module and puts that
very module object under the old name in `sys.modules`: one module, two names, so classes, module state and
monkeypatching agree whichever name is used. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

#: old dotted name -> new dotted name (an old package maps everything under it too).
MOVED = {
    "kvzap_eval.embedded": "kvzap_eval.llm.embedded",
    "kvzap_eval.loading": "kvzap_eval.llm.loading",
    "kvzap_eval.model_info": "kvzap_eval.llm.model_info",
    "kvzap_eval.training_report": "kvzap_eval.surrogate.report",
    "kvzap_eval.train_errors": "kvzap_eval.errors",
    "kvzap_eval.methods": "kvzap_eval.runtime.methods",
    "kvzap_eval.scorers": "kvzap_eval.runtime.scorers",
    "kvzap_eval.oracle": "kvzap_eval.runtime.oracle",
    "kvzap_eval.cache": "kvzap_eval.runtime.cache",
    "kvzap_eval.attention": "kvzap_eval.runtime.attention",
    "kvzap_eval.stats": "kvzap_eval.runtime.stats",
    "kvzap_eval.policies": "kvzap_eval.runtime.policies",
    "kvzap_eval.backends": "kvzap_eval.runtime.backends",
    "kvzap_eval.training": "kvzap_eval.train.fit",
    "kvzap_eval.corpus": "kvzap_eval.train.corpus",
    "kvzap_eval.collect": "kvzap_eval.train.collect",
    "kvzap_eval.calibration": "kvzap_eval.train.calibration",
    "kvzap_eval.lm_eval_hook": "kvzap_eval.evaluation.lm_eval_hook",
    "kvzap_eval.lm_eval_model": "kvzap_eval.evaluation.lm_eval_model",
    "kvzap_eval.protocol": "kvzap_eval.evaluation.protocol",
    "kvzap_eval.run_stats": "kvzap_eval.evaluation.run_stats",
    "kvzap_eval.sample_stats": "kvzap_eval.evaluation.sample_stats",
    "kvzap_eval.sweep": "kvzap_eval.evaluation.sweep",
    "kvzap_eval.report": "kvzap_eval.evaluation.report",
    "kvzap_eval.run_identity": "kvzap_eval.evaluation.run_identity",
    "kvzap_eval.table": "kvzap_eval.evaluation.table",
    "kvzap_eval.demo": "kvzap_eval.tools.demo",
    "kvzap_eval.bench": "kvzap_eval.tools.bench",
    "kvzap_eval.latency": "kvzap_eval.tools.latency",
    "kvzap_eval.gate": "kvzap_eval.tools.gate",
}
# `kvzap_eval.runtime` (now runtime/session.py) and `kvzap_eval.train` (now train/pipeline.py) are packages of the
# same name: their `__init__` hands out the old module's names (see `moved_attribute`).


def new_name(old: str) -> str | None:
    """The new dotted name of an old module name, or None when `old` did not move."""
    for prefix in (old, *_parents(old)):
        if prefix in MOVED:
            return MOVED[prefix] + old[len(prefix) :]
    return None


def _parents(name: str):
    while "." in name:
        name = name.rpartition(".")[0]
        yield name


_MACHINERY = (__name__, "importlib", "kvzap_eval.runtime", "kvzap_eval.train")


def _caller_stacklevel(depth: int = 0) -> int:
    """The stacklevel, for a `warnings.warn` in our caller, of the first frame outside this module and the import
    machinery, `depth` frames further out (a deprecated function passes 1: its own frame is not the user's).
    (`warnings` itself skips the frames of importlib's bootstrap when counting.)"""
    frame = sys._getframe(2)
    level = 2
    while frame is not None:
        internal = "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename
        if not internal and frame.f_globals.get("__name__") not in _MACHINERY:
            return level + depth
        level += 0 if internal else 1
        frame = frame.f_back
    return 1


def warn_moved(old: str, new: str, depth: int = 0) -> None:
    """A DeprecationWarning that `old` moved to `new`, pointing at the user's line (see `_caller_stacklevel`)."""
    warnings.warn(
        f"{old} moved to {new}; the old path goes away in the next release",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(depth),
    )


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return types.ModuleType(spec.name)  # a placeholder: exec_module puts the real module in its place

    def exec_module(self, module: types.ModuleType) -> None:
        warn_moved(module.__name__, self.new)
        # The import system returns whatever sys.modules holds under the name after exec_module.
        sys.modules[module.__name__] = importlib.import_module(self.new)


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old module names of `MOVED` and loads them as their new modules."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname) if fullname.startswith("kvzap_eval.") else None
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put `MovedFinder` first on `sys.meta_path` (once)."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())


def moved_attribute(package: str, name: str, home: str, exports: dict[str, str]) -> object:
    """`package.name` for a package that replaced a module of the same name: a name of `exports` (name -> module
    under the package) comes without warning; any other public name of the old module (`home`) warns once per use
    and is handed out from its new home."""
    if name in exports:
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
        return importlib.import_module(f"{package}.{name}")  # a submodule, as the import system would hand out
    module = importlib.import_module(f"{package}.{home}")
    if name.startswith("_") or not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warn_moved(f"{package}.{name}", f"{package}.{home}.{name}")
    return getattr(module, name)
