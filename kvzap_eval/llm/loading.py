"""The one way to load a causal LM and its tokenizer (demo, bench, latency, training, exports, the Python API):
by hub id or directory; no name means the embedded SmolLM2.

A model that cannot be found, or whose architecture the runtime does not support, fails in one line before any
weights are read (`ModelNotFoundError`, `UnsupportedModelError`).
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import ConfigError, EmbeddedModelError, ModelNotFoundError, UnsupportedModelError
from .embedded import EMBEDDED_ALIASES, resolve_pretrained
from .model_info import check_supported_config

#: The dtypes an LLM is loaded in, by the names the command lines use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or one of the names of `DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_model_config(path: str):
    """The model's transformers config, after checking that the runtime supports its architecture."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (KeyError, ValueError) as exc:  # an architecture (model_type) this transformers does not know
        raise UnsupportedModelError(f"model {path!r} cannot be read by transformers: {_first_line(exc)}") from None
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load the config of model {path!r}: {_first_line(exc)}") from None
    check_supported_config(config)
    return config


def load_causal_lm(
    pretrained: str | None = None, dtype: torch.dtype | str = torch.float32, device: str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) in eval mode; `pretrained=None` loads the embedded SmolLM2-135M-Instruct. `dtype` is a torch
    dtype or one of the names of `DTYPES`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = as_torch_dtype(dtype)
    path = resolve_pretrained(pretrained)
    load_model_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelNotFoundError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    if tokenizer.chat_template is None and (pretrained is None or pretrained in EMBEDDED_ALIASES):
        raise EmbeddedModelError(f"{path} has no chat template: delete it so that it is converted again")
    return model, tokenizer


def load_embedded(dtype: torch.dtype | str | None = None) -> tuple[torch.nn.Module, Any]:
    """Deprecated (was `kvzap_eval.embedded.load_embedded`): `load_causal_lm(None, dtype)`."""
    return load_causal_lm(None, torch.float32 if dtype is None else dtype)
