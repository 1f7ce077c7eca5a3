"""Regenerate `tasks/data/haystack_essays.txt`: the natural-text haystack of the kvzap long-context tasks.

RULER's essay haystack is Paul Graham's essays, downloaded from the Hub. These tasks must run offline and
must not reuse the surrogate-training corpus (`pydoc_data.topics`, Debian's common-licenses), so the prose
is written once by the embedded model itself (SmolLM2-135M-Instruct): one short essay or story per topic
below, seeded sampling through the chat template, then light cleaning (markdown markers, an unfinished last
sentence, repeated paragraphs are dropped). The output is committed; the tasks never run this script.

    python tasks/make_haystack.py     # ~4 min on one CPU thread (170 s CPU); writes tasks/data/haystack_essays.txt

The text is deterministic for a given torch build and thread count (it runs on one thread: on a shared
machine that is also the fastest setting).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvzap_eval.llm.embedded import embedded_model_dir

OUTPUT = Path(__file__).parent / "data" / "haystack_essays.txt"
SEED = 1234
MAX_NEW_TOKENS = 480

TOPICS = [
    "essay:how lighthouses guided ships before radio",
    "essay:the life of a honeybee colony through the seasons",
    "essay:why bread dough rises",
    "story:a walk through an old forest after the rain",
    "essay:the invention of the bicycle and how it changed towns",
    "essay:how rivers carve valleys over thousands of years",
    "essay:keeping a small vegetable garden on a balcony",
    "story:a potter who makes one bowl every morning",
    "essay:the habits of crows and why they seem so clever",
    "essay:what makes a good public library",
    "story:a night train crossing the mountains in winter",
    "essay:how tides are caused by the moon",
    "essay:the history of paper and printing",
    "story:two friends building a raft one summer",
    "essay:why people enjoy walking in cities",
    "essay:how glaciers move and what they leave behind",
    "story:a baker who opens her shop before dawn",
    "essay:the role of fungi in a forest",
    "essay:how maps were drawn before satellites",
    "story:an old fisherman teaching his grandson to read the sea",
    "essay:why music helps people remember things",
    "essay:the life cycle of a monarch butterfly",
    "story:a lost kite that travels across a country",
    "essay:how wind turbines turn air into electricity",
    "essay:the pleasures and difficulties of learning a new language",
    "story:a lighthouse keeper's last night on the island",
    "essay:how coral reefs grow",
    "essay:the history of tea and how it spread around the world",
    "story:a child who finds a hidden door in a library",
    "essay:why the sky changes color at sunset",
    "essay:how volcanoes form new land",
    "story:a clockmaker repairing a town's tower clock",
    "essay:the importance of sleep for memory",
    "essay:how desert plants survive without rain",
    "story:a storm arriving at a small harbor village",
    "essay:the craft of building wooden boats",
    "essay:how owls hunt in the dark",
    "story:a street musician who plays the same song every evening",
    "essay:the long history of the game of chess",
    "essay:how snowflakes form their shapes",
]


def _prompt(topic: str) -> str:
    kind, subject = topic.split(":", 1)
    if kind == "story":
        return f"Write a short story about {subject}. Use plain prose paragraphs, no title, no headings, no lists."
    return f"Write a short essay about {subject}. Use plain prose paragraphs, no title, no headings, no lists."


_MARKDOWN = re.compile(r"^\s*(#+\s*|[-*•]\s+|\d+[.)]\s+)")


def clean(text: str) -> str:
    """Plain paragraphs: markdown markers and an unfinished last sentence removed, repeats dropped."""
    text = text.replace("**", "").replace("__", "")
    cut = max(text.rfind(p) for p in (".", "!", "?"))
    text = text[: cut + 1] if cut >= 0 else ""
    seen: set[str] = set()
    paragraphs = []
    for line in text.splitlines():
        line = _MARKDOWN.sub("", line).strip()
        # One-line titles and headings ("The Honeybee Colony") carry no sentence end: drop them.
        if len(line) < 40 or line[-1] not in ".!?\"'" or line in seen:
            continue
        seen.add(line)
        paragraphs.append(line)
    return "\n".join(paragraphs)


def generate(batch_size: int = 40) -> list[str]:
    directory = str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    torch.manual_seed(SEED)
    essays = []
    for start in range(0, len(TOPICS), batch_size):
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": _prompt(topic)}], tokenize=False, add_generation_prompt=True
            )
            for topic in TOPICS[start : start + batch_size]
        ]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=True,
                temperature=0.8,
                top_p=0.9,
                repetition_penalty=1.15,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        essays += [clean(text) for text in texts]
    return [essay for essay in essays if essay]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    essays = generate()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n\n".join(essays) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    tokens = len(tokenizer(args.output.read_text(encoding="utf-8")).input_ids)
    print(f"{len(essays)} texts, {tokens} tokens -> {args.output} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
