"""Preflight of an lm-eval command that runs `kvzap_hf`: its default model made explicit, and lm-eval's own tasks
that cannot run offline refused before anything loads.

lm-eval's RULER tasks generate their data themselves, sized with the tokenizer named by `pretrained` (or
`tokenizer`) in the task metadata, which lm-eval builds from `--model_args` and `--metadata` when it reads the
command line, before any model exists. `kvzap_hf`'s default model (the embedded SmolLM2) is implicit, so without
help it never reaches them. `with_default_model` adds `--model_args {"pretrained": "<its directory>"}` to a
`kvzap_hf` command that names no model (or names it by an alias such as `embedded`): the argument a user would type,
which lm-eval then passes to the model and the tasks alike and records in the results. Both front doors apply it
before lm-eval parses anything: `kvzap-eval` to its own arguments, the startup hook (`lm_eval_hook.py`) to the
stock `lm_eval` command's.

Some of lm-eval's RULER tasks fetch data at run time (`DOWNLOADS`). Offline (`HF_HUB_OFFLINE`,
`HF_DATASETS_OFFLINE` or `TRANSFORMERS_OFFLINE` set) and without a local copy, `check_offline` refuses them in one
line that names each task and what it would fetch: `kvzap-eval` before it starts lm-eval, the stock `lm_eval`
when it builds `kvzap_hf` (the first of our code to run after the command line is read; tasks are built later).

The command line is read with lm-eval's own parser, so it means exactly what it means to lm-eval.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import ConfigError
from ..llm.embedded import embedded_model_path, is_embedded
from .lm_eval_hook import MODEL_NAME


@dataclass(frozen=True)
class LmEvalCommand:
    """What an `lm_eval run` command line asks for, after lm-eval's precedence (command line over `--config`)."""

    model: str
    model_args: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)
    model_args_on_command_line: bool = False  # False: they come from the --config YAML (or there are none)


class Download(NamedTuple):
    """What a task fetches at run time (a phrase after "needs"), and the Hub dataset id when a copy in the local
    cache can serve instead."""

    what: str
    hub_dataset: str | None = None


_ESSAYS = Download(
    "the Hub dataset baber/paul_graham_essays (the essay haystack), which is not in the local cache",
    "baber/paul_graham_essays",
)

#: lm-eval's RULER tasks (0.4.13) that fetch data at run time; the others generate theirs (`RULER_OFFLINE`).
DOWNLOADS = {
    "niah_single_2": _ESSAYS,
    "niah_single_3": _ESSAYS,
    "niah_multikey_1": _ESSAYS,
    "niah_multivalue": _ESSAYS,
    "niah_multiquery": _ESSAYS,
    "ruler_qa_squad": Download("SQuAD v2 dev from rajpurkar.github.io, downloaded at every run"),
    "ruler_qa_hotpot": Download("HotpotQA dev from huggingface.co, downloaded at every run"),
}
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
#: lm-eval groups made of these tasks.
GROUPS = {"ruler": (*RULER_OFFLINE, *DOWNLOADS)}
OFFLINE_ALTERNATIVES = f"{', '.join(RULER_OFFLINE)}, or kvzap_longctx (--include_path tasks)"

_command: LmEvalCommand | None = None  # the lm-eval command of this process, once a front door has read it


def parse(argv: Sequence[str]) -> LmEvalCommand | None:
    """The evaluation an lm-eval command line (without the program name) asks for; None for another subcommand
    (`ls`, `validate`) or a command line lm-eval will refuse itself."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    cli = HarnessCLI()
    args = list(argv)
    if len(args) > 1 and args[0] not in cli._subparsers.choices:  # lm-eval's rule: no subcommand means `run`
        args.insert(0, "run")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            namespace = cli._parser.parse_args(args)
        if namespace.command != "run":
            return None
        config = EvaluatorConfig.load_yaml_config(namespace.config) if namespace.config else {}
    except (SystemExit, OSError, ValueError):  # lm-eval reports these itself, in its own words
        return None
    tasks = namespace.tasks or config.get("tasks") or []
    tasks = tasks.split(",") if isinstance(tasks, str) else [name for item in tasks for name in str(item).split(",")]
    return LmEvalCommand(
        model=namespace.model or config.get("model") or "hf",
        model_args=dict(namespace.model_args or config.get("model_args") or {}),
        tasks=tuple(name.strip() for name in tasks if name.strip()),
        metadata=dict(namespace.metadata or config.get("metadata") or {}),
        model_args_on_command_line=bool(namespace.model_args),
    )


def with_default_model(argv: Sequence[str], command: LmEvalCommand | None) -> list[str]:
    """`argv` with `--model_args {"pretrained": "<embedded dir>"}` added when `command` runs kvzap_hf on its default
    model (no `pretrained`, or an alias of the embedded model); otherwise `argv` unchanged.

    lm-eval merges repeated `--model_args`; when the model args come from a `--config` YAML, a command-line
    `--model_args` would replace them all, so they are carried along.
    """
    if command is None or command.model != MODEL_NAME or not is_embedded(command.model_args.get("pretrained")):
        return list(argv)
    pretrained = str(embedded_model_path())
    if command.model_args.get("pretrained") == pretrained:
        return list(argv)
    added = {"pretrained": pretrained}
    if not command.model_args_on_command_line:
        added = {**command.model_args, **added}
    return [*argv, "--model_args", json.dumps(added)]


def complete_and_remember(argv: Sequence[str]) -> list[str]:
    """Read an lm-eval command line, remember it for this process, and return it with kvzap_hf's default model
    made explicit (`with_default_model`, said in one line on stderr)."""
    global _command
    command = parse(argv)
    completed = with_default_model(argv, command)
    if completed != list(argv):
        print(f"kvzap-eval: {MODEL_NAME} runs the embedded model: {' '.join(completed[len(argv) :])}", file=sys.stderr)
    _command = parse(completed) if command is not None else None
    return completed


def offline() -> bool:
    """Whether downloads are switched off by the Hugging Face offline variables (read now)."""
    from ..llm import hub_cache

    return hub_cache.offline() or hub_cache.env_true("HF_DATASETS_OFFLINE")


def expand(tasks: Sequence[str]) -> list[str]:
    """The task names with lm-eval's RULER group replaced by its tasks (other names unchanged)."""
    return [name for task in tasks for name in GROUPS.get(task, (task,))]


def offline_problems(tasks: Sequence[str]) -> dict[Download, list[str]]:
    """The requested tasks that cannot run here (offline, and what they fetch is not cached), by what they fetch."""
    if not offline():
        return {}
    problems: dict[Download, list[str]] = {}
    for task in dict.fromkeys(expand(tasks)):
        download = DOWNLOADS.get(task)
        if download is not None and not (download.hub_dataset and _hub_dataset_cached(download.hub_dataset)):
            problems.setdefault(download, []).append(task)
    return problems


def check_offline(tasks: Sequence[str]) -> None:
    """Refuse, in one line, lm-eval tasks that cannot run offline (see `offline_problems`)."""
    problems = offline_problems(tasks)
    if problems:
        reasons = "; ".join(
            f"{', '.join(group)} need{'' if len(group) > 1 else 's'} {download.what}"
            for download, group in problems.items()
        )
        raise ConfigError(
            f"lm-eval tasks that fetch data cannot run offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set): "
            f"{reasons}. Run them with network access, or choose tasks that generate their data: "
            f"{OFFLINE_ALTERNATIVES}"
        )


def check_current_command() -> None:
    """`check_offline` on the tasks of this process's lm-eval command, when a front door has read it."""
    if _command is not None:
        check_offline(_command.tasks)


def _hub_dataset_cached(dataset: str) -> bool:
    """Whether `datasets` can load the Hub dataset offline, from its cache."""
    import datasets

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            datasets.load_dataset_builder(dataset)
    except Exception:  # any failure means it cannot be loaded here
        return False
    return True
