"""Zero-shot tasks: lm-eval's task definitions over the vendored files, offline."""

import math

import pytest

from bench.api.task import EvalSettings
from bench.corpora import checksums
from tasks.zeroshot import AVERAGE, PAPER_TASKS, TASKS

CANONICAL = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
             "openbookqa": 500, "mathqa": 2985}
BY_NAME = {task.name: task for task in TASKS}


def test_every_task_is_registered_and_the_paper_six_are_among_them(registry):
    assert set(CANONICAL) <= set(registry.tasks)
    assert set(PAPER_TASKS) <= set(CANONICAL) and len(PAPER_TASKS) == 6


def test_tasks_declare_accuracy_metrics_and_the_paper_average():
    for task in TASKS:
        info = task.describe()
        assert set(info["metrics"]) == ({"acc"} if task.name == "winogrande" else {"acc", "acc_norm"})
        assert all(m["kind"] == "accuracy" and m["higher_is_better"] is True for m in info["metrics"].values())
        if task.name in PAPER_TASKS:
            assert info["average"] == {"group": AVERAGE[0], "metric": "acc", "members": list(PAPER_TASKS)}
        else:  # arc_challenge is not one of the paper's six
            assert "average" not in info


@pytest.mark.parametrize("name", list(CANONICAL))
def test_full_split_loads_with_canonical_count_and_valid_targets(name):
    task = BY_NAME[name].lm_eval_task()
    docs = task.eval_docs
    assert len(docs) == CANONICAL[name]
    for doc in (docs[0], docs[len(docs) // 2], docs[len(docs) - 1]):
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        # winogrande scores the continuation after each option; the others name the gold choice by index
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
        if name == "winogrande":
            assert isinstance(task.doc_to_text(doc), int) and 0 <= task.doc_to_text(doc) < 2
        else:
            assert isinstance(target, int) and 0 <= target < len(choices)


def test_prompts_follow_lm_eval_definitions():
    piqa = BY_NAME["piqa"].lm_eval_task()
    first = BY_NAME["piqa"].documents()[0]
    assert piqa.doc_to_text(piqa.eval_docs[0]) == f"Question: {first['goal']}\nAnswer:"
    obqa = BY_NAME["openbookqa"].lm_eval_task()
    doc = obqa.eval_docs[0]  # answerKey "B" in the vendored file
    assert obqa.doc_to_text(doc) == BY_NAME["openbookqa"].documents()[0]["question_stem"]
    assert obqa.doc_to_target(doc) == 1
    hellaswag = BY_NAME["hellaswag"].lm_eval_task()
    assert hellaswag.doc_to_text(hellaswag.eval_docs[0]).startswith("Roof shingle removal: A man is sitting on a roof.")
    mathqa = BY_NAME["mathqa"].lm_eval_task()
    assert len(mathqa.doc_to_choice(mathqa.eval_docs[0])) == 5


def test_data_checksums_are_the_vendored_files():
    for task in TASKS:
        sums = task.data_checksums()
        assert sums and all(checksums()[f] == digest for f, digest in sums.items())


@pytest.mark.parametrize("name", list(CANONICAL))
def test_tiny_model_runs_through_each_task(tiny, name):
    task = BY_NAME[name]
    measurements = task.evaluate(tiny.model, tiny.tokenizer, EvalSettings(limit=3, batch_size=4))
    metrics = {m.metric for m in measurements}
    assert metrics == ({"acc"} if name == "winogrande" else {"acc", "acc_norm"})
    for m in measurements:
        assert 0.0 <= m.value <= 1.0
        assert m.extra["examples"] == 3 and m.extra["split_examples"] == CANONICAL[name]
        assert m.extra["stderr"] is not None and math.isfinite(m.extra["stderr"])
        # each example's correctness, in document order, for the reports' paired tests
        assert len(m.extra["correct"]) == 3 and set(m.extra["correct"]) <= {"0", "1"}
        assert math.isclose(m.extra["correct"].count("1") / 3, m.value)
