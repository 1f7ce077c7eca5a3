"""Tiny offline tasks for the adapter tests: a generation task that marks its question, and a multiple-choice task."""

from __future__ import annotations

import random

import datasets

from kvzap_eval.evaluation.sample_stats import lookup

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def make_generation(num_samples: int = 4, context_words: int = 60, **kwargs) -> dict:
    rng = random.Random(0)
    rows = []
    for i in range(num_samples):
        key = rng.choice(WORDS)
        context = " ".join(rng.choice(WORDS) for _ in range(context_words))
        question = f"Which word comes after {key}? Answer:"
        rows.append(
            {
                "prompt": f"{context}\n{question}",
                "kvzap_question": question,
                "kvzap_uid": f"tiny_gen-{i}",
                "answer": key,
            }
        )
    return {"test": datasets.Dataset.from_list(rows)}


def make_choice(num_samples: int = 4, context_words: int = 40, **kwargs) -> dict:
    rng = random.Random(1)
    rows = []
    for _ in range(num_samples):
        context = " ".join(rng.choice(WORDS) for _ in range(context_words))
        rows.append({"prompt": context, "choices": rng.sample(WORDS, 3), "label": 0})
    return {"test": datasets.Dataset.from_list(rows)}


def process_generation(doc: dict, results: list[str]) -> dict:
    return {
        "string_match": float(doc["answer"].lower() in results[0].lower()),
        "kv_compression": lookup(doc["kvzap_uid"]),
    }


def make_rolling(num_samples: int = 4, **kwargs) -> dict:
    """Texts of one to several of the tiny model's 1,024-position windows; uneven, so that over two ranks lm-eval
    pads both with request copies and with extra windows."""
    rng = random.Random(2)
    words = [300, 1500, 300, 900]
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(words[i % 4]))} for i in range(num_samples)]
    return {"test": datasets.Dataset.from_list(rows)}
