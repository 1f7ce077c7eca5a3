"""What a sweep table holds: per context length and method, each setting and on how many of the length's tasks it ran.

A report's averages keep only the settings measured on every task of a length; this section says what else the
table holds, so that a curve with missing points reads as partial rather than as ending there.
"""

from __future__ import annotations

from collections import defaultdict

from .curves import setting_label, setting_order, tasks_by_length


def coverage_lines(rows: list[dict]) -> list[str]:
    """A markdown table: for each length and method, its settings grouped by the number of the length's tasks they
    were measured on (most first), e.g. `tau=-5.0, tau=-4.0 (9/9); tau=0.0 (4/9)`."""
    tasks_at = tasks_by_length(rows)
    measured: dict[tuple[int, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    order: dict[str, tuple[str, float]] = {}
    for row in rows:
        label = setting_label(row)
        measured[(row["length"], row["method"])][label].add(row["task"])
        order[label] = setting_order(row)
    lines = ["| length | method | settings (tasks measured, of the length's) |", "|---|---|---|"]
    for (length, method), settings in sorted(measured.items()):
        by_count: dict[int, list[str]] = defaultdict(list)
        for label, tasks in settings.items():
            by_count[len(tasks)].append(label)
        total = len(tasks_at[length])
        parts = [
            f"{', '.join(sorted(labels, key=order.__getitem__))} ({count}/{total})"
            for count, labels in sorted(by_count.items(), reverse=True)
        ]
        lines.append(f"| {length} | {method} | {'; '.join(parts)} |")
    return lines
