"""The surrogate-training corpus holds none of the evaluation tasks' text, and its Debian sources read as documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kvzap_eval.errors import CorpusError
from kvzap_eval.train import corpus as corpus_module
from kvzap_eval.train.corpus import (
    BUILTIN_SOURCES,
    CorpusConfig,
    build_corpus,
    builtin_documents,
    fortunes,
    python_docs,
)

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"


def _generators():
    spec = importlib.util.spec_from_file_location("kvzap_tasks_generators_corpus", TASKS_DIR / "generators.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _flat(text: str) -> str:
    return " ".join(text.split())


def haystack_sentences() -> set[str]:
    """Every sentence the kvzap tasks build haystacks from: the essay prose and RULER's repeated filler."""
    pytest.importorskip("datasets")  # the task module imports it
    gen = _generators()
    filler = {_flat(s) + "." for s in gen.REPEAT_FILLER.split(".") if s.strip()}
    return {_flat(s) for s in gen.essay_sentences() if s.strip()} | filler


def occurring(sentences: set[str], texts) -> list[str]:
    flat = "\n".join(_flat(t) for t in texts)
    return sorted(s for s in sentences if s in flat)


def _documents_or_skip(source: str):
    try:
        return builtin_documents(source)
    except CorpusError as exc:  # a Debian package this machine lacks: the message names it
        pytest.skip(str(exc))


def test_haystack_sentences_are_found_when_present(tmp_path):
    """The check itself: a text that quotes the essay haystack or the filler is caught."""
    sentences = task_sentences()
    assert len(sentences) > 400
    essay = sorted(s for s in sentences if len(s.split()) >= 8)[0]
    assert occurring(sentences, ["intro\n" + essay.replace(" ", "\n", 2) + " outro"]) == [essay]
    assert "The sun is yellow." in occurring(sentences, ["Yes. The sun is yellow. No."])
    assert occurring(sentences, ["def f():\n    return 1\n"]) == []


# Sentences of fewer words are common phrases, not task text: 'Here we go.' (the filler) and 'No way.' (the essays)
# also occur among Debian's fortunes, and 'No way.' in one fortunes prompt of the default corpus.
MIN_WORDS = 4


def task_sentences() -> set[str]:
    return {s for s in haystack_sentences() if len(s.split()) >= MIN_WORDS}


@pytest.mark.parametrize("source", BUILTIN_SOURCES)
def test_no_haystack_sentence_occurs_in_any_source(source):
    """Whole sources, not only the prompts cut from them."""
    docs = _documents_or_skip(source)
    assert occurring(task_sentences(), (d.text for d in docs)) == []


@pytest.mark.slow
def test_default_corpus_prompts_hold_no_haystack_sentence():
    """The prompts the shipped surrogates were trained and tested on (default sources, SmolLM2's tokenizer)."""
    for source in BUILTIN_SOURCES:
        _documents_or_skip(source)
    from transformers import AutoTokenizer

    from kvzap_eval.llm.embedded import embedded_model_dir

    corpus = build_corpus(AutoTokenizer.from_pretrained(embedded_model_dir()), CorpusConfig())
    assert len(corpus.prompts) == 330 and corpus.n_test == 30
    assert {p.source for p in corpus.prompts} == set(BUILTIN_SOURCES)
    assert occurring(task_sentences(), (p.text for p in corpus.prompts)) == []
    assert set(occurring(haystack_sentences(), (p.text for p in corpus.prompts))) <= {"No way.", "Here we go."}


def test_fortunes_are_entries_without_separators_or_ascii_art(tmp_path):
    (tmp_path / "wisdom").write_text("A stitch in time.\n%\nTwo lines\nof verse.\n%\n", encoding="utf-8")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (tmp_path / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n", encoding="utf-8")
    (tmp_path / "wisdom.u8").symlink_to(tmp_path / "wisdom")
    docs = fortunes(tmp_path)
    assert [Path(d.name).name for d in docs] == ["wisdom"]
    assert docs[0].text == "A stitch in time.\n\nTwo lines\nof verse."
    assert docs[0].source == "fortunes"


def test_missing_debian_sources_say_which_package_to_install(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match=r"apt-get install fortunes, or leave the source out with --sources"):
        fortunes(tmp_path / "absent")
    monkeypatch.setattr(corpus_module, "python_docs_dir", lambda: None)
    with pytest.raises(CorpusError, match=r"apt-get install python3-doc"):
        python_docs()


def test_python_docs_leave_out_the_changelog_and_licence(tmp_path, monkeypatch):
    (tmp_path / "tutorial").mkdir()
    (tmp_path / "whatsnew").mkdir()
    (tmp_path / "tutorial" / "intro.rst.txt").write_text("An informal introduction.\n", encoding="utf-8")
    (tmp_path / "whatsnew" / "changelog.rst.txt").write_text("- bpo-1: fixed\n", encoding="utf-8")
    (tmp_path / "license.rst.txt").write_text("PSF licence\n", encoding="utf-8")
    (tmp_path / "conf.py").write_text("x = 1\n", encoding="utf-8")
    monkeypatch.setattr(corpus_module, "python_docs_dir", lambda: tmp_path)
    assert [Path(d.name).relative_to(tmp_path).as_posix() for d in python_docs()] == ["tutorial/intro.rst.txt"]


def test_train_cli_takes_built_in_sources():
    from kvzap_eval.train.pipeline import build_parser, config_from_args

    args = build_parser().parse_args(["--out", "x", "--sources", "python-topics", "licenses"])
    assert config_from_args(args).corpus.sources == ("python-topics", "licenses")
    assert config_from_args(build_parser().parse_args(["--out", "x"])).corpus.sources == BUILTIN_SOURCES
