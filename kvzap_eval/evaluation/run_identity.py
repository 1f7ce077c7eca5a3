"""What determines a sweep row's result, recorded in the row (`identity`) and hashed into its resume key.

A run's identity holds: the model (a directory's name and a fingerprint of its config, tokenizer, chat template and
weights; a hub id as given), the dtype, the evaluation protocol, whether the chat template is applied, the sample
limit, every method setting that is not the method's own (window, decoding, backend, n_sink, alpha, seed, ...: the
`MethodConfig` defaults overlaid with `--model-args`), the task's version, and for runs whose result depends on a
KVzap surrogate (KVzap itself and the methods matched to its ratio) that surrogate: its name and the SHA-256 of its
weights. Device, batch size, process count, scorer-export location and thread counts are left out: they change
how fast a run goes, not what it measures (the tests hold them to float rounding).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import ConfigError

IDENTITY_VERSION = 1
DTYPE = "float32"  # the dtype `kvzap-eval sweep` loads models in
PROTOCOL = "paper"  # the evaluation protocol `kvzap-eval sweep` runs
#: MethodConfig fields that are not run settings of the identity: set per run (method, threshold, ratio), given by the
#: method (model_type), recorded as a fingerprint instead (surrogate), or about speed and place only.
NOT_SETTINGS = ("method", "threshold", "compression_ratio", "model_type", "surrogate", "backend_dir", "backend_threads")
#: Model files read into the fingerprint (weights sampled when large); README, licence and git files are not.
MODEL_FILE_SUFFIXES = (".json", ".jinja", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".py")
FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 1 << 20  # larger ones: their size and three 1 MiB samples (start, middle, end)
#: config keys written by the saving library's version, not by the model
UNSTABLE_CONFIG_KEYS = ("transformers_version", "_name_or_path")


def digest(identity: dict) -> str:
    """Short hash of an identity, part of the row's key."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1


def _file_digest(path: Path) -> bytes:
    size = path.stat().st_size
    if path.suffix == ".json" and size <= FULL_HASH_BYTES:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict):
            stable = {k: v for k, v in data.items() if k not in UNSTABLE_CONFIG_KEYS}
            return json.dumps(stable, sort_keys=True).encode()
    if size <= FULL_HASH_BYTES:
        return hashlib.sha256(path.read_bytes()).digest()
    sample = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            handle.seek(offset)
            sample.update(handle.read(SAMPLE_BYTES))
    return sample.digest()


def model_fingerprint(pretrained: str) -> str:
    """`<directory name>@<fingerprint>` of a local model directory, else the hub id as given.

    A directory's fingerprint covers the names and contents of its config, tokenizer and chat template files and,
    for weight files over 64 MiB, their size and three 1 MiB samples: it is the same for one model copied to
    another machine, and differs for another model or another fine-tune of one."""
    directory = Path(pretrained).expanduser()
    if not directory.is_dir():
        if directory.exists() or _looks_like_path(pretrained):
            raise ConfigError(
                f"--pretrained {pretrained!r} is not a model directory: give one, or a hub id (owner/name)"
            )
        return pretrained
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)
    if not any(p.name == "config.json" for p in files):
        raise ConfigError(f"--pretrained {pretrained!r} has no config.json: give a Hugging Face model directory")
    whole = hashlib.sha256()
    for path in files:
        whole.update(path.name.encode() + b"\0" + _file_digest(path))
    return f"{directory.name}@{whole.hexdigest()[:16]}"


def surrogate_fingerprint(source) -> str:
    """`<name>@<SHA-256 of the weights>` of a surrogate (directory name or hub id; loads it, which is cheap)."""
    from exporters.source import weights_sha256

    from ..surrogate import load_surrogate

    text = str(source)
    name = Path(text).name if Path(text).expanduser().is_dir() else text
    return f"{name}@{weights_sha256(load_surrogate(source))[:16]}"


@dataclass
class TaskInfo:
    """What the sweep needs to know of a task before running it."""

    version: Any  # metadata.version of the task's YAML (None when it has none)
    lengths: tuple[int, ...] | None  # the context lengths it has a metric for; None: any (it ignores the length)


def task_infos(tasks: list[str], lengths: list[int], include_path: str) -> dict[str, TaskInfo]:
    """Each task's version and context lengths, from lm-eval's index of `include_path`; an unknown task, a group
    or a length a task does not offer is a one-line `ConfigError` before any model is loaded."""
    import difflib

    from lm_eval.tasks import TaskManager

    if not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path!r} is not a directory of lm-eval task YAML files")
    index = TaskManager(include_path=include_path, include_defaults=False).task_index
    known = sorted(name for name, entry in index.items() if _kind(entry) in ("TASK", "PY_TASK"))
    infos = {}
    for task in tasks:
        entry = index.get(task)
        if entry is None:
            close = difflib.get_close_matches(task, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown task {task!r} in {include_path}{hint}: choose among {', '.join(known) or 'none'}"
            )
        if _kind(entry) not in ("TASK", "PY_TASK"):
            members = " ".join(_members(index, task, known)) or "..."
            raise ConfigError(
                f"{task!r} in {include_path} is a {_kind(entry).lower()} of tasks, not a task: give its tasks one by"
                f" one (--tasks {members})"
            )
        infos[task] = _task_info(entry.cfg or {})
        offered = infos[task].lengths
        missing = [length for length in lengths if offered is not None and length not in offered]
        if missing:
            raise ConfigError(
                f"task {task} offers context lengths {', '.join(map(str, offered))}, not"
                f" {', '.join(map(str, missing))}: choose --lengths among them"
            )
    return infos


def _kind(entry) -> str:
    return getattr(getattr(entry, "kind", None), "name", "TASK")


def _members(index: dict, name: str, known: list[str]) -> list[str]:
    """The tasks of a group (its `task:` list) or of a tag (the tasks tagged with it)."""
    listed = (getattr(index[name], "cfg", None) or {}).get("task")
    if isinstance(listed, list):
        return [member for member in listed if isinstance(member, str)]
    return [task for task in known if name in set(getattr(index[task], "tags", None) or ())]


def _task_info(cfg: dict) -> TaskInfo:
    names = [str(metric.get("metric")) for metric in cfg.get("metric_list") or [] if isinstance(metric, dict)]
    lengths = tuple(int(name) for name in names if name.isdigit())
    version = (cfg.get("metadata") or {}).get("version")
    return TaskInfo(version=version, lengths=lengths or None)


def method_settings(model_args: dict) -> dict:
    """The settings every run of a sweep shares: `MethodConfig`'s defaults overlaid with `model_args`."""
    from ..runtime.methods import DEFAULTS

    defaults = {name: value for name, value in DEFAULTS.items() if name not in NOT_SETTINGS}
    return {**defaults, **{k: v for k, v in model_args.items() if k not in NOT_SETTINGS}}


@dataclass
class SweepIdentity:
    """Builds the identity of each run of one sweep; fingerprints are computed once, when a run first needs them."""

    pretrained: str  # the resolved model path or hub id
    common: dict
    tasks: dict[str, TaskInfo]
    surrogate_arg: str | None
    _surrogates: dict[str, str] = field(default_factory=dict)

    def surrogate(self, model_type: str) -> str:
        if model_type not in self._surrogates:
            from ..surrogate import resolve_surrogate_source

            config = SimpleNamespace(name_or_path=self.pretrained)
            source = resolve_surrogate_source(config, self.surrogate_arg, model_type)
            self._surrogates[model_type] = surrogate_fingerprint(source)
        return self._surrogates[model_type]

    def of(self, method: str, task: str, surrogate_type: str | None) -> dict:
        """The identity of a run of `method` on `task` that depends on the `surrogate_type` surrogate (or none)."""
        identity = {**self.common, "task_version": self.tasks[task].version}
        if surrogate_type is not None:
            identity[f"surrogate_{surrogate_type}"] = self.surrogate(surrogate_type)
        return identity


def sweep_identity(
    pretrained: str, model_args: dict, limit: int | None, apply_chat_template: bool, tasks: dict[str, TaskInfo]
) -> SweepIdentity:
    common = {
        "identity_version": IDENTITY_VERSION,
        "model": model_fingerprint(pretrained),
        "dtype": DTYPE,
        "protocol": PROTOCOL,
        "chat_template": apply_chat_template,
        "limit": limit,
        **method_settings(model_args),
    }
    return SweepIdentity(pretrained, common, tasks, model_args.get("surrogate"))
