"""KVzap surrogate scorers and their checkpoint format (the `nvidia/KVzap-*` hub layout).

A surrogate holds one small model per decoder layer of the LLM. Each reads the post-`input_layernorm` hidden
state (B, T, D) that the decoder layer passes to `self_attn` and predicts, per KV head, the log KVzip+ score of
every token: output (B, H_kv, T), higher = keep.

Checkpoint layout (what kvpress's `KVzapModel.save_pretrained` writes), loaded here with plain torch,
safetensors and json (no `PretrainedConfig`, whose defaults changed between transformers 4.x and 5.x):

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
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, ConfigError

__all__ = [
    "SHIPPED",
    "SURROGATE_TYPES",
    "KVzapSurrogate",
    "SurrogateConfig",
    "check_against_model",
    "default_surrogate_id",
    "expected_tensor_shapes",
    "load_surrogate",
    "random_surrogate",
    "resolve_surrogate_source",
    "save_surrogate",
    "shipped_surrogate",
    "surrogate_config_for",
]

SURROGATE_TYPES = ("linear", "mlp")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REQUIRED_KEYS = ("input_dim", "output_dim", "n_modules")

#: Surrogates shipped inside the package, keyed by hub-style name `KVzap-{type}-{basename}`.
SURROGATES_DIR = Path(__file__).parent / "surrogates"


def _scan_shipped() -> dict[str, Path]:
    if not SURROGATES_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(SURROGATES_DIR.iterdir()) if (d / CONFIG_NAME).is_file()}


SHIPPED: dict[str, Path] = _scan_shipped()


# --------------------------------------------------------------------------------------------------- config


def _check_model_type(model_type: str) -> str:
    if model_type not in SURROGATE_TYPES:
        raise ConfigError(f"surrogate type {model_type!r} is unknown: use 'linear' or 'mlp'")
    return model_type


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"surrogate {name}={value!r} must be a positive integer")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype {dtype!r} is not a torch floating-point dtype: use e.g. 'float32' or 'bfloat16'")
    return resolved


@dataclass(frozen=True)
class SurrogateConfig:
    """Shapes of a KVzap surrogate: `n_modules` per-layer scorers from `input_dim` to `output_dim`.

    `hidden_dim` None means a linear scorer; otherwise an MLP `Linear -> GELU -> Linear` of that width.
    """

    input_dim: int
    output_dim: int
    n_modules: int
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        _positive_int("input_dim", self.input_dim)
        _positive_int("output_dim", self.output_dim)
        _positive_int("n_modules", self.n_modules)
        if self.hidden_dim is not None:
            _positive_int("hidden_dim", self.hidden_dim)

    @property
    def model_type(self) -> str:
        """`"linear"` or `"mlp"`."""
        return "linear" if self.hidden_dim is None else "mlp"

    def to_json_dict(self, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
        """The `config.json` content, in the layout kvpress writes (`dtype` = dtype of the saved tensors)."""
        d: dict[str, Any] = {
            "architectures": ["KVzapModel"],
            "model_type": "kvzap",
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "hidden_dim": self.hidden_dim,
            "n_modules": self.n_modules,
            "dtype": _dtype_name(_as_dtype(dtype)),
        }
        try:
            d["transformers_version"] = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            pass
        return d

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any], path: str | os.PathLike | None = None) -> SurrogateConfig:
        """Read the needed keys of a `config.json` dict (extra keys are ignored).

        Raises `CheckpointError` naming the missing keys and `path` when keys are missing or invalid.
        """
        where = f"surrogate config {str(path)!r}" if path is not None else "surrogate config"
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise CheckpointError(
                f"{where} lacks key(s) {', '.join(missing)}: it must hold input_dim, output_dim, n_modules "
                "and hidden_dim (null for linear)"
            )
        model_type = d.get("model_type", "kvzap")
        if model_type != "kvzap":
            raise CheckpointError(f"{where} has model_type {model_type!r}, not 'kvzap': this is not a KVzap surrogate")
        try:
            return cls(
                input_dim=d["input_dim"],
                output_dim=d["output_dim"],
                n_modules=d["n_modules"],
                hidden_dim=d.get("hidden_dim"),
            )
        except ConfigError as exc:
            raise CheckpointError(f"{where}: {exc}") from None


def expected_tensor_shapes(config: SurrogateConfig) -> dict[str, tuple[int, ...]]:
    """The exact safetensors keys of a checkpoint for `config`, with their shapes."""
    D, H, hidden = config.input_dim, config.output_dim, config.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.n_modules):
        if hidden is None:
            shapes[f"layers.{i}.weight"] = (H, D)
            shapes[f"layers.{i}.bias"] = (H,)
        else:
            shapes[f"layers.{i}.0.weight"] = (hidden, D)
            shapes[f"layers.{i}.0.bias"] = (hidden,)
            shapes[f"layers.{i}.2.weight"] = (H, hidden)
            shapes[f"layers.{i}.2.bias"] = (H,)
    return shapes


# ---------------------------------------------------------------------------------------------------- model


class KVzapSurrogate(nn.Module):
    """One scorer per decoder layer; `state_dict()` keys are exactly the hub layout."""

    def __init__(self, config: SurrogateConfig):
        super().__init__()
        self.config = config
        #: Where the weights came from (hub id or directory), for error messages; None when built in memory.
        self.source: str | None = None
        D, H, hidden = config.input_dim, config.output_dim, config.hidden_dim
        if hidden is None:
            layers = [nn.Linear(D, H) for _ in range(config.n_modules)]
        else:
            layers = [
                nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="none"), nn.Linear(hidden, H))
                for _ in range(config.n_modules)
            ]
        self.layers = nn.ModuleList(layers)

    @property
    def model_type(self) -> str:
        """`"linear"` or `"mlp"`."""
        return self.config.model_type

    def forward(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Log-scores of layer `layer_idx`: hidden states (B, T, D) -> (B, H_kv, T)."""
        return self.layers[layer_idx](hidden_states).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ save / load


def save_surrogate(
    model: KVzapSurrogate, directory: str | os.PathLike, *, dtype: torch.dtype | str | None = None
) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (created if needed), atomically per file.

    `dtype` None keeps the model's parameter dtype. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = next(model.parameters())
    out_dtype = first.dtype if dtype is None else _as_dtype(dtype)
    tensors = {k: v.detach().to("cpu", out_dtype).contiguous() for k, v in model.state_dict().items()}
    config_text = json.dumps(model.config.to_json_dict(out_dtype), indent=2) + "\n"

    temps: list[str] = []
    try:
        fd, tmp_weights = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
        os.close(fd)
        temps.append(tmp_weights)
        save_file(tensors, tmp_weights, metadata={"format": "pt"})
        fd, tmp_config = tempfile.mkstemp(dir=directory, prefix=f".{CONFIG_NAME}.", suffix=".tmp")
        temps.append(tmp_config)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(config_text)
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return directory


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """Offline mode, read from the environment now (huggingface_hub reads it once, at import)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> str | None:
    """The hub cache folder, read from the environment now; None lets huggingface_hub use its default."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _looks_like_path(source: str) -> bool:
    """Hub ids are `owner/name`; anything else that is not an existing directory is a (missing) path."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1


def _download(repo_id: str, revision: str | None) -> Path:
    """Snapshot `config.json` + `*.safetensors` of `repo_id` from the hub or the local HF cache."""
    import huggingface_hub
    from huggingface_hub.errors import (
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    rev = f" --revision {revision}" if revision else ""
    fix = f"download it once with network access (hf download {repo_id}{rev}) or pass a local directory"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=_hub_cache_dir(),
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
        directory = _download(text, revision)

    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        _refuse_pickle(directory)
    config = _read_config(directory)
    _check_tensors(weights, config)
    tensors = load_file(str(weights), device="cpu")
    if dtype is not None:
        target = _as_dtype(dtype)
        tensors = {k: v.to(target) for k, v in tensors.items()}
    with torch.device("meta"):
        model = KVzapSurrogate(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.source = text
    return model.eval()


# ------------------------------------------------------------------------------------------ naming / matching


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


def shipped_surrogate(basename: str, model_type: str = "mlp") -> Path | None:
    """The directory of a surrogate shipped inside the package for this model basename, if there is one."""
    name = f"KVzap-{_check_model_type(model_type)}-{basename}"
    path = SHIPPED.get(name) or SURROGATES_DIR / name
    return path if path.is_dir() else None


def _model_name(model_config: Any) -> str | None:
    return getattr(model_config, "name_or_path", None) or getattr(model_config, "_name_or_path", None) or None


def resolve_surrogate_source(
    model_config: Any, surrogate: str | os.PathLike | None, model_type: str = "mlp"
) -> str | os.PathLike:
    """Where to load the surrogate from: the explicit `surrogate` if given, else a shipped directory for the
    model's basename, else the kvpress hub id derived from `model_config.name_or_path`."""
    _check_model_type(model_type)
    if surrogate is not None:
        return surrogate
    name = _model_name(model_config)
    if not name:
        raise ConfigError(
            "the model config has no name_or_path to derive the surrogate from: pass the surrogate explicitly"
        )
    hub_id = default_surrogate_id(name, model_type)
    shipped = shipped_surrogate(_basename(name), model_type)
    return shipped if shipped is not None else hub_id


def _text_config(model_config: Any) -> Any:
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config


def _model_dims(model_config: Any) -> dict[str, tuple[str, int]]:
    """surrogate field -> (model attribute, value) for input_dim, output_dim and n_modules."""
    cfg = _text_config(model_config)

    def attr(*names: str) -> tuple[str, int]:
        for n in names:
            value = getattr(cfg, n, None)
            if value is not None:
                return n, int(value)
        raise ConfigError(f"the model config has no {names[0]}: cannot size or check a KVzap surrogate for it")

    return {
        "input_dim": attr("hidden_size"),
        "output_dim": attr("num_key_value_heads", "num_attention_heads"),
        "n_modules": attr("num_hidden_layers"),
    }


def surrogate_config_for(model_config: Any, model_type: str = "mlp") -> SurrogateConfig:
    """The surrogate shapes for an LLM config (MLP hidden width = hidden_size // 8, as kvpress trains them)."""
    _check_model_type(model_type)
    dims = {field: value for field, (_, value) in _model_dims(model_config).items()}
    hidden = max(1, dims["input_dim"] // 8) if model_type == "mlp" else None
    return SurrogateConfig(hidden_dim=hidden, **dims)


def check_against_model(
    surrogate: SurrogateConfig | KVzapSurrogate, model_config: Any, *, surrogate_name: str | None = None
) -> None:
    """Raise `CheckpointError` (one line, every mismatch, both sides named) unless the surrogate fits the LLM."""
    if isinstance(surrogate, KVzapSurrogate):
        surrogate_name = surrogate_name or surrogate.source
        surrogate = surrogate.config
    mismatches = []
    for field, (attr, value) in _model_dims(model_config).items():
        mine = getattr(surrogate, field)
        if mine != value:
            mismatches.append(f"surrogate {field}={mine} does not match the model's {attr}={value}")
    if mismatches:
        raise CheckpointError(
            f"{'; '.join(mismatches)} (surrogate {surrogate_name or '<in memory>'!r}, "
            f"model {_model_name(model_config) or '<unnamed>'!r}): use a surrogate trained for this model"
        )


def random_surrogate(
    model_config: Any,
    model_type: str = "mlp",
    seed: int = 0,
    scale: float = 1.0,
    score_offset: float = 0.0,
) -> KVzapSurrogate:
    """A randomly initialised surrogate shaped for the LLM (for tests and benchmarks), in eval mode.

    Scores are `scale * f(h) + score_offset`, `f` being torch's default initialisation under `seed`
    (the global RNG is left untouched): use them to move scores into a chosen range around a threshold.
    """
    config = surrogate_config_for(model_config, model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KVzapSurrogate(config)
    with torch.no_grad():
        for layer in model.layers:
            last = layer if isinstance(layer, nn.Linear) else layer[-1]
            last.weight.mul_(scale)
            last.bias.mul_(scale).add_(score_offset)
    model.source = f"random-{model_type}-seed{seed}"
    return model.eval()
