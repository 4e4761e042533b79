"""Zero-shot accuracy through lm-eval, on the vendored data.

Each task is lm-eval's own task (``lm_eval/tasks/<name>/*.yaml``: prompt,
choices, target, metrics, ``process_docs``), built from the installed YAML
with one change: the dataset comes from the files under ``bench/data``
(converted to the Hugging Face schema the YAML expects) instead of the hub.
The (possibly compressed) model in memory is evaluated through lm-eval's
``HFLM`` wrapper, zero-shot, so the numbers are comparable with published
lm-eval numbers. ``limit`` keeps the first N examples of each task.

Measurements: ``acc`` and, where lm-eval defines it, ``acc_norm``; the
standard error, the number of examples and each example's correctness
(``correct``: a string of 0/1 in document order, for the reports' paired
tests) go into ``extra``.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from bench import EvalSettings, Measurement, Metric, Task, checksums, data_file, hookimpl

# The paper's six tasks (SVD-LLM Table 1); their average is the plain mean of ``acc``.
PAPER_TASKS = ("openbookqa", "arc_easy", "winogrande", "hellaswag", "piqa", "mathqa")
AVERAGE = ("SVD-LLM's six zero-shot tasks", "acc", PAPER_TASKS)


def _jsonl(rel: str) -> list[dict]:
    path = data_file(rel)
    opener = gzip.open if rel.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _labels(rel: str) -> list[str]:
    return [line.strip() for line in data_file(rel).read_text().splitlines() if line.strip()]


def _piqa() -> list[dict]:
    """baber/piqa schema: goal, sol1, sol2, label (int); labels come from their own file."""
    docs, labels = _jsonl("piqa/valid.jsonl"), _labels("piqa/valid-labels.lst")
    if len(docs) != len(labels):
        raise ValueError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]


def _arc(split: str) -> Callable[[], list[dict]]:
    """The vendored ARC files already use the allenai/ai2_arc schema."""
    return lambda: _jsonl(f"arc/ARC-{split}-test.jsonl")


def _openbookqa() -> list[dict]:
    """allenai/openbookqa (main) schema: question_stem, choices{text, label}, answerKey."""
    return [{"id": d["id"], "question_stem": d["question"]["stem"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]},
             "answerKey": d["answerKey"]} for d in _jsonl("openbookqa/test.jsonl")]


def _winogrande() -> list[dict]:
    """allenai/winogrande schema: sentence, option1, option2, answer ('1'/'2'); answers from the labels file."""
    docs, labels = _jsonl("winogrande/dev.jsonl"), _labels("winogrande/dev-labels.lst")
    if len(docs) != len(labels):
        raise ValueError(f"winogrande: {len(docs)} sentences but {len(labels)} labels")
    return [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": y}
            for d, y in zip(docs, labels)]


def _mathqa() -> list[dict]:
    """The original MathQA json has the regisss/math_qa fields already."""
    keys = ("Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category")
    return [{k: d[k] for k in keys} for d in json.loads(data_file("mathqa/test.json").read_text(encoding="utf-8"))]


def _hellaswag() -> list[dict]:
    """The vendored file is the Hugging Face hellaswag validation split (label is a string there too)."""
    return _jsonl("hellaswag/hellaswag_val.jsonl.gz")


class ZeroShotTask(Task):
    """One lm-eval multiple-choice task fed from vendored files.

    ``yaml`` is relative to ``lm_eval/tasks``; ``records`` is the canonical
    size of the evaluated split; ``metrics`` those lm-eval reports for it.
    """

    def __init__(self, name: str, description: str, yaml: str, files: tuple[str, ...], records: int,
                 loader: Callable[[], list[dict]], metrics: tuple[str, ...] = ("acc", "acc_norm")):
        self.name, self.description, self.yaml, self.files = name, description, yaml, files
        self.records, self._loader = records, loader
        self.metrics = {m: Metric("accuracy", higher_is_better=True) for m in metrics}
        self.average = AVERAGE if name in PAPER_TASKS else None

    def settings_key(self, settings: EvalSettings) -> dict:
        # batch size is in the key: lm-eval scores can move slightly with padding
        return {"limit": settings.limit, "batch_size": settings.batch_size, "num_fewshot": 0}

    def data_checksums(self) -> dict[str, str]:
        return {f: checksums()[f] for f in self.files}

    def documents(self) -> list[dict]:
        """The evaluated split, converted to the schema lm-eval's YAML expects."""
        return self._loader()

    def lm_eval_task(self):
        """lm-eval's task built from its installed YAML, its data replaced by :meth:`documents`."""
        return build_lm_eval_task(self.yaml, _split(self))

    def evaluate(self, model, tokenizer, settings: EvalSettings) -> list[Measurement]:
        _offline()
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM

        task = self.lm_eval_task()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        out = evaluator.evaluate(lm=lm, task_dict={"tasks": {self.name: task}, "groups": {}}, limit=settings.limit,
                                 log_samples=True, bootstrap_iters=1000)
        result = out["results"][self.name]
        samples = sorted(out.get("samples", {}).get(self.name, []), key=lambda sample: sample["doc_id"])
        evaluated = out.get("n-samples", {}).get(self.name, {}).get("effective", settings.limit or self.records)
        measurements = []
        for metric in self.metrics:
            value = result.get(f"{metric},none")
            if value is None:
                continue
            stderr = result.get(f"{metric}_stderr,none")
            measurements.append(Measurement(metric, float(value), {
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "examples": int(evaluated), "split_examples": self.records, "num_fewshot": 0,
                "lm_eval_task": self.yaml, "correct": correctness(samples, metric)}))
        return measurements


def correctness(samples: list[dict], metric: str) -> str:
    """Each example's score on ``metric`` in document order, as a string of 0/1 (the reports' paired tests
    resample it); empty when lm-eval logged no 0/1 score for it."""
    flags = [sample.get(metric) for sample in samples]
    if not flags or any(flag not in (0, 1, 0.0, 1.0, True, False) for flag in flags):
        return ""
    return "".join("1" if flag else "0" for flag in flags)


def _offline() -> None:
    """No hub access: must be set before lm_eval / datasets are imported."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


@functools.cache
def _split(task: ZeroShotTask):
    """The task's documents as a ``datasets.Dataset``, with the YAML's ``process_docs`` applied once."""
    _offline()
    import datasets

    dataset = datasets.Dataset.from_list(task.documents())
    process = lm_eval_yaml(task.yaml).get("process_docs")
    return process(dataset) if process is not None else dataset


def lm_eval_yaml(rel: str) -> dict:
    """An installed lm-eval task config with ``include`` and ``!function`` resolved."""
    _offline()
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / rel
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10
        return load_yaml(path, resolve_func=True)
    except ImportError:
        from lm_eval.utils import load_yaml_config  # older lm-eval
        return load_yaml_config(str(path))


def build_lm_eval_task(yaml_rel: str, docs):
    """lm-eval's ConfigurableTask for ``yaml_rel`` whose evaluation split is ``docs``.

    Only the data source changes: the split lm-eval evaluates (its
    ``test_split``, else ``validation_split``) is served from ``docs`` (a
    ``datasets.Dataset`` already passed through the YAML's ``process_docs``),
    and there are no training/few-shot splits (zero-shot).
    """
    _offline()
    import datasets
    from lm_eval.api.task import ConfigurableTask

    config = dict(lm_eval_yaml(yaml_rel))
    split = config.get("test_split") or config["validation_split"]
    dataset = datasets.DatasetDict({split: docs})
    config.update({"custom_dataset": lambda **_: dataset, "dataset_path": None, "dataset_name": None,
                   "dataset_kwargs": None, "process_docs": None, "training_split": None, "fewshot_split": None,
                   "validation_split": split if not config.get("test_split") else None, "num_fewshot": 0})
    task_logger = logging.getLogger("lm_eval.api.task")
    level = task_logger.level
    task_logger.setLevel(logging.ERROR)  # its custom_dataset hint about --metadata does not apply here
    try:
        return ConfigurableTask(config=config)
    finally:
        task_logger.setLevel(level)


TASKS = (
    ZeroShotTask("piqa", "PIQA validation, lm-eval piqa prompt (accuracy)", "piqa/piqa.yaml",
                 ("piqa/valid.jsonl", "piqa/valid-labels.lst"), 1838, _piqa),
    ZeroShotTask("arc_easy", "ARC-Easy test, lm-eval arc_easy prompt (accuracy)", "arc/arc_easy.yaml",
                 ("arc/ARC-Easy-test.jsonl",), 2376, _arc("Easy")),
    ZeroShotTask("arc_challenge", "ARC-Challenge test, lm-eval arc_challenge prompt (accuracy)",
                 "arc/arc_challenge.yaml", ("arc/ARC-Challenge-test.jsonl",), 1172, _arc("Challenge")),
    ZeroShotTask("hellaswag", "HellaSwag validation, lm-eval hellaswag prompt (accuracy)", "hellaswag/hellaswag.yaml",
                 ("hellaswag/hellaswag_val.jsonl.gz",), 10042, _hellaswag),
    ZeroShotTask("winogrande", "WinoGrande (xl) dev, lm-eval winogrande partial scoring (accuracy)",
                 "winogrande/default.yaml", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), 1267,
                 _winogrande, metrics=("acc",)),
    ZeroShotTask("openbookqa", "OpenBookQA (main) test, lm-eval openbookqa prompt (accuracy)",
                 "openbookqa/openbookqa.yaml", ("openbookqa/test.jsonl",), 500, _openbookqa),
    ZeroShotTask("mathqa", "MathQA test, lm-eval mathqa prompt (accuracy)", "mathqa/mathqa.yaml",
                 ("mathqa/test.json",), 2985, _mathqa),
)


@hookimpl
def register_tasks(register):
    for task in TASKS:
        register(task)
