"""The report's "What the table holds" section: each method's settings and on how many of a length's tasks they ran."""

from kvzap_eval.evaluation.coverage import coverage_lines
from kvzap_eval.evaluation.report import markdown


def _row(task, method, length=1024, threshold=None, ratio=None, matched=None):
    setting = {"threshold": threshold, "ratio": ratio, "matched_threshold": matched}
    return {"task": task, "method": method, "length": length, **setting, "accuracy": 0.5, "compression_ratio": 0.5,
            "n": 10, "key": f"{task}{method}"}  # fmt: skip


def test_settings_are_grouped_by_how_many_tasks_measured_them_in_numeric_order():
    rows = [_row(t, "full") for t in ("a", "b", "c")]
    rows += [_row(t, "kvzap_mlp", threshold=tau) for t in ("a", "b", "c") for tau in (-10.0, -2.0, -3.0)]
    rows += [_row("a", "kvzap_mlp", threshold=0.0), _row("b", "random", matched=-3.0)]
    rows += [_row(t, "snapkv", ratio=r) for t in ("a", "b") for r in (0.9, 0.5)]
    rows += [_row("a", "full", length=2048)]
    assert coverage_lines(rows)[2:] == [
        "| 1024 | full | full (3/3) |",
        "| 1024 | kvzap_mlp | tau=-10.0, tau=-3.0, tau=-2.0 (3/3); tau=0.0 (1/3) |",
        "| 1024 | random | ratio of tau=-3.0 (1/3) |",
        "| 1024 | snapkv | ratio=0.5, ratio=0.9 (2/3) |",
        "| 2048 | full | full (1/1) |",
    ]


def test_the_report_says_what_its_averages_leave_out():
    rows = [_row(t, "full") for t in ("a", "b")] + [_row("a", "kvzap_mlp", threshold=-3.0)]
    text = markdown(rows, "kvzap-eval report t.jsonl")
    assert "| 1024 | kvzap_mlp | tau=-3.0 (1/2) |" in text.split("## What the table holds")[1]
    average = text.split("## Context length 1024")[1].split("## Per task")[0]
    assert "kvzap_mlp" not in average  # measured on one of the two tasks: not averaged
