"""What the lm-eval tests share: the tiny task directory, an offline environment, a tiny model in hub layout."""

from __future__ import annotations

import os
from pathlib import Path

TASKS = str(Path(__file__).parent / "data" / "lmeval_tasks")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_tiny_model(root: Path) -> dict:
    """conftest's tiny random Llama with the real SmolLM2 tokenizer, and a surrogate for it, written in hub layout."""
    from transformers import AutoTokenizer, GenerationConfig

    from kvzap_eval.llm.embedded import embedded_model_dir
    from kvzap_eval.surrogate import random_surrogate, save_surrogate

    from .conftest import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = tiny_model("llama", seed=0, sharpen=4.0, vocab_size=len(tokenizer), max_position_embeddings=1024)
    model.generation_config = GenerationConfig.from_model_config(model.config)  # lm-eval stops at the real eos
    config = model.config
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_surrogate(random_surrogate(config, "mlp", seed=1, scale=4.0), root / "surrogate")
    return {"model": str(root / "model"), "surrogate": str(root / "surrogate")}


def sweep_config(tiny: dict, output: Path, **overrides):
    """A sweep of the tiny model over the tiny generation task: full, KVzap at tau 0 and random at its ratio."""
    from kvzap_eval.evaluation.sweep import SweepConfig

    settings = dict(
        output=output,
        tasks=["kvzap_tiny_generation"],
        lengths=[1024],
        methods=["full", "kvzap_mlp", "random"],
        thresholds=[0.0],
        limit=3,
        include_path=TASKS,
        pretrained=tiny["model"],
        model_args={"surrogate": tiny["surrogate"], "window": 8},
        apply_chat_template=False,
    )
    settings.update(overrides)
    return SweepConfig(**settings)
