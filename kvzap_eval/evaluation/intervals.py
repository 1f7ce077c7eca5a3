"""95% intervals for accuracies read from a sweep table (rows carry a task's mean score and its n samples).

Every task's per-sample score lies in [0, 1] (exact match, or the fraction of needles recalled), and a variable in
[0, 1] with mean p has variance at most p(1 - p). So sqrt(p(1 - p) / n) bounds the standard error of a task's mean
from above: exact for the 0/1 tasks, conservative for partial credit. That bound is 0 when every sample scored 0 or
every one scored 1 (100/100 is not a certainty), and too small near them; the standard error used is therefore the
larger of it and the Agresti-Coull one, sqrt(q(1 - q) / (n + z^2)) with q = (n p + z^2 / 2) / (n + z^2): a task at
100/100 reads 100.0 +- 2.6, not +- 0. An average over k tasks (independent samples) has standard error
sqrt(sum_i se_i^2) / k. Intervals are mean +- 1.96 standard errors, clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A mean accuracy in [0, 1] with its standard error (an upper bound, see the module docstring)."""

    mean: float
    stderr: float
    bounded: bool = True  # an accuracy (clipped to [0, 1]); False for a difference of two

    @property
    def low(self) -> float:
        low = self.mean - Z95 * self.stderr
        return max(0.0, low) if self.bounded else low

    @property
    def high(self) -> float:
        high = self.mean + Z95 * self.stderr
        return min(1.0, high) if self.bounded else high

    @property
    def half_width(self) -> float:
        return Z95 * self.stderr

    def points(self) -> str:
        """`74.5 ± 2.8` in accuracy points (95%); a difference carries its sign."""
        sign = "+" if not self.bounded and self.mean >= 0 else ""
        return f"{sign}{100 * self.mean:.1f} ± {100 * self.half_width:.1f}"


def task_estimate(accuracy: float, n: int) -> Estimate:
    """One task's accuracy over n samples."""
    if n < 1:
        raise ValueError(f"an accuracy needs n >= 1 samples, got {n}")
    p = min(1.0, max(0.0, accuracy))
    q = (n * p + Z95**2 / 2) / (n + Z95**2)
    return Estimate(accuracy, max(math.sqrt(p * (1 - p) / n), math.sqrt(q * (1 - q) / (n + Z95**2))))


def average_estimate(rows: Sequence[dict]) -> Estimate:
    """The unweighted mean over rows (one per task) of `accuracy`, each over its own `n`."""
    if not rows:
        raise ValueError("an average needs at least one row")
    parts = [task_estimate(r["accuracy"], r["n"]) for r in rows]
    k = len(parts)
    return Estimate(sum(e.mean for e in parts) / k, math.sqrt(sum(e.stderr**2 for e in parts)) / k)


def difference(a: Estimate, b: Estimate) -> Estimate:
    """a - b with the standard error of independent estimates (an upper bound when both ran on the same samples,
    whose errors are positively correlated)."""
    return Estimate(a.mean - b.mean, math.hypot(a.stderr, b.stderr), bounded=False)
