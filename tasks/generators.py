"""Offline RULER-style long-context datasets for lm-eval (`custom_dataset: !function generators.<task>`).

Every task builds, for each requested context length L (`--metadata '{"max_seq_lengths": [1024, 2048]}'`,
default 1024 and 2048, at most 8192), `num_samples` seeded prompts whose text (question and answer prefix
included) fills L - RESERVED tokens of the model's tokenizer: `tokenizer=`/`pretrained=` from the model
arguments or metadata, else the embedded SmolLM2. RESERVED leaves room for the chat template and the answer.
Samples are interleaved by length, so `--limit N` takes N / len(lengths) samples of each length.

Each prompt is `context + "\\n" + question`: the question comes last and is stored as `kvzap_question`, so
the kvzap adapter can prefill (and prune) the context before it sees the question. `gen_prefix` holds
RULER's answer prefix; `outputs` the strings a correct answer contains; `kvzap_uid` is "task/L/index".

The tasks mirror RULER (NVIDIA/RULER, and lm-eval's `tasks/ruler`), with two local substitutes: the
"essay" haystack is prose written by SmolLM2 itself (`data/haystack_essays.txt`, see `make_haystack.py`)
instead of Paul Graham's essays, and the QA task uses generated fact documents instead of SQuAD/HotpotQA.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import NamedTuple, TypeVar

import datasets

T = TypeVar("T")

#: Context lengths a task may be generated at (each is a metric name in the YAML: keep in sync with metrics.py).
SUPPORTED_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_LENGTHS = (1024, 2048)
#: Tokens of L left out of the prompt text: the chat template's wrapping (~30) and the answer (max_gen_toks <= 64).
RESERVED = 96
#: A prompt is accepted once it fills at least this fraction of its token budget.
FILL = 0.98
HAYSTACK_FILE = Path(__file__).parent / "data" / "haystack_essays.txt"
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

ADJECTIVES = (
    "amber ancient bitter brave bright calm clever cold crimson curious dusty eager early fancy fierce gentle "
    "golden grumpy hidden hollow humble icy jolly lively lonely lucky misty modern noble odd pale patient "
    "polite proud quiet rapid rusty silent silver sleepy smooth steady sunny tender tidy velvet wild wise"
).split()
NOUNS = (
    "anchor apple badger basket beacon bottle bridge candle canyon castle cellar comet cricket dragon engine "
    "falcon feather garden glacier harbor helmet island jacket kettle ladder lantern meadow mirror needle "
    "orchard otter pebble pepper pillow planet pocket rabbit ribbon saddle spoon thimble tiger tunnel violin "
    "wagon walrus window"
).split()


# --- sizing ---------------------------------------------------------------------------------------------------
@cache
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def resolve_tokenizer(kwargs: dict) -> str:
    """`tokenizer=` or `pretrained=` from the model args / metadata; the embedded model's directory otherwise."""
    from kvzap_eval.llm.embedded import EMBEDDED_ALIASES, embedded_model_dir

    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not name or name in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    return str(name)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


class Probe(NamedTuple):
    """One sample before sizing: `render(n)` is the prompt text before the question with n haystack units.

    (Not a dataclass: lm-eval executes this module before registering it in `sys.modules`, which breaks
    `@dataclass` under `from __future__ import annotations`.)
    """

    render: Callable[[int], str]
    question: str
    answer_prefix: str
    outputs: list[str]
    unit_tokens: float  # mean tokens per haystack unit: the first guess of n
    max_units: int = 1_000_000


def fit(probe: Probe, budget: int, count: Callable[[str], int]) -> str:
    """The prompt text with the most haystack units that fits `budget` tokens (stops once >= FILL * budget)."""

    def tokens(n: int) -> int:
        return count(f"{probe.render(n)}\n{probe.question}\n{probe.answer_prefix}")

    best, best_tokens = 0, tokens(0)
    if best_tokens > budget:
        raise ValueError(f"the question and instructions alone take {best_tokens} > {budget} tokens")
    lo, hi = 0, probe.max_units + 1  # tokens(lo) fits; tokens(hi) does not (or hi is out of range)
    n = min(probe.max_units, int((budget - best_tokens) / probe.unit_tokens))
    while hi - lo > 1:
        t = tokens(n)
        if t <= budget:
            lo, best, best_tokens = n, n, t
            if t >= FILL * budget:
                break
        else:
            hi = n
        step = round((FILL * budget + (1 - FILL) * budget / 2 - t) / probe.unit_tokens)  # secant step to the band
        n = min(max(n + step, lo + 1), hi - 1)
    return probe.render(best)


def _dataset(task: str, make: Callable[[random.Random, Callable[[str], int]], Probe], kwargs: dict) -> dict:
    lengths = [int(length) for length in kwargs.get("max_seq_lengths") or DEFAULT_LENGTHS]
    unsupported = sorted(set(lengths) - set(SUPPORTED_LENGTHS))
    if unsupported:
        raise ValueError(f"max_seq_lengths {unsupported} not supported by {task}: choose from {SUPPORTED_LENGTHS}")
    tokenizer = _tokenizer(resolve_tokenizer(kwargs))
    count = lambda text: count_tokens(tokenizer, text)  # noqa: E731
    num_samples, seed = int(kwargs.get("num_samples", 100)), int(kwargs.get("seed", 0))
    rows = []
    for index in range(num_samples):
        for length in lengths:
            probe = make(random.Random(f"{task}/{length}/{index}/{seed}"), count)
            context = fit(probe, length - RESERVED, count)
            rows.append(
                {
                    "input": f"{context}\n{probe.question}",
                    "kvzap_question": probe.question,
                    "gen_prefix": probe.answer_prefix,
                    "outputs": probe.outputs,
                    "target": ", ".join(probe.outputs),
                    "max_length": length,
                    "kvzap_uid": f"{task}/{length}/{index}",
                }
            )
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


# --- haystacks and needles ------------------------------------------------------------------------------------
@cache
def essay_sentences() -> tuple[str, ...]:
    """The committed SmolLM2 prose, one unit per sentence, each with its trailing space or paragraph break."""
    units = []
    for paragraph in HAYSTACK_FILE.read_text(encoding="utf-8").split("\n"):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if s]
        units += [s + " " for s in sentences[:-1]] + [s + "\n" for s in sentences[-1:]]
    return tuple(units)


def essay_haystack(rng: random.Random, count: Callable[[str], int]) -> tuple[Callable[[int], list[str]], float]:
    """RULER's "essay" haystack: consecutive sentences from a random start, wrapping around the text."""
    units, start = essay_sentences(), rng.randrange(len(essay_sentences()))
    return (lambda n: [units[(start + i) % len(units)] for i in range(n)]), count("".join(units[:200])) / 200


def repeat_haystack(rng: random.Random, count: Callable[[str], int]) -> tuple[Callable[[int], list[str]], float]:
    """RULER's "repeat" haystack: one filler paragraph over and over."""
    return (lambda n: [REPEAT_FILLER] * n), count(REPEAT_FILLER * 8) / 8


def insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Place each needle (a sentence) at its depth in [0, 1] of the haystack units."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: -pair[1]):
        out.insert(round(depth * len(units)), needle + " ")
    return out


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def distinct(draw: Callable[[], T], k: int, key: Callable[[T], object] = lambda value: value) -> list[T]:
    """`k` draws with distinct keys."""
    values: list[T] = []
    while len(values) < k:
        value = draw()
        if all(key(value) != key(other) for other in values):
            values.append(value)
    return values


def magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah(
    rng: random.Random,
    count: Callable[[str], int],
    haystack=essay_haystack,
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
) -> Probe:
    """RULER's NIAH generator: `num_keys` keys (the first `num_queries` asked), `num_values` numbers per key."""
    units, unit_tokens = haystack(rng, count)
    keys = distinct(lambda: word_key(rng), num_keys)
    values = [distinct(lambda: magic_number(rng), num_values) for _ in keys]
    needles = [_needle(key, value) for key, key_values in zip(keys, values) for value in key_values]
    rng.shuffle(needles)
    depths = [rng.random() for _ in needles]
    queried = keys[:num_queries]
    query = queried[0] if num_queries == 1 else ", ".join(queried[:-1]) + " and " + queried[-1]
    if num_values == 1 and num_queries == 1:
        intro = (
            "A special magic number is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the number afterwards."
        )
        question = f"What is the special magic number for {query} mentioned in the provided text?"
        prefix = f"The special magic number for {query} mentioned in the provided text is"
    else:
        intro = (
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards."
        )
        question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"
    return Probe(
        render=lambda n: intro + "\n" + "".join(insert(units(n), needles, depths)).rstrip(),
        question=question,
        answer_prefix=prefix,
        outputs=[value for key_values in values[:num_queries] for value in key_values],
        unit_tokens=unit_tokens,
    )


# --- tasks ----------------------------------------------------------------------------------------------------
def niah_single_repeat(**kwargs) -> dict:
    """RULER niah_single_1: one number in a repeated-filler haystack."""
    return _dataset("kvzap_niah_single_repeat", lambda rng, count: _niah(rng, count, repeat_haystack), kwargs)


def niah_single_essay(**kwargs) -> dict:
    """RULER niah_single_2: one number in natural prose."""
    return _dataset("kvzap_niah_single_essay", lambda rng, count: _niah(rng, count), kwargs)


def niah_multikey(**kwargs) -> dict:
    """RULER niah_multikey_1: the number of one key among needles of 2 other keys (RULER: 3), in natural prose."""
    return _dataset("kvzap_niah_multikey", lambda rng, count: _niah(rng, count, num_keys=3), kwargs)


def niah_multivalue(**kwargs) -> dict:
    """RULER niah_multivalue: all 4 numbers of one key, in natural prose."""
    return _dataset("kvzap_niah_multivalue", lambda rng, count: _niah(rng, count, num_values=4), kwargs)


def niah_multiquery(**kwargs) -> dict:
    """RULER niah_multiquery: the numbers of 2 keys asked together (4 keys hidden), in natural prose."""
    return _dataset("kvzap_niah_multiquery", lambda rng, count: _niah(rng, count, num_keys=4, num_queries=2), kwargs)


def _variable_tracking(rng: random.Random, count: Callable[[str], int], num_hops: int = 2) -> Probe:
    """RULER vt: one chain VAR A = 12345. VAR B = VAR A. ... hidden in prose; name every variable of the chain.

    Reduced for SmolLM2-135M: 2 hops (RULER: 4) and no solved example (the model copied its answer); the answer
    prefix ends with "VAR" so the model starts listing variables instead of repeating the haystack.
    """
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), num_hops + 1)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in chain)
    units, unit_tokens = essay_haystack(rng, count)
    intro = "Memorize and track the chain of variable assignments hidden in the following text."
    return Probe(
        render=lambda n: intro + "\n" + "".join(insert(units(n), chain, depths)).rstrip(),
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=(
            f"Answer: According to the chain of variable assignments in the text above, {len(names)} variables "
            f"are assigned the value {value}, they are: VAR"
        ),
        outputs=names,
        unit_tokens=unit_tokens,
    )


def variable_tracking(**kwargs) -> dict:
    """RULER vt: every variable of a 2-hop assignment chain hidden in prose."""
    return _dataset("kvzap_vt", _variable_tracking, kwargs)


@cache
def vocabulary() -> tuple[str, ...]:
    """Plain lowercase words (4-9 letters) of the haystack prose: the word pool of the CWE task."""
    words = set(re.findall(r"\b[a-z]{4,9}\b", HAYSTACK_FILE.read_text(encoding="utf-8")))
    return tuple(sorted(words))


def _common_words(rng: random.Random, count: Callable[[str], int], num_common: int = 1, share: float = 0.2) -> Probe:
    """RULER cwe: a numbered word list where `num_common` words each fill `share` of the entries; name them.

    Reduced for SmolLM2-135M: RULER asks for the 10 most common words (30 repeats against 3); this model
    finds 1 word filling 20% of the list (75% of the time), but not 2 at 35% (50%) or 3 at 30% (33%).
    """
    pool = rng.sample(vocabulary(), 1200)
    common = pool[:num_common]
    # No rare word may contain a common one: string matching would credit it.
    rare = [w for w in pool[num_common:] if not any(c in w or w in c for c in common)]
    list_seed = rng.random()

    def render(n: int) -> str:
        local = random.Random(list_seed)
        repeats = max(4, round(share * n))
        words = [w for w in common for _ in range(repeats)]
        words += [rare[i % len(rare)] for i in range(max(0, n - len(words)))]
        local.shuffle(words)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n" + listing
        )

    return Probe(
        render=render,
        question=(
            "Question: What is the most common word in the above list?"
            if num_common == 1
            else f"Question: What are the {num_common} most common words in the above list?"
        ),
        answer_prefix=(
            "Answer: The word that appears most often in the list is:"
            if num_common == 1
            else f"Answer: The top {num_common} words that appear most often in the list are:"
        ),
        outputs=common,
        unit_tokens=count("\n".join(f"{100 + i}. {w}" for i, w in enumerate(pool[:50]))) / 50,
        max_units=2 * len(rare),  # rare words appear at most twice: they stay rare
    )


def common_words(**kwargs) -> dict:
    """RULER cwe: the most frequent word of a long numbered list."""
    return _dataset("kvzap_cwe", _common_words, kwargs)


def _kv_retrieval(rng: random.Random, count: Callable[[str], int], num_pairs: int = 4) -> Probe:
    """Key-value retrieval (Lost in the Middle; RULER niah_multikey_3's UUIDs): JSON records hidden in prose.

    Reduced for SmolLM2-135M, which retrieves from a dense JSON object of UUID keys 20-33% of the time at 1k
    tokens and from UUID keys in prose 17%: the keys are words, the values UUIDs, and `num_pairs` records
    `{"key": ..., "value": ...}` are scattered through the prose haystack. The answer prefix opens the record.
    """

    def new_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    keys = distinct(lambda: word_key(rng), num_pairs)
    values = [new_uuid() for _ in keys]
    records = [json.dumps({"key": key, "value": value}) for key, value in zip(keys, values)]
    depths = [rng.random() for _ in records]
    units, unit_tokens = essay_haystack(rng, count)
    intro = (
        "Some key-value pairs (JSON) are hidden within the following text. Make sure to memorize them. "
        "I will ask you about a key afterwards."
    )
    return Probe(
        render=lambda n: intro + "\n" + "".join(insert(units(n), records, depths)).rstrip(),
        question=f'What is the value associated with the key "{keys[0]}" in the text above?',
        answer_prefix=f'{{"key": "{keys[0]}", "value": "',
        outputs=[values[0]],
        unit_tokens=unit_tokens,
    )


def kv_retrieval(**kwargs) -> dict:
    """Key-value retrieval: the UUID value of one key among 4 JSON key-value records hidden in prose."""
    return _dataset("kvzap_kv", _kv_retrieval, kwargs)


TOWN_HEADS = "bar cal dor el fen gal hal ir kel lor mar nor os pel quin ros sal tor ul var wen yor zan".split()
TOWN_TAILS = "brook dale ford gate haven holm mere mont moor port stead thorpe vale wick wood".split()
FIRST_NAMES = (
    "Ada Bruno Celia Dmitri Elda Felix Greta Hugo Ilse Jonas Kira Leon Mira Nils Olga Pavel Rosa Sven Tilda "
    "Ugo Vera Walter Yara Zeno"
).split()
LAST_NAMES = (
    "Brannick Castellan Dunmore Everly Fairwood Galloway Hartigan Ingram Jessop Kowal Lindqvist Marlowe Norcross "
    "Ostrander Pemberton Quayle Redfern Stroud Thackeray Underhill Vasquez Whitlock Yardley Zelinski"
).split()
PRODUCTS = (
    "copper bells|blue cheese|glass lanterns|wool blankets|pear cider|clay pipes|silver spoons|straw hats|"
    "rye bread|leather boots|honey cakes|oak barrels|paper kites|linen shirts|walnut oil|tin whistles|"
    "plum jam|stone bridges|wooden toys|smoked trout|rope ladders|salt caramels|iron gates|herb teas"
).split("|")
REGIONS = "northern southern eastern western central coastal".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)


def _town(rng: random.Random) -> dict[str, str]:
    a, b = rng.sample(TOWN_HEADS, 2)
    return {
        "name": (a + b + rng.choice(TOWN_TAILS)).capitalize(),
        "region": rng.choice(REGIONS),
        "year": str(rng.randint(1200, 1899)),
        "founder": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "product": rng.choice(PRODUCTS),
        "weekday": rng.choice(WEEKDAYS),
    }


def _town_facts(town: dict[str, str]) -> str:
    return (
        f"{town['name']} is a small town in the {town['region']} hills. It was founded in {town['year']} by "
        f"{town['founder']}. Today {town['name']} is famous for its {town['product']}, and its market is held "
        f"every {town['weekday']}."
    )


def _qa(rng: random.Random, count: Callable[[str], int], num_towns: int = 3) -> Probe:
    """RULER qa_squad in miniature: numbered documents, one of which answers a question about a fictional town.

    The other documents are prose (3 consecutive haystack sentences each) and `num_towns - 1` fact documents
    about other towns. Reduced for SmolLM2-135M: with only town documents as distractors (RULER's setting of
    many same-kind paragraphs) it answered 33% of the time at 1k tokens.
    """
    towns = distinct(lambda: _town(rng), num_towns, key=lambda town: town["name"])
    target = towns[0]
    attribute = rng.choice(["founder", "product", "year"])
    name = target["name"]
    question, prefix = {
        "founder": (f"Who founded the town of {name}?", f"Answer: {name} was founded by"),
        "product": (f"What is the town of {name} famous for?", f"Answer: {name} is famous for its"),
        "year": (f"In which year was the town of {name} founded?", f"Answer: {name} was founded in"),
    }[attribute]
    facts = [_town_facts(town) for town in towns]
    depths = [rng.random() for _ in facts]
    sentences, unit_tokens = essay_haystack(rng, count)

    def render(n: int) -> str:
        shown = sentences(n)
        prose = ["".join(shown[i : i + 3]).strip() for i in range(0, n, 3)]
        documents = [d.strip() for d in insert(prose, facts, depths)]
        listing = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(documents))
        return f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{listing}\n\n{QA_INSTRUCTION}"

    return Probe(
        render=render,
        question=f"Question: {question}",
        answer_prefix=prefix,
        outputs=[target[attribute]],
        unit_tokens=unit_tokens * 1.1,  # and "Document i:" every 3 sentences
    )


def qa(**kwargs) -> dict:
    """RULER qa_squad (offline): a question about a fictional town, answered by one of many documents."""
    return _dataset("kvzap_qa", _qa, kwargs)
