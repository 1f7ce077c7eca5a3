"""Surrogate training: a corpus (`corpus`), KVzip+ teacher scores collected to disk (`collect`), ridge and MLP fits
(`fit`), the tau -> compression calibration (`calibration`), and the whole job, `kvzap-eval train` or
`python -m kvzap_eval.train` (`pipeline`).

Imports the lower layer, `llm`, `surrogate` and `teacher`; nothing of the runtime, evaluation or tools.
"""

from __future__ import annotations

from ..moved import moved_attribute

_EXPORTS = {"TrainConfig": "pipeline", "TrainResult": "pipeline", "train_surrogates": "pipeline", "main": "pipeline"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # `kvzap_eval.train` was the module that is now `train/pipeline.py`: its names still resolve, lazily.
    return moved_attribute(__name__, name, "pipeline", _EXPORTS)
