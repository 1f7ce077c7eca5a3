"""RULER's string-match scores, reported per context length, plus the sample's KV compression ratio.

Like `lm_eval/tasks/ruler/common_utils.py`, a sample of length L reports its score under the metric "L"; unlike
it, a sample reports nothing under the other lengths (RULER sets them to -1). lm-eval aggregates each metric over
the samples that report it, so "L" is the mean over the samples of length L, and a length that was not run has no
row in lm-eval's table at all.

`string_match_part` follows NVIDIA/RULER (any reference counts); lm-eval's port averages instead, which is
`string_match_all` again for a single prediction.
"""

from __future__ import annotations

import re

from kvzap_eval.evaluation.sample_stats import lookup

#: Context lengths a task may be generated at; each is a metric name in the task YAML.
SUPPORTED_LENGTHS = (1024, 2048, 4096, 8192)
_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's cleaning: control characters become newlines, outer whitespace goes."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references found in the prediction (case-insensitive)."""
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 when any reference is found in the prediction (case-insensitive), else 0.0."""
    text = prediction.lower()
    return float(any(ref.lower() in text for ref in references))


def _per_length(doc: dict, score: float) -> dict[str, float]:
    return {str(doc["max_length"]): score, "kv_compression": lookup(doc["kvzap_uid"])}


def process_results_all(doc: dict, results: list[str]) -> dict[str, float]:
    """Score with `string_match_all` (every needle, value, variable or word must be returned)."""
    return _per_length(doc, string_match_all(postprocess(results[0]), doc["outputs"]))


def process_results_part(doc: dict, results: list[str]) -> dict[str, float]:
    """Score with `string_match_part` (QA: any accepted answer)."""
    return _per_length(doc, string_match_part(postprocess(results[0]), doc["outputs"]))
