"""Where a surrogate comes from: load it from a hub id, a checkpoint directory or memory, and fingerprint it.

The fingerprint (`weights_sha256`) is what ties an exported artifact to the surrogate a backend is given: it is a
SHA-256 over the tensors' names, shapes and fp32 values, so it does not depend on file layout or load dtype.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvzap_eval.errors import ConfigError
from kvzap_eval.surrogate import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    KVzapSurrogate,
    load_surrogate,
)

_CHUNK = 1 << 22


@dataclass(frozen=True)
class SourceInfo:
    """Provenance of an export: `id` as given (hub id, directory or in-memory name), the hub `revision` (snapshot
    commit) when it came from the hub cache, SHA-256 of the checkpoint files, and the weights fingerprint."""

    id: str
    weights_sha256: str
    revision: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "revision": self.revision, "files": dict(self.files),
                "weights_sha256": self.weights_sha256}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> SourceInfo:
        return cls(data["id"], data["weights_sha256"], data.get("revision"), dict(data.get("files") or {}))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(surrogate: KVzapSurrogate) -> str:
    """Fingerprint of a surrogate's weights (names, shapes and values as fp32), independent of storage dtype."""
    digest = hashlib.sha256()
    for name, tensor in sorted(surrogate.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _checkpoint_dir(text: str, revision: str | None) -> Path:
    directory = Path(text).expanduser()
    if directory.is_dir():
        return directory
    from kvzap_eval.surrogate import (
        download_snapshot,  # the loader's hub resolution: cache, offline mode, messages
    )

    return download_snapshot(text, revision)


def _hub_revision(directory: Path) -> str | None:
    """The commit of a hub-cache snapshot directory (`.../models--o--n/snapshots/<commit>`), else None."""
    parent = directory.resolve().parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return directory.resolve().name
    return None


def load_source(
    source: str | os.PathLike | KVzapSurrogate, revision: str | None = None
) -> tuple[KVzapSurrogate, SourceInfo]:
    """Load a surrogate (fp32, eval mode) from a hub id, a checkpoint directory or memory, with its provenance."""
    if isinstance(source, KVzapSurrogate):
        surrogate = source
        # never cast or move the caller's module in place; export and validation run in fp32 on the CPU
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in source.parameters()):
            surrogate = copy.deepcopy(source).float().cpu()
        surrogate.eval()
        name = surrogate.source or f"<in memory {surrogate.model_type}>"
        return surrogate, SourceInfo(name, weights_sha256(surrogate))
    text = os.fspath(source)
    if revision is not None and Path(text).expanduser().is_dir():
        raise ConfigError(f"--revision {revision} applies to hub ids, not to the local directory {text!r}: drop it")
    surrogate = load_surrogate(text, revision=revision, dtype=torch.float32)
    directory = _checkpoint_dir(text, revision)
    files = {name: file_sha256(directory / name) for name in (CONFIG_NAME, WEIGHTS_NAME)}
    return surrogate, SourceInfo(text, weights_sha256(surrogate), _hub_revision(directory) or revision, files)
