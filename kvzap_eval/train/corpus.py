"""Offline training corpus for KVzap surrogates: text shipped with Python and Debian, cut into 750-1250-token prompts.

Built-in sources (no network, none of it evaluation-task data; `tests/test_corpus_sources.py` checks that no
sentence of the evaluation tasks' haystacks occurs in them):

- `python-topics`: the Python Language Reference topics that `pydoc` ships (`pydoc_data.topics`; PSF licence).
- `licenses`: the licence texts in `/usr/share/common-licenses` (Debian's `base-files`; duplicates removed by hash).
- `python-source`: the top-level modules of the Python standard library (`*.py` in `sysconfig`'s stdlib path).
- `python-docs`: prose: the reStructuredText sources of Python's documentation (tutorial, HOWTOs, FAQ, what's new,
  library and reference chapters) from Debian's `python3.X-doc` (`/usr/share/doc/python3.X/html/_sources`).
- `fortunes`: prose and verse: the quotations, jokes, poems and literature excerpts of Debian's `fortunes`
  (`/usr/share/games/fortunes`), one document per file with the `%` separators removed; ASCII art left out.

The first three exist wherever Python runs on Debian; the last two need `apt-get install python3-doc fortunes`
(the error says so). `DEFAULT_SOURCES` are the five; `--sources` picks others.

Or `--corpus PATH ...`: your own UTF-8 text files (directories are searched for .txt, .md, .rst, .py files).

Each source's documents are shuffled with the seed and joined into one stream, which is cut at line starts into
prompts whose length (with the model's tokenizer) is drawn uniformly in [min_tokens, max_tokens]. Prompts are shuffled
per source; the first `n_test_per_source` of each source are held out for test, and the training prompts are taken
round-robin over the sources. The same seed, tokenizer and files give the same prompts; `Corpus.provenance()` records
every document's sha256 for the training report.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import re
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorpusError

BUILTIN_SOURCES = ("python-topics", "licenses", "python-source", "python-docs", "fortunes")
DEFAULT_SOURCES = BUILTIN_SOURCES
LICENSES_DIR = Path("/usr/share/common-licenses")
PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
_FORTUNES_LEFT_OUT = frozenset({"ascii-art"})  # pictures, not text
_PYTHON_DOCS_LEFT_OUT = ("whatsnew/changelog.rst.txt", "license.rst.txt")  # a commit log; the licences source has it
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
_MARGIN = 25  # tokens kept clear of the window's edges when aiming, so stripping and re-tokenising stay inside


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    """One text of a source; `name` says where it came from."""

    source: str
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return _sha256(self.text)


# ------------------------------------------------------------------------------------------------ sources


def python_topics() -> list[Document]:
    """The `pydoc_data.topics` entries, sorted by topic name."""
    from pydoc_data.topics import topics

    return [Document("python-topics", f"pydoc_data.topics[{k!r}]", topics[k]) for k in sorted(topics)]


def _read(path: Path, source: str) -> Document | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return Document(source, str(path), text) if text.strip() else None


def _unique(docs: list[Document | None]) -> list[Document]:
    seen: set[str] = set()
    out = []
    for doc in docs:
        if doc is not None and doc.sha256 not in seen:
            seen.add(doc.sha256)
            out.append(doc)
    return out


def common_licenses(root: Path = LICENSES_DIR) -> list[Document]:
    """The licence texts in `root`, sorted by name, without duplicates (GPL is a link to GPL-3...)."""
    if not root.is_dir():
        return []
    return _unique([_read(p, "licenses") for p in sorted(root.iterdir()) if p.is_file()])


def python_source() -> list[Document]:
    """The top-level `*.py` modules of the running Python's standard library, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return _unique([_read(p, "python-source") for p in sorted(stdlib.glob("*.py"))])


def python_docs_dir() -> Path | None:
    """The `_sources` folder of Debian's Python documentation, the running Python's version first."""
    own = Path(f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/_sources")
    if own.is_dir():
        return own
    found = sorted(Path("/").glob(PYTHON_DOCS_GLOB.lstrip("/")))
    return found[-1] if found else None


def python_docs() -> list[Document]:
    """The `.rst.txt` sources of Python's documentation, sorted by path (the changelog and licence left out)."""
    root = python_docs_dir()
    if root is None:
        raise CorpusError(
            "corpus source 'python-docs' needs Python's documentation sources (/usr/share/doc/python3.X/html/_sources):"
            " apt-get install python3-doc, or leave the source out with --sources"
        )
    files = [p for p in sorted(root.rglob("*.rst.txt")) if p.relative_to(root).as_posix() not in _PYTHON_DOCS_LEFT_OUT]
    return _unique([_read(p, "python-docs") for p in files])


def fortunes(root: Path = FORTUNES_DIR) -> list[Document]:
    """Debian's fortune files (no index or link files, no ASCII art), entries joined by blank lines."""
    files = (
        sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.name not in _FORTUNES_LEFT_OUT)
        if root.is_dir()
        else []
    )
    if not files:
        raise CorpusError(
            f"corpus source 'fortunes' needs Debian's fortune files in {root}: apt-get install fortunes, or leave the "
            "source out with --sources"
        )
    docs = []
    for path in files:
        doc = _read(path, "fortunes")
        if doc is not None:
            entries = [e.strip("\n") for e in re.split(r"^%$", doc.text, flags=re.MULTILINE)]
            docs.append(Document("fortunes", doc.name, "\n\n".join(e for e in entries if e.strip())))
    return _unique(docs)


def text_files(paths: Sequence[str | os.PathLike]) -> list[Document]:
    """Documents from user files; a directory contributes its .txt/.md/.rst/.py files, recursively, sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            _check_text_file(path)
            files.append(path)
        else:
            raise CorpusError(f"corpus path {str(path)!r} does not exist: pass text files or directories")
    docs = _unique([_read(p, "files") for p in files])
    if not docs:
        raise CorpusError(f"corpus {', '.join(map(str, paths))} holds no readable UTF-8 text: pass text files")
    return docs


def _check_text_file(path: Path) -> None:
    """A file named by the user must be readable UTF-8 text (files found in a directory are skipped otherwise)."""
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"corpus file {str(path)!r} is not UTF-8 text: pass text files") from None
    except OSError as exc:
        raise CorpusError(f"corpus file {str(path)!r} cannot be read ({exc.strerror}): check its permissions") from None


def builtin_documents(source: str) -> list[Document]:
    """The documents of a built-in source."""
    loaders = {
        "python-topics": python_topics,
        "licenses": common_licenses,
        "python-source": python_source,
        "python-docs": python_docs,
        "fortunes": fortunes,
    }
    if source not in loaders:
        raise CorpusError(f"unknown corpus source {source!r}: choose from {', '.join(BUILTIN_SOURCES)} or pass paths")
    return loaders[source]()


# ------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class CorpusConfig:
    """How prompts are cut and split. `files` replaces the built-in sources with the user's text files."""

    sources: tuple[str, ...] = DEFAULT_SOURCES
    files: tuple[str, ...] = ()
    min_tokens: int = 750
    max_tokens: int = 1250
    n_train: int = 300
    n_test_per_source: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 * _MARGIN < self.min_tokens < self.max_tokens - 2 * _MARGIN:
            raise CorpusError(
                f"token window [{self.min_tokens}, {self.max_tokens}] is too narrow: use e.g. --min-tokens 750 "
                "--max-tokens 1250"
            )
        if self.n_train < 1 or self.n_test_per_source < 1:
            raise CorpusError("the corpus needs at least one train prompt and one test prompt per source")


@dataclass(frozen=True)
class Prompt:
    """One prompt of the corpus: its text, its length in tokens, its source and split."""

    index: int
    split: str  # "test" or "train"
    source: str
    text: str
    n_tokens: int

    @property
    def sha256(self) -> str:
        return _sha256(self.text)


@dataclass
class Corpus:
    """Test prompts first, then training prompts; `documents` are the texts they were cut from, in reading order."""

    config: CorpusConfig
    prompts: list[Prompt]
    documents: list[Document] = field(repr=False)

    @property
    def n_test(self) -> int:
        return sum(p.split == "test" for p in self.prompts)

    def digest(self) -> str:
        """sha256 over the prompt texts, in order: equal digests mean equal training data."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(p.sha256.encode())
        return h.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """What the training report records: settings, sources, Python version, every document's sha256."""
        return {
            "sources": list(self.config.files or self.config.sources),
            "seed": self.config.seed,
            "min_tokens": self.config.min_tokens,
            "max_tokens": self.config.max_tokens,
            "n_test_prompts": self.n_test,
            "n_train_prompts": len(self.prompts) - self.n_test,
            "python": sys.version.split()[0],
            "digest": self.digest(),
            "documents": [
                {"source": d.source, "name": d.name, "chars": len(d.text), "sha256": d.sha256} for d in self.documents
            ],
        }


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_prompts(
    tokenizer: Any, stream: str, min_tokens: int, max_tokens: int, rng: random.Random, limit: int | None = None
) -> list[tuple[str, int]]:
    """Cut `stream` into (text, n_tokens) pieces with min_tokens <= n_tokens <= max_tokens, at line starts."""
    enc = tokenizer(stream, return_offsets_mapping=True, add_special_tokens=False)
    starts = [s for s, _ in enc["offset_mapping"]] + [len(stream)]
    n = len(starts) - 1
    line_starts = [i for i in range(n) if starts[i] == 0 or stream[starts[i] - 1] == "\n"] + [n]
    pieces: list[tuple[str, int]] = []
    cursor = 0
    while cursor < n and (limit is None or len(pieces) < limit):
        target = cursor + rng.randint(min_tokens + _MARGIN, max_tokens - _MARGIN)
        lo = bisect.bisect_left(line_starts, cursor + min_tokens + _MARGIN)
        hi = bisect.bisect_right(line_starts, cursor + max_tokens - _MARGIN)
        candidates = line_starts[lo:hi]
        end = min(candidates, key=lambda b: abs(b - target)) if candidates else min(target, n)
        text = stream[starts[cursor] : starts[end]].strip()
        count = _n_tokens(tokenizer, text)
        if min_tokens <= count <= max_tokens:
            pieces.append((text, count))
        cursor = end
    return pieces


def _source_pieces(
    tokenizer: Any, docs: list[Document], config: CorpusConfig, rng: random.Random, needed: int
) -> tuple[list[tuple[str, int]], list[Document]]:
    """Shuffle documents, join them and cut until `needed` pieces exist (or the text runs out), then shuffle the
    pieces. Returns the pieces and the documents that were read."""
    order = list(docs)
    rng.shuffle(order)
    pieces: list[tuple[str, int]] = []
    batch: list[str] = []
    budget = needed * config.max_tokens * 5  # characters per batch: ~4 chars per token, some slack
    used = len(order)
    for i, doc in enumerate(order):
        batch.append(doc.text.strip())
        if sum(map(len, batch)) >= budget or i == len(order) - 1:
            stream = "\n\n".join(batch)
            pieces += cut_prompts(tokenizer, stream, config.min_tokens, config.max_tokens, rng, needed - len(pieces))
            batch = []
            if len(pieces) >= needed:
                used = i + 1
                break
    rng.shuffle(pieces)
    return pieces, order[:used]


def build_corpus(tokenizer: Any, config: CorpusConfig | None = None) -> Corpus:
    """Cut the configured sources into test and training prompts with `tokenizer` (see the module docstring)."""
    config = config or CorpusConfig()
    if config.files:
        by_source = {"files": text_files(config.files)}
    else:
        by_source = {s: builtin_documents(s) for s in config.sources}
    needed = config.n_test_per_source + config.n_train
    rng = random.Random(config.seed)
    pieces: dict[str, list[tuple[str, int]]] = {}
    documents: list[Document] = []
    for source, docs in by_source.items():
        pieces[source], used = _source_pieces(tokenizer, docs, config, rng, needed)
        documents += used
        if len(pieces[source]) <= config.n_test_per_source:
            raise CorpusError(
                f"corpus source {source!r} yields {len(pieces[source])} prompt(s) of {config.min_tokens}-"
                f"{config.max_tokens} tokens, more than {config.n_test_per_source} needed: add longer texts or "
                "lower --min-tokens"
            )
    test = [(s, p) for s in pieces for p in pieces[s][: config.n_test_per_source]]
    queues = {s: pieces[s][config.n_test_per_source :] for s in pieces}
    train: list[tuple[str, tuple[str, int]]] = []
    while len(train) < config.n_train and any(queues.values()):
        for s, queue in queues.items():
            if queue and len(train) < config.n_train:
                train.append((s, queue.pop(0)))
    prompts = [
        Prompt(i, split, source, text, n)
        for i, (split, (source, (text, n))) in enumerate([("test", t) for t in test] + [("train", t) for t in train])
    ]
    return Corpus(config, prompts, documents)
