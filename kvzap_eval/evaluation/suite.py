"""The offline long-context suite: its tasks are those of the `kvzap_longctx` group in `tasks/`, read from the
group's YAML (the one place that lists them)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

SUITE = "kvzap_longctx"


def suite_tasks(include_path: str | os.PathLike = "tasks", group: str = SUITE) -> list[str]:
    """The task names of `group`, in the order its YAML lists them."""
    import yaml

    path = Path(include_path) / f"{group}.yaml"
    if not path.is_file():
        raise ConfigError(f"no {group} group at {path}: give --include-path the tasks/ folder of kvzap-eval")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    tasks = data.get("task") if isinstance(data, dict) else None
    if not tasks or not isinstance(tasks, list) or not all(isinstance(task, str) for task in tasks):
        raise ConfigError(f"{path} lists no task names under 'task:': restore it from kvzap-eval's tasks/")
    return tasks
