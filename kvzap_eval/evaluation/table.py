"""JSONL result tables (written by `kvzap-eval sweep` and `merge`, read by `report` and `gate`): one JSON object per
line, one line per run.

Writers leave only whole lines, whatever state they find the file in. A row is appended with one write, flushed
and fsync'ed, under an exclusive lock, after a torn last line (an interrupted write) has been moved out; whole-table
writes (merge, repair) go through a temporary file and a rename. A line that is not a JSON object is never dropped
silently: it is moved to `<table>.torn`, with one warning on stderr. A row written straight after a torn fragment
(kvzap-eval did that before tables were repaired) is recovered from its line.

`read_table` is the lenient reader of a table being written (it returns the rows and skips the rest);
`load_table` is the strict one of a table being reported or merged: a missing or empty table, a line that is not a
JSON object, a row without one of its figures is a one-line `TableError`.

Rows carry their run identity (`identity`: what determines the result: model, surrogate, limit, settings...; see
`run_identity.py`). `identity_conflict` says whether two sets of rows may share a table; rows written before
identities existed count as identity version 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import ConfigError

TORN_SUFFIX = ".torn"
#: What every row needs to be reported or merged, with the check its value must pass.
REQUIRED_FIELDS = {
    "key": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "method": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "task": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "length": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
    "n": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
    "accuracy": (lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "compression_ratio": (lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
}
#: The identity of rows written before rows carried one.
LEGACY_IDENTITY = {"identity_version": 0}
#: Identity fields that belong to a task: rows of different tasks may differ in them.
PER_TASK_FIELDS = ("task_version",)


class TableError(ConfigError):
    """A results table is missing, unreadable, malformed, or mixes runs that must not share it."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Line:
    """One line of a table: its row (None when it holds none) and the text around it that is not a row."""

    number: int
    row_text: str  # the JSON text of the row ('' when none)
    row: dict | None
    fragment: str = ""  # a torn write or other garbage (the whole line when `row` is None)


@dataclass
class TableScan:
    path: Path
    lines: list[Line]
    ends_whole: bool  # the file is empty or ends with a newline

    @property
    def rows(self) -> list[dict]:
        return [line.row for line in self.lines if line.row is not None]

    @property
    def damaged(self) -> list[Line]:
        return [line for line in self.lines if line.fragment]

    @property
    def torn_tail(self) -> Line | None:
        """The last line when it is an interrupted write (no newline and no whole row)."""
        if self.lines and not self.ends_whole and self.lines[-1].row is None:
            return self.lines[-1]
        return None

    @property
    def needs_repair(self) -> bool:
        return bool(self.damaged) or not self.ends_whole


def _parse_line(number: int, text: str) -> Line:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return Line(number, text, value)
    start = text.find('{"', 1)
    while start > 0:  # a row appended straight after a torn fragment
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return Line(number, text[start:], value, fragment=text[:start])
        start = text.find('{"', start + 1)
    return Line(number, "", None, fragment=text)


def scan_table(path: Path) -> TableScan:
    """Every line of a table, parsed; a missing table has none. Never raises on content."""
    path = Path(path)
    if not path.exists():
        return TableScan(path, [], True)
    if not path.is_file():
        raise TableError(f"table {path} is not a file: give the JSONL file `kvzap-eval sweep --output` writes")
    try:
        data = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as error:
        raise TableError(f"table {path} cannot be read: {error.strerror}") from None
    texts = data.split("\n")
    ends_whole = texts[-1] == ""
    if ends_whole:
        texts.pop()
    lines = [_parse_line(number, text) for number, text in enumerate(texts, 1) if text.strip()]
    return TableScan(path, lines, ends_whole)


def read_table(path: Path) -> list[dict]:
    """The rows of a table being written (a sweep's own): torn or malformed lines are skipped here, and moved to
    `<table>.torn` by the next write (`append_row`, `repair_table`)."""
    return scan_table(path).rows


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The table `path` (created if missing) opened for appending, under an exclusive lock that every writer here
    takes; a table replaced while we waited (by a repair or a merge) is opened and locked again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            raise TableError(f"table {path} cannot be written: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)


def _repair_locked(scan: TableScan) -> None:
    path = scan.path
    damaged = scan.damaged
    if damaged:
        torn = path.with_name(path.name + TORN_SUFFIX)
        with open(torn, "a", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write("".join(line.fragment + "\n" for line in damaged))
            handle.flush()
            os.fsync(handle.fileno())
        numbers = ", ".join(str(line.number) for line in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
        _warn(
            f"{path}: {len(damaged)} torn or malformed line(s) (line {numbers}; an interrupted write?) moved to {torn}"
            f"; the table keeps its {len(scan.rows)} whole row(s)"
        )
    write_text_atomic(path, "".join(line.row_text + "\n" for line in scan.lines if line.row is not None))


def repair_table(path: Path) -> list[dict]:
    """Leave `path` holding only whole rows (torn or malformed lines moved to `<table>.torn`, with a warning);
    returns its rows. A missing table is left missing."""
    path = Path(path)
    if not path.exists():
        return []
    with _locked(path):
        scan = scan_table(path)
        if scan.needs_repair:
            _repair_locked(scan)
    return scan.rows


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def append_row(path: Path, row: dict) -> None:
    """Append one row durably (one write, flush + fsync) so that an interrupt never loses a finished run; a torn
    last line found there is first moved to `<table>.torn`, so the row starts a line of its own."""
    path = Path(path)
    text = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    while True:
        with _locked(path) as fd:
            if _ends_with_newline(fd):
                try:
                    os.write(fd, text)
                    os.fsync(fd)
                except OSError as error:  # e.g. a full disk: what was written is a torn line, repaired next time
                    raise TableError(f"table {path}: the row could not be written ({error.strerror})") from None
                return
            _repair_locked(scan_table(path))
        # the repair replaced the file: lock the new one and append there


def write_table(path: Path, rows: Iterable[dict]) -> None:
    """Replace the table `path` with `rows`, atomically, under the writers' lock."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    with _locked(Path(path)):
        try:
            write_text_atomic(path, text)
        except OSError as error:  # the table is left as it was
            raise TableError(f"table {path} could not be written ({error.strerror}): it is left as it was") from None


def check_row(row: dict, where: str) -> dict:
    """`row` when it has every figure a report or merge needs, else a one-line `TableError` naming `where`."""
    for name, (valid, expected) in REQUIRED_FIELDS.items():
        if name not in row:
            raise TableError(f"{where}: the row has no {name!r}: not a row written by `kvzap-eval sweep`")
        if not valid(row[name]):
            raise TableError(f"{where}: {name} must be {expected}, got {row[name]!r}")
    identity = row.get("identity", LEGACY_IDENTITY)
    if not isinstance(identity, dict) or not _is_int(identity.get("identity_version")):
        raise TableError(f"{where}: identity must be an object with an identity_version, got {identity!r}")
    return row


def load_table(path: Path, *, allow_empty: bool = False) -> list[dict]:
    """The rows of a finished table, strictly: a missing, empty or malformed table or row is a one-line error; a
    torn last line (an interrupted write) is left out with a warning."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"no table at {path}: give a JSONL file written by `kvzap-eval sweep --output`")
    scan = scan_table(path)
    tail = scan.torn_tail
    for line in scan.damaged:
        if line is not tail:
            preview = line.fragment if len(line.fragment) <= 60 else line.fragment[:57] + "..."
            raise TableError(
                f"{path} line {line.number} is not a JSON row ({preview!r}): remove it, or copy the whole rows with"
                f" `kvzap-eval merge --output CLEAN.jsonl {path}`"
            )
    if tail is not None:
        _warn(f"{path}: its last line is torn (an interrupted write) and is left out; the next sweep into it moves it"
              f" to {path.name}{TORN_SUFFIX}")  # fmt: skip
    rows = [check_row(line.row, f"{path} line {line.number}") for line in scan.lines if line.row is not None]
    if not rows and not allow_empty:
        raise TableError(f"table {path} holds no rows: run `kvzap-eval sweep --output {path} ...` first")
    return rows


def identity_of(row: dict) -> dict:
    """The run identity a row carries (the legacy one when it has none)."""
    identity = row.get("identity")
    return identity if isinstance(identity, dict) else LEGACY_IDENTITY


def _field_key(name: str, task: str) -> tuple[str, str | None]:
    return (name, task if name in PER_TASK_FIELDS else None)


def identity_fields(rows: Iterable[dict]) -> dict[tuple[str, str | None], dict[str, object]]:
    """(field, task for per-task fields) -> {canonical JSON of a value: the value} over the rows' identities."""
    fields: dict[tuple[str, str | None], dict[str, object]] = {}
    for row in rows:
        for name, value in identity_of(row).items():
            fields.setdefault(_field_key(name, row["task"]), {})[json.dumps(value, sort_keys=True)] = value
    return fields


def _describe(key: tuple[str, str | None]) -> str:
    name, task = key
    return name if task is None else f"{name} of {task}"


@dataclass
class Conflict:
    """An identity field in which two sets of rows differ: `theirs` and `ours` are its values, as JSON."""

    field: str
    theirs: str
    ours: str
    legacy: bool  # one side has rows without an identity (written by an older kvzap-eval)


def identity_conflict(ours: Iterable[dict], theirs: Iterable[dict]) -> Conflict | None:
    """The first identity field in which rows `ours` and `theirs` differ (so they must not share a table), or
    None. `identity_version` is compared first: rows without an identity differ from rows with one in it."""
    mine, other = identity_fields(ours), identity_fields(theirs)
    for key in sorted(set(mine) & set(other), key=lambda k: (k[0] != "identity_version", k)):
        if set(mine[key]) != set(other[key]) or len(mine[key]) > 1:
            legacy = key[0] == "identity_version" and 0 in {*mine[key].values(), *other[key].values()}
            return Conflict(_describe(key), " or ".join(sorted(other[key])), " or ".join(sorted(mine[key])), legacy)
    return None


def identity_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows split by the identity fields that differ within them: [(label, rows)], one group ('', rows) when they all
    agree. A row that lacks a differing field (e.g. a full-cache row has no surrogate) joins every group it fits."""
    varying = sorted(key for key, values in identity_fields(rows).items() if len(values) > 1)
    if not varying:
        return [("", rows)]

    def signature(row: dict) -> tuple:
        identity = identity_of(row)
        return tuple(
            json.dumps(identity[name], sort_keys=True) if name in identity and (task in (None, row["task"])) else None
            for name, task in varying
        )

    def fits(row_sig: tuple, group: tuple) -> bool:
        return all(mine is None or mine == theirs for mine, theirs in zip(row_sig, group))

    signatures = {signature(row) for row in rows}
    groups = [s for s in signatures if not any(o != s and fits(s, o) for o in signatures)]
    out = []
    for group in sorted(groups, key=lambda g: [v or "" for v in g]):
        label = ", ".join(f"{_describe(key)}={value}" for key, value in zip(varying, group) if value is not None)
        out.append((label, [row for row in rows if fits(signature(row), group)]))
    return out
