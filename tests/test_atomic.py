"""Atomic writes (one home, kvzap_eval/atomic.py): no half file or directory is ever visible, nothing is left over."""

from __future__ import annotations

import json
import stat

import pytest

from kvzap_eval.atomic import atomic_file, staged_directory, write_bytes_atomic, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_bytes_atomic(tmp_path / "a.bin", b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_written_files_are_world_readable_json_with_a_final_newline(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "a.json", {"x": 1}, indent=None)
    assert path.read_text() == '{"x": 1}\n' and json.loads(path.read_text()) == {"x": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_staged_directory_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with staged_directory(target, complete="done") as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(target, complete="done") as tmp:
        (tmp / "done").write_text("mine")
    assert (target / "done").read_text() == "mine" and stat.S_IMODE(target.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_when_another_process_finished_first_its_directory_is_kept(tmp_path):
    target = tmp_path / "export"
    with staged_directory(target, complete="done") as tmp:
        (tmp / "done").write_text("late")
        target.mkdir()
        (target / "done").write_text("first")  # the other process renamed its copy meanwhile
    assert (target / "done").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_an_incomplete_directory_in_the_way_is_an_error(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "stray").write_text("x")
    with pytest.raises(OSError):
        with staged_directory(target, complete="done") as tmp:
            (tmp / "done").write_text("mine")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
