"""Sweep-table rows as curves: a setting's label, and accuracy averaged over tasks with its 95% interval.

A curve is one (table label, method); a point is one of its settings at one context length, averaged over the tasks
every table measured there (`intervals` gives the interval). Used by `report` (one table) and `compare` (several).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .intervals import Estimate, average_estimate, difference


def setting_label(row: dict) -> str:
    """How a row's setting reads in reports: `full`, `tau=T`, `ratio=R` or `ratio of tau=T`."""
    if row["method"] == "full":
        return "full"
    if row.get("threshold") is not None:
        return f"tau={row['threshold']}"
    if row.get("ratio") is not None:  # a fixed-ratio method on its own grid (`sweep --ratios`)
        return f"ratio={row['ratio']}"
    return f"ratio of tau={row.get('matched_threshold')}"


def setting_order(row: dict) -> tuple[str, float]:
    """A sort key for a method's settings in reading order: by kind, then by their number (taus low to high)."""
    for kind in ("threshold", "ratio", "matched_threshold"):
        if row.get(kind) is not None:
            return kind, float(row[kind])
    return "", 0.0


def tasks_by_length(rows: list[dict]) -> dict[int, set[str]]:
    """length -> the tasks a table measured at that length."""
    out: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        out[r["length"]].add(r["task"])
    return out


@dataclass(frozen=True)
class Curve:
    """One (table label, method) curve; the full cache is one curve whichever table holds it."""

    label: str
    method: str

    @property
    def name(self) -> str:
        if self.method == "full" or not self.label:
            return self.method
        return f"{self.label} {self.method}"


@dataclass(frozen=True)
class Point:
    """One setting of a curve at one length, averaged over the length's common tasks."""

    curve: Curve
    setting: str
    length: int
    compression: float
    accuracy: Estimate
    n_min: int

    @property
    def times(self) -> str:
        """The compression as `N.Nx`."""
        return times(self.compression)


def times(compression: float) -> str:
    """A compression ratio as the `N.Nx` it gives (1 / (1 - ratio))."""
    return f"{1 / (1 - compression):.1f}x"


def groups(tables: list[tuple[str, list[dict]]]) -> dict[tuple[Curve, str, int], dict[str, dict]]:
    """(curve, setting, length) -> task -> row; the full cache is taken from the first table that has it."""
    by_key: dict[tuple[Curve, str, int], dict[str, dict]] = defaultdict(dict)
    for label, rows in tables:
        for row in rows:
            curve = Curve(label, row["method"])
            key = (Curve("", "full") if row["method"] == "full" else curve, setting_label(row), row["length"])
            by_key[key].setdefault(row["task"], row)
    return by_key


def common_tasks(tables: list[tuple[str, list[dict]]], length: int) -> list[str]:
    """The tasks every table measured at `length`."""
    sets = [{r["task"] for r in rows if r["length"] == length} for _, rows in tables]
    return sorted(set.intersection(*sets)) if sets else []


def points(tables: list[tuple[str, list[dict]]]) -> tuple[list[Point], list[str]]:
    """Every (curve, setting, length) averaged over the length's common tasks, and notes on what was left out."""
    out, notes = [], []
    lengths = sorted({r["length"] for _, rows in tables for r in rows})
    for (curve, setting, length), by_task in sorted(groups(tables).items(), key=lambda kv: str(kv[0])):
        if length not in lengths:
            continue
        tasks = common_tasks(tables, length)
        missing = [t for t in tasks if t not in by_task]
        if not tasks or missing:
            notes.append(f"{curve.name} {setting} at {length} left out: no row for {', '.join(missing) or 'any task'}")
            continue
        rows = [by_task[t] for t in tasks]
        out.append(
            Point(
                curve,
                setting,
                length,
                sum(r["compression_ratio"] for r in rows) / len(rows),
                average_estimate(rows),
                min(r["n"] for r in rows),
            )
        )
    return out, notes


def interpolate(curve: list[Point], compression: float) -> Estimate | None:
    """The curve's accuracy at `compression` (linear between its two neighbouring points), None outside its range."""
    curve = sorted(curve, key=lambda p: p.compression)
    for a, b in zip(curve, curve[1:]):
        if a.compression <= compression <= b.compression:
            span = b.compression - a.compression
            w = 0.0 if span == 0 else (compression - a.compression) / span
            mean = (1 - w) * a.accuracy.mean + w * b.accuracy.mean
            return Estimate(mean, (1 - w) * a.accuracy.stderr + w * b.accuracy.stderr)
    if len(curve) == 1 and curve[0].compression == compression:
        return curve[0].accuracy
    return None


def _full_point(all_points: list[Point], length: int) -> Point | None:
    return next((p for p in all_points if p.length == length and p.curve.method == "full"), None)


def highest_within_full(
    all_points: list[Point], length: int, points_below: float = 1.0
) -> list[tuple[Point, Estimate]]:
    """For each curve at `length`: its most compressed setting whose average accuracy is at most `points_below`
    points under the full cache's, with its difference to the full cache (95%). Curves with no such setting are left
    out; empty without a full-cache point."""
    full = _full_point(all_points, length)
    if full is None:
        return []
    best: dict[Curve, Point] = {}
    for p in all_points:
        if p.length != length or p.curve.method == "full":
            continue
        if p.accuracy.mean >= full.accuracy.mean - points_below / 100 - 1e-12:
            if p.curve not in best or p.compression > best[p.curve].compression:
                best[p.curve] = p
    return [(p, difference(p.accuracy, full.accuracy)) for _, p in sorted(best.items(), key=lambda kv: kv[0].name)]


def closest_short_of_full(
    all_points: list[Point], length: int, points_below: float = 1.0
) -> list[tuple[Point, Estimate]]:
    """The curves at `length` that `highest_within_full` leaves out (no setting within `points_below` points of the
    full cache), each with its most accurate setting and that setting's difference to the full cache (95%); empty
    without a full-cache point."""
    full = _full_point(all_points, length)
    if full is None:
        return []
    within = {p.curve for p, _ in highest_within_full(all_points, length, points_below)}
    best: dict[Curve, Point] = {}
    for p in all_points:
        if p.length != length or p.curve.method == "full" or p.curve in within:
            continue
        if p.curve not in best or p.accuracy.mean > best[p.curve].accuracy.mean:
            best[p.curve] = p
    return [(p, difference(p.accuracy, full.accuracy)) for _, p in sorted(best.items(), key=lambda kv: kv[0].name)]


def averaged(rows: list[dict]) -> list[dict]:
    """Mean accuracy and compression over tasks, per (method, setting, length), for settings present on every task
    measured at that length."""
    tasks_at = tasks_by_length(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r.get("threshold"), r.get("matched_threshold"), r.get("ratio"), r["length"])].append(r)
    out = []
    for (method, threshold, matched, ratio, length), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if {m["task"] for m in members} != tasks_at[length]:
            continue
        out.append(
            {
                "method": method,
                "threshold": threshold,
                "matched_threshold": matched,
                "ratio": ratio,
                "length": length,
                "task": "average",
                "accuracy": sum(m["accuracy"] for m in members) / len(members),
                "compression_ratio": sum(m["compression_ratio"] for m in members) / len(members),
                "n": sum(m["n"] for m in members),
                "accuracy_stderr": average_estimate(members).stderr,
            }
        )
    return out


def tasks_note(rows: list[dict], length: int) -> str:
    """`N tasks`, naming them when the table measured fewer at `length` than at its longest list of tasks."""
    here, everywhere = tasks_by_length(rows)[length], {r["task"] for r in rows}
    if here == everywhere:
        return f"{len(here)} tasks"
    return f"{len(here)} of {len(everywhere)} tasks: {', '.join(sorted(here))}"
