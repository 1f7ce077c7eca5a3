"""The pruning runtime: the path a hidden state takes while the model runs, scorer backend -> scorer -> policy ->
compact cache -> attention, tied together by `compress(model, method)` (`session`), with the methods of
`MethodConfig` (`methods`) and the measured compression (`stats`).

Imports the lower layer, `llm`, `surrogate`, `teacher` and the exporters; nothing of training, evaluation or tools.
"""

from __future__ import annotations

from ..moved import moved_attribute

_EXPORTS = {"compress": "session", "KVzapSession": "session"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # `kvzap_eval.runtime` was the module that is now `runtime/session.py`: its names still resolve, lazily.
    return moved_attribute(__name__, name, "session", _EXPORTS)
