"""The `nvidia/KVzap-*` checkpoint format on disk: `config.json` + `model.safetensors`, read and written with plain
json and safetensors (no `PretrainedConfig`, whose defaults changed between transformers 4.x and 5.x).

- `config.json`: `model_type: "kvzap"`, `input_dim` (= hidden_size), `output_dim` (= num_key_value_heads),
  `hidden_dim` (null for linear, D/8 for MLP), `n_modules` (= num_hidden_layers), plus `architectures`,
  `dtype` and `transformers_version`.
- `model.safetensors`: linear `layers.{i}.weight`, `layers.{i}.bias`; MLP `layers.{i}.0.weight`,
  `layers.{i}.0.bias`, `layers.{i}.2.weight`, `layers.{i}.2.bias`.

Pickle checkpoints (`pytorch_model.bin`, `*.pt`...) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file, write_text_atomic
from ..errors import CheckpointError
from .hub import CONFIG_NAME, _looks_like_path, download_snapshot
from .model import KVzapSurrogate, SurrogateConfig, _as_dtype, expected_tensor_shapes

WEIGHTS_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def save_surrogate(
    model: KVzapSurrogate, directory: str | os.PathLike, *, dtype: torch.dtype | str | None = None
) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (created if needed), atomically per file.

    `dtype` None keeps the model's parameter dtype. Returns the directory.
    """
    directory = Path(directory)
    first = next(model.parameters())
    out_dtype = first.dtype if dtype is None else _as_dtype(dtype)
    tensors = {k: v.detach().to("cpu", out_dtype).contiguous() for k, v in model.state_dict().items()}
    _check_finite(tensors, f"surrogate to save in {str(directory)!r}", "retrain it (its training diverged) or save "
                  "it in float32")  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(model.config.to_json_dict(out_dtype), indent=2) + "\n"

    with atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text_atomic(directory / CONFIG_NAME, config_text)
    return directory


def _refuse_pickle(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"surrogate directory {str(directory)!r} holds only pickle checkpoints ({', '.join(pickles)}), which are "
            "refused because loading them can run arbitrary code: convert them to model.safetensors"
        )
    raise CheckpointError(
        f"surrogate directory {str(directory)!r} has no {WEIGHTS_NAME}: it needs {CONFIG_NAME} and {WEIGHTS_NAME}"
    )


def _read_config(directory: Path) -> SurrogateConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"surrogate directory {str(directory)!r} has no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"surrogate config {str(path)!r} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"surrogate config {str(path)!r} is not a JSON object")
    return SurrogateConfig.from_json_dict(data, path)


def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _check_tensors(path: Path, config: SurrogateConfig) -> None:
    """Compare the safetensors header (keys, shapes, dtypes) with `config` without reading the weights."""
    expected = expected_tensor_shapes(config)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"surrogate weights {str(path)!r} are not a readable safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = [f"missing {_few(missing)}"] if missing else []
        parts += [f"unexpected {_few(unexpected)}"] if unexpected else []
        raise CheckpointError(
            f"surrogate weights {str(path)!r} do not match its {config.model_type} config "
            f"(n_modules={config.n_modules}): {'; '.join(parts)}"
        )
    for key, shape in expected.items():
        got, st_dtype = found[key]
        if got != shape:
            raise CheckpointError(
                f"surrogate weights {str(path)!r}: tensor {key!r} has shape {list(got)}, its config expects "
                f"{list(shape)} (input_dim={config.input_dim}, output_dim={config.output_dim}, "
                f"hidden_dim={config.hidden_dim})"
            )
        if st_dtype not in {"F64", "F32", "F16", "BF16"}:
            raise CheckpointError(
                f"surrogate weights {str(path)!r}: tensor {key!r} has dtype {st_dtype}, not a float type"
            )


def _check_finite(tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Refuse NaN or infinite weights, naming the first tensor that holds any (they would score every token NaN)."""
    for key in sorted(tensors):
        bad = int((~torch.isfinite(tensors[key])).sum())
        if bad:
            raise CheckpointError(
                f"{where}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensors[key].numel()}: {fix}"
            )


def load_surrogate(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str | None = torch.float32,
) -> KVzapSurrogate:
    """Load a surrogate from a local directory or a hub id (e.g. `nvidia/KVzap-mlp-Qwen3-8B`), in eval mode.

    Hub ids go through `huggingface_hub.snapshot_download`, so the HF cache and `HF_HUB_OFFLINE` are honoured.
    `dtype` None keeps the stored dtype. Raises `CheckpointError` for anything missing, malformed or pickled.
    """
    text = os.fspath(source)
    directory = Path(text).expanduser()
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(
                f"surrogate {text!r} is a file: pass the directory holding {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    elif _looks_like_path(text):
        raise CheckpointError(f"surrogate directory {text!r} does not exist")
    else:
        directory = download_snapshot(text, revision)

    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        _refuse_pickle(directory)
    config = _read_config(directory)
    _check_tensors(weights, config)
    tensors = load_file(str(weights), device="cpu")
    _check_finite(tensors, f"surrogate weights {str(weights)!r}", "retrain the surrogate or restore its file")
    if dtype is not None:
        target = _as_dtype(dtype)
        tensors = {k: v.to(target) for k, v in tensors.items()}
        _check_finite(tensors, f"surrogate weights {str(weights)!r} cast to {target}", "load it in a wider dtype")
    with torch.device("meta"):
        model = KVzapSurrogate(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.source = text
    return model.eval()
