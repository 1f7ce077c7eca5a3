"""Load a causal LM and its tokenizer by hub id or directory; no name means the embedded SmolLM2.

A model that cannot be found, or whose architecture the runtime does not support, fails in one line before any
weights are read (`ModelNotFoundError`, `UnsupportedModelError`).
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError

from ..errors import ModelNotFoundError, UnsupportedModelError
from .embedded import resolve_pretrained
from .model_info import check_supported_config


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


def load_causal_lm(pretrained: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode; `pretrained=None` loads the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained(pretrained)
    load_model_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelNotFoundError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    return model, tokenizer
