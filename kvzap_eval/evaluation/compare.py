"""`kvzap-eval compare`: sweep tables side by side (e.g. two surrogates on the same samples), with 95% intervals.

    kvzap-eval compare old=old.jsonl new=new.jsonl --out reports/surrogates

Each table is a `kvzap-eval sweep` table; its label names its curves ("new kvzap_mlp"). At each context length the
averages are taken over the tasks every table measured there (a setting missing one of them is listed and left out),
each with its 95% interval (`intervals`). The first table is the reference: every other table's settings are set
against it twice, at the same setting (same tau: accuracy and compression both move) and at equal compression (the
reference curve of the same method interpolated linearly at the other's compression; only inside its range). A
difference whose whole interval lies below zero is "worse"; otherwise "not worse" (within the interval) or "better".
"""

from __future__ import annotations

import shlex
import sys
from collections import defaultdict
from pathlib import Path

from ..atomic import write_text_atomic
from ..cli_args import OneLineParser, check_writable_dir
from ..errors import ConfigError, require
from .curve_plot import CurvePoints, plot_curves
from .curves import Curve, Point, common_tasks, groups, highest_within_full, interpolate, points
from .intervals import Estimate, difference, task_estimate
from .table import identity_fields, load_table


def parse_labelled(specs: list[str]) -> list[tuple[str, Path]]:
    """`LABEL=TABLE` pairs, labels unique."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"table {spec!r} is not LABEL=TABLE: write e.g. old=old.jsonl new=new.jsonl")
        if label in {lbl for lbl, _ in out}:
            raise ConfigError(f"label {label!r} is given twice: give each table its own label")
        out.append((label, Path(path)))
    if len(out) < 2:
        raise ConfigError("compare needs at least two tables: LABEL=TABLE LABEL=TABLE")
    return out


def _verdict(delta: Estimate) -> str:
    if delta.high < 0:
        return "worse"
    return "better" if delta.low > 0 else "not worse"


def comparisons(all_points: list[Point], reference: str) -> list[dict]:
    """Each non-reference setting against the reference table's: same setting, and at equal compression."""
    by_key = {(p.curve, p.setting, p.length): p for p in all_points}
    out = []
    for p in all_points:
        if p.curve.method == "full" or p.curve.label == reference:
            continue
        ref_curve = Curve(reference, p.curve.method)
        same = by_key.get((ref_curve, p.setting, p.length))
        line = [q for q in all_points if q.curve == ref_curve and q.length == p.length]
        at_equal = interpolate(line, p.compression)
        out.append(
            {
                "point": p,
                "reference": same,
                "same_setting": difference(p.accuracy, same.accuracy) if same else None,
                "equal_compression": difference(p.accuracy, at_equal) if at_equal else None,
            }
        )
    return out


def differing_identity(tables: list[tuple[str, list[dict]]]) -> list[str]:
    """The identity fields whose values differ between the tables (e.g. `surrogate`)."""
    fields = [identity_fields(r for r in rows if r["method"] != "full") for _, rows in tables]
    keys = set.intersection(*(set(f) for f in fields))
    return sorted(
        f"{name}" + (f" of {task}" if task else "")
        for name, task in keys
        if len({frozenset(f[(name, task)]) for f in fields}) > 1
    )


def markdown(tables: list[tuple[str, list[dict]]], command: str) -> str:
    all_points, notes = points(tables)
    reference = tables[0][0]
    lines = ["# Sweep tables compared", "", f"Produced by: `{command}`", ""]
    differ = differing_identity(tables)
    lines += [
        "Tables: "
        + ", ".join(f"`{label}` ({len(rows)} rows)" for label, rows in tables)
        + f"; reference `{reference}`. They differ in: {', '.join(differ) or 'no identity field'}.",
        "",
        "Accuracy in points with its 95% interval (upper-bound standard error sqrt(p(1-p)/n) per task; averages over"
        " the tasks every table measured). Compression: fraction of KV entries evicted, mean over tasks.",
        "",
    ]
    for length in sorted({p.length for p in all_points}):
        tasks = common_tasks(tables, length)
        lines += [f"## Context length {length} ({len(tasks)} tasks: {', '.join(tasks)})", ""]
        lines += ["| curve | setting | compression | accuracy (95%) | n per task |", "|---|---|---|---|---|"]
        for p in sorted((p for p in all_points if p.length == length), key=lambda p: (p.curve.name, p.compression)):
            lines.append(f"| {p.curve.name} | {p.setting} | {p.compression:.3f} | {p.accuracy.points()} | {p.n_min} |")
        frontier = highest_within_full(all_points, length)
        if frontier:
            lines += [
                "",
                "Highest compression within 1 point of the full cache (average; the difference's 95% interval):",
                "",
                "| curve | setting | compression | x | accuracy (95%) | minus full (95%) |",
                "|---|---|---|---|---|---|",
            ]
            for p, below in frontier:
                lines.append(
                    f"| {p.curve.name} | {p.setting} | {p.compression:.3f} | {p.times}"
                    f" | {p.accuracy.points()} | {below.points()} |"
                )
        rows = [c for c in comparisons(all_points, reference) if c["point"].length == length]
        if rows:
            lines += [
                "",
                f"Against `{reference}` (difference in points, 95%):",
                "",
                "| curve | setting | compression (reference) | same setting | verdict | equal compression | verdict |",
                "|---|---|---|---|---|---|---|",
            ]
            for c in rows:
                p, ref, same, equal = c["point"], c["reference"], c["same_setting"], c["equal_compression"]
                ref_text = f"{ref.compression:.3f}" if ref else "—"
                lines.append(
                    f"| {p.curve.name} | {p.setting} | {p.compression:.3f} ({ref_text})"
                    f" | {same.points() if same else '—'} | {_verdict(same) if same else '—'}"
                    f" | {equal.points() if equal else 'outside the reference range'}"
                    f" | {_verdict(equal) if equal else '—'} |"
                )
        lines.append("")
    lines += ["## Per task", "", "| task | length | curve | setting | compression | accuracy (95%) | n |"]
    lines.append("|---|---|---|---|---|---|---|")
    for (curve, setting, length), by_task in sorted(groups(tables).items(), key=lambda kv: str(kv[0])):
        for task, r in sorted(by_task.items()):
            est = task_estimate(r["accuracy"], r["n"])
            lines.append(
                f"| {task} | {length} | {curve.name} | {setting} | {r['compression_ratio']:.3f} | {est.points()}"
                f" | {r['n']} |"
            )
    if notes:
        lines += ["", "Left out:", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def plot(all_points: list[Point], length: int, path: Path) -> None:
    """Average accuracy vs compression at one length, one curve per (table, method), 95% error bars."""
    curves: dict[str, CurvePoints] = defaultdict(list)
    for p in all_points:
        if p.length == length:
            curves["full" if p.curve.method == "full" else p.curve.name].append((p.compression, p.accuracy))
    plot_curves(curves, path, f"average over tasks, {length} tokens")


def write_comparison(specs: list[tuple[str, Path]], out_dir: Path, command: str) -> Path:
    tables = [(label, list({r["key"]: r for r in load_table(path)}.values())) for label, path in specs]
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(tables, command)
    all_points, _ = points(tables)
    images = []
    for length in sorted({p.length for p in all_points}):
        name = f"average_{length}.png"
        plot(all_points, length, out_dir / name)
        images.append(name)
    text += "\n## Plots\n\n" + "\n".join(f"![{name}]({name})" for name in images) + "\n"
    return write_text_atomic(out_dir / "README.md", text)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="kvzap-eval compare", description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", metavar="LABEL=TABLE", help="sweep tables; the first is the reference")
    parser.add_argument("--out", type=Path, required=True, help="directory for README.md and the plots")
    args = parser.parse_args(argv)
    specs = parse_labelled(args.tables)
    check_writable_dir(args.out, "--out")
    require("matplotlib", "report")
    command = "kvzap-eval compare " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))
    try:
        print(write_comparison(specs, args.out, command))
    except OSError as error:
        raise ConfigError(f"--out {args.out}: the comparison could not be written ({error.strerror})") from None
    return 0
