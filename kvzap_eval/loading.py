"""Load a causal LM and its tokenizer by hub id or directory; no name means the embedded SmolLM2."""

from __future__ import annotations

import torch

from .embedded import resolve_pretrained


def load_causal_lm(pretrained: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode; `pretrained=None` loads the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained(pretrained)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
