"""Real hidden states for validating an export: the post-`input_layernorm` states an LLM feeds each layer's scorer.

By default ("auto") the embedded SmolLM2-135M-Instruct is used when the surrogate has its shape (D=576, 3 KV heads,
30 layers); any other LLM can be named (a directory or hub id that loads offline). The text is a slice of Python's
own `pydoc_data.topics`, so the inputs are the same on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvzap_eval.errors import ConfigError, EmbeddedModelError
from kvzap_eval.llm import hub_cache
from kvzap_eval.surrogate import SurrogateConfig, check_against_model

#: (input_dim, output_dim, n_modules) of the embedded SmolLM2-135M-Instruct.
EMBEDDED_SHAPE = (576, 3, 30)
DEFAULT_TOKENS = 512


def collect_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """One forward of `input_ids` (1, T); returns each decoder layer's attention input (1, T, D) as fp32 on CPU."""
    from kvzap_eval.llm.model_info import attention_modules

    captured: dict[int, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured[module.layer_idx] = kwargs["hidden_states"].detach().to("cpu", torch.float32)

    modules = attention_modules(model)
    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(modules))]


def _token_ids(model: torch.nn.Module, tokenizer, tokens: int) -> torch.Tensor:
    if tokenizer is None:  # a model saved without a tokenizer: seeded random ids
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: 8 * tokens], return_tensors="pt").input_ids[:, :tokens]
    return ids


def _load(name: str):
    """(model, tokenizer or None) of a named LLM; `ConfigError` (one line) when it does not exist or does not load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fix = "pass an LLM directory, a hub id in the local cache, or 'none' (random inputs only)"
    if not Path(name).expanduser().exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise ConfigError(f"--hidden-states-model {name!r} does not exist: {fix}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, local_files_only=hub_cache.offline()
        ).eval()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise ConfigError(f"--hidden-states-model {name!r} does not load as a causal LM ({reason}): {fix}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=hub_cache.offline())
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def hidden_states_for(
    config: SurrogateConfig, model: str | os.PathLike | None = "auto", tokens: int = DEFAULT_TOKENS
) -> tuple[list[torch.Tensor] | None, str]:
    """(per-layer hidden states or None, a sentence saying what they are or why there are none).

    `model` "auto" uses the embedded SmolLM2 when the surrogate has its shape; None means random inputs only.
    A named model that does not exist or load raises `ConfigError`; one whose dims do not match the surrogate
    raises `CheckpointError`.
    """
    if model is None or str(model) == "none":
        return None, "not requested"
    if str(model) == "auto":
        if (config.input_dim, config.output_dim, config.n_modules) != EMBEDDED_SHAPE:
            return None, (
                f"no LLM with the surrogate's shape at hand (input_dim={config.input_dim}, output_dim="
                f"{config.output_dim}, n_modules={config.n_modules}); pass one with --hidden-states-model"
            )
        from kvzap_eval.llm.loading import load_causal_lm

        try:
            llm, tokenizer = load_causal_lm()
        except EmbeddedModelError as exc:
            return None, f"embedded SmolLM2 unavailable ({exc})"
        name = "embedded SmolLM2-135M-Instruct"
    else:
        llm, tokenizer = _load(os.fspath(model))
        name = os.fspath(model)
    check_against_model(config, llm.config, surrogate_name="the exported surrogate")
    ids = _token_ids(llm, tokenizer, tokens)
    text = "pydoc topics" if tokenizer is not None else "random token ids"
    return collect_hidden_states(llm, ids), f"{name}, {ids.shape[1]} tokens of {text}"
