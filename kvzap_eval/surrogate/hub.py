"""Where surrogates come from: kvpress's naming rule, surrogates shipped in the package, and the Hugging Face Hub
(its cache and `HF_HUB_OFFLINE` honoured)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..llm import hub_cache
from .model import _check_model_type, _model_name

CONFIG_NAME = "config.json"

#: Surrogates shipped inside the package, keyed by hub-style name `KVzap-{type}-{basename}`.
SURROGATES_DIR = Path(__file__).resolve().parent.parent / "surrogates"


def _looks_like_path(source: str) -> bool:
    """Hub ids are `owner/name`; anything else that is not an existing directory is a (missing) path."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1


def download_snapshot(repo_id: str, revision: str | None) -> Path:
    """Snapshot `config.json` + `*.safetensors` of `repo_id` from the hub or the local HF cache."""
    import huggingface_hub
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_cache.offline()
    rev = f" --revision {revision}" if revision else ""
    fix = f"download it once with network access (hf download {repo_id}{rev}) or pass a local directory"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hub_cache.hub_cache_dir(),
            allow_patterns=[CONFIG_NAME, "*.safetensors"],
            local_files_only=offline,
        )
    except HFValidationError as exc:
        raise CheckpointError(
            f"surrogate {repo_id!r} is neither a local directory nor a valid hub id ({exc})"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"surrogate {repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"surrogate {repo_id!r} does not exist on the Hugging Face Hub (or is private): pass a local directory "
            "or train one for this model"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, HfHubHTTPError) as exc:
        chain = [exc, exc.__cause__, exc.__context__]
        if offline or any(isinstance(e, OfflineModeIsEnabled) for e in chain):
            reason = "HF_HUB_OFFLINE=1"
        else:
            reason = "the Hugging Face Hub cannot be reached"
        raise CheckpointError(
            f"surrogate {repo_id!r} is not in the local Hugging Face cache and {reason}: {fix}"
        ) from None
    return Path(folder)


def _basename(model_name_or_path: str) -> str:
    return model_name_or_path.rstrip("/").split("/")[-1]


def default_surrogate_id(model_name_or_path: str, model_type: str = "mlp") -> str:
    """kvpress's naming rule: `"nvidia/KVzap-" + model_type + "-" + basename(model_name_or_path)`."""
    _check_model_type(model_type)
    basename = _basename(model_name_or_path)
    if not basename:
        raise ConfigError(
            f"cannot derive a surrogate id from model name {model_name_or_path!r}: pass the surrogate explicitly"
        )
    return f"nvidia/KVzap-{model_type}-{basename}"


def _scan_shipped() -> dict[str, Path]:
    if not SURROGATES_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(SURROGATES_DIR.iterdir()) if (d / CONFIG_NAME).is_file()}


SHIPPED: dict[str, Path] = _scan_shipped()


def shipped_surrogate(basename: str, model_type: str = "mlp") -> Path | None:
    """The directory of a surrogate shipped inside the package for this model basename, if there is one."""
    name = f"KVzap-{_check_model_type(model_type)}-{basename}"
    path = SHIPPED.get(name) or SURROGATES_DIR / name
    return path if path.is_dir() else None


def resolve_surrogate_source(
    model_config: Any, surrogate: str | os.PathLike | None, model_type: str = "mlp"
) -> str | os.PathLike:
    """Where to load the surrogate from, for a model given by its transformers config (see `surrogate_source_for`)."""
    return surrogate_source_for(_model_name(model_config), surrogate, model_type)


def surrogate_source_for(
    model_name: str | None, surrogate: str | os.PathLike | None, model_type: str = "mlp"
) -> str | os.PathLike:
    """Where to load the surrogate from: the explicit `surrogate` if given, else a shipped directory for the
    model's basename, else the kvpress hub id derived from the model's name (hub id or directory)."""
    _check_model_type(model_type)
    if surrogate is not None:
        return surrogate
    if not model_name:
        raise ConfigError(
            "the model config has no name_or_path to derive the surrogate from: pass the surrogate explicitly"
        )
    hub_id = default_surrogate_id(model_name, model_type)
    shipped = shipped_surrogate(_basename(model_name), model_type)
    return shipped if shipped is not None else hub_id
