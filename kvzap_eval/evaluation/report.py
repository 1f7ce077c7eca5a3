"""`kvzap-eval report`: accuracy vs compression from a sweep table, as markdown and PNG plots.

One curve per method, per task and averaged over tasks (per context length), plus a summary table of every method
at each KVzap threshold, and what the table holds (`coverage`: each setting and on how many tasks it ran). Plots
need matplotlib (`pip install 'kvzap-eval[report]'`).

The table is read strictly (`table.load_table`): missing, empty or malformed is a one-line error. A table that mixes
runs of different identities (joined on purpose by `kvzap-eval merge --allow-mixed`) gets one report per identity,
in `identity-<i>/` under `--out`, and an index saying in what they differ.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from ..atomic import write_text_atomic
from ..cli_args import OneLineParser, check_writable_dir
from ..errors import ConfigError, require
from ..plotting import pyplot
from .coverage import coverage_lines
from .curve_plot import CurvePoints, plot_curves
from .curves import averaged, closest_short_of_full, highest_within_full, points, setting_label, tasks_note
from .intervals import Estimate, task_estimate
from .table import identity_groups, load_table
from .targets import targets

Row = dict


def _average_of(rows: list[Row], length: int) -> str:
    """`9-task average`, or `average over 4 of 9 tasks: ...` when fewer tasks were measured at `length`."""
    note = tasks_note(rows, length)
    return f"{note.removesuffix(' tasks')}-task average" if note.endswith(" tasks") else f"average over {note}"


def estimate_of(row: Row) -> Estimate:
    """A row's accuracy with its standard error: an averaged row carries it, a task row's comes from its n."""
    if "accuracy_stderr" in row:
        return Estimate(row["accuracy"], row["accuracy_stderr"])
    return task_estimate(row["accuracy"], row["n"])


def frontier_lines(rows: list[Row], length: int) -> list[str]:
    """The summary no single setting shows: each method's highest compression within 1 point of the full cache,
    then the methods with no such setting and how close their best one came."""
    here = [r for r in rows if r["length"] == length]
    all_points = points([("", here)])[0]
    found = highest_within_full(all_points, length)
    lines = []
    if found:
        lines += [
            f"Highest compression whose {_average_of(rows, length)} stays within 1 point of the full cache at {length}"
            " (95% intervals):",
            "",
            "| method | setting | compression ratio | x | accuracy | minus full |",
            "|---|---|---|---|---|---|",
        ]
        for p, below in found:
            lines.append(
                f"| {p.curve.method} | {p.setting} | {p.compression:.3f} | {p.times}"
                f" | {p.accuracy.points()} | {below.points()} |"
            )
        lines.append("")
    elif any(r["method"] == "full" for r in here):
        lines += [f"No setting stays within 1 point of the full cache at {length} (on average).", ""]
    short = closest_short_of_full(all_points, length)
    if short:
        closest = "; ".join(
            f"{p.curve.method} {p.setting} ({p.compression:.3f}, {p.times}): {below.points()}" for p, below in short
        )
        lines += [f"Methods with no setting within 1 point at {length}, each one's closest, minus full: {closest}.", ""]
    return lines


def markdown(rows: list[Row], command: str) -> str:
    """The report's text: the command, the targets, what the table holds, then one table per context length
    (methods x settings, averaged over tasks) and the per-task rows."""
    lines = ["# Accuracy vs compression", "", f"Produced by: `{command}`", ""]
    average = averaged(rows)
    ns = sorted({r["n"] for r in rows})
    grid = any(r.get("ratio") is not None for r in rows)
    lines += [
        "## Targets",
        "",
        f"Samples per task and length: {', '.join(map(str, ns))}"
        + (" (the target is n >= 50: MISSED, see below)" if ns and min(ns) < 50 else ""),
        "",
    ]
    for length in sorted({r["length"] for r in rows}):
        lines += targets(rows, length)
    lines += [
        "",
        "Fixed-ratio methods (random, streaming, snapkv, kvzap_adakv, kvzip_plus; setting `ratio of tau=T`) prune the"
        " context at the compression ratio KVzap-MLP achieved at tau T on the same task and length; they never prune"
        " the question or the answer, which KVzap does once they leave its window, so their overall achieved ratio is"
        " a few points lower: they hold more of the cache than KVzap."
        + (" With the setting `ratio=R` they ran at their own compression ratio R (`sweep --ratios`)." if grid else "")
        + " Accuracy of one task is a fraction of its n"
        " samples" + (f" (n = {ns[0]}: steps of {100 / ns[0]:.0f} points)." if len(ns) == 1 else "."),
        "",
        "## What the table holds",
        "",
        "The averages below keep a setting only where it was measured on every task of its length; the table holds:",
        "",
        *coverage_lines(rows),
        "",
    ]
    for length in sorted({r["length"] for r in rows}):
        lines += [
            f"## Context length {length} (average over {tasks_note(rows, length)})",
            "",
            "| method | setting | compression ratio | accuracy | ± 95% | n |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in average if r["length"] == length), key=lambda r: (r["method"], setting_label(r))):
            lines.append(
                f"| {r['method']} | {setting_label(r)} | {r['compression_ratio']:.3f} | {100 * r['accuracy']:.1f}"
                f" | {100 * estimate_of(r).half_width:.1f} | {r['n']} |"
            )
        lines.append("")
        lines += frontier_lines(rows, length)
    lines += [
        "## Per task",
        "",
        "| task | length | method | setting | compression ratio | accuracy | ± 95% | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], r["length"], r["method"], setting_label(r))):
        lines.append(
            f"| {r['task']} | {r['length']} | {r['method']} | {setting_label(r)} | {r['compression_ratio']:.3f} "
            f"| {100 * r['accuracy']:.1f} | {100 * estimate_of(r).half_width:.1f} | {r['n']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Accuracy (%) vs compression ratio, one curve per method (full cache as a horizontal line)."""
    curves: dict[str, CurvePoints] = defaultdict(list)
    for r in rows:
        curves[r["method"]].append((r["compression_ratio"], estimate_of(r)))
    plot_curves(curves, path, title)


def plot_frontier(rows: list[Row], path: Path) -> bool:
    """The summary figure: per method and length, the highest compression (x-fold) whose task average stays within
    1 point of the full cache, labelled with its accuracy minus the full cache's (95%). False when nothing to draw."""
    lengths = sorted({r["length"] for r in rows})
    found = {}
    for length in lengths:
        here = points([("", [r for r in rows if r["length"] == length])])[0]
        found[length] = {p.curve.method: (p, below) for p, below in highest_within_full(here, length)}
    methods = sorted({method for by_method in found.values() for method in by_method})
    if not methods:
        return False
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(methods) + 2), 4))
    width = 0.8 / len(lengths)
    for index, length in enumerate(lengths):
        xs = [m + (index - (len(lengths) - 1) / 2) * width for m in range(len(methods))]
        heights = [1 / (1 - found[length][m][0].compression) if m in found[length] else 0.0 for m in methods]
        axis.bar(xs, heights, width=width, label=f"{length} tokens")
        for x, height, method in zip(xs, heights, methods):
            if method in found[length]:
                axis.annotate(found[length][method][1].points(), (x, height), ha="center", va="bottom", fontsize=7,
                              rotation=90, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    axis.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("compression (x), accuracy within 1 point")
    axis.set_title("highest compression within 1 point of the full cache\n(label: accuracy minus full, points, 95%)",
                   fontsize=9)  # fmt: skip
    axis.set_ylim(0, 1.35 * max(max(1 / (1 - p.compression) for p, _ in f.values()) for f in found.values() if f))
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(table: Path, out_dir: Path, command: str) -> Path:
    """Write `README.md` and PNG plots for `table` into `out_dir` (one report per identity when the table mixes
    runs of several, with an index); returns the markdown path."""
    rows = list({row["key"]: row for row in load_table(table)}.values())  # one row per run (sweeps may overlap)
    groups = identity_groups(rows)
    if len(groups) == 1:
        return _write_one(rows, out_dir, command)
    lines = [
        "# Accuracy vs compression",
        "",
        f"Produced by: `{command}`",
        "",
        f"This table mixes runs of {len(groups)} identities, whose results are not comparable with each other; each"
        " has its own report (a row that does not depend on a differing field, e.g. the full cache for another"
        " surrogate, is in each report it fits):",
        "",
    ]
    for number, (label, members) in enumerate(groups, 1):
        name = f"identity-{number}"
        _write_one(members, out_dir / name, f"{command} (runs with {label})")
        lines.append(f"- [{name}]({name}/README.md): {label} ({len(members)} rows)")
    print(f"note: {table} mixes runs of {len(groups)} identities: one report each, listed in {out_dir}/README.md",
          file=sys.stderr)  # fmt: skip
    return write_text_atomic(out_dir / "README.md", "\n".join(lines) + "\n")


def _write_one(rows: list[Row], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, command)
    images = ["frontier.png"] if plot_frontier(rows, out_dir / "frontier.png") else []
    for length in sorted({r["length"] for r in rows}):
        name = f"average_{length}.png"
        plot(
            [r for r in averaged(rows) if r["length"] == length], out_dir / name, f"average over tasks, {length} tokens"
        )
        images.append(name)
        for task in sorted({r["task"] for r in rows if r["length"] == length}):  # no empty plot for a task not run
            name = f"{task}_{length}.png"
            plot([r for r in rows if r["task"] == task and r["length"] == length], out_dir / name, f"{task}, {length}")
            images.append(name)
    text += "\n## Plots\n\n" + "\n".join(f"![{name}]({name})" for name in images) + "\n"
    latency = out_dir.parent / "latency" / "latency.png"
    if latency.is_file():
        text += "\n## Scorer latency per layer call (`kvzap-eval latency`, see ../latency/latency.md)\n\n"
        text += "![latency](../latency/latency.png)\n"
    return write_text_atomic(out_dir / "README.md", text)


def default_report_dir(table: Path) -> Path:
    """Where `kvzap-eval report T.jsonl` writes without --out: a directory beside the table, named after it."""
    return table.with_name(f"{table.stem}-report")


def main(argv: list[str] | None = None) -> int:
    import shlex

    parser = OneLineParser(prog="kvzap-eval report", description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="JSONL table written by `kvzap-eval sweep`")
    parser.add_argument(
        "--out", type=Path, default=None, help="report directory (default: <table dir>/<table name>-report, beside it)"
    )
    args = parser.parse_args(argv)
    if args.out is None:  # never the committed reports/ by accident
        args.out = default_report_dir(args.table)
    check_writable_dir(args.out, "--out")
    require("matplotlib", "report")  # before any work: the plots need it
    command = "kvzap-eval report " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))
    try:
        print(write_report(args.table, args.out, command))
    except OSError as error:
        raise ConfigError(f"--out {args.out}: the report could not be written ({error.strerror})") from None
    return 0
