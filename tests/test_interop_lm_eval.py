"""lm-eval's own entry points on a saved model (bench/interop/lm_eval.py): its CLI and ``simple_evaluate`` give
the accuracy svdbench's zero-shot task gives on the same vendored examples, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import factorize, uniform_ranks
from bench.cli import main
from bench.engine.compress import compress_model
from bench.model.saving import save_compressed
from bench.model.targets import find_targets

TASKS = ("piqa", "arc_easy")  # a validation split and a test split
LIMIT = 6


@pytest.fixture
def saved(tiny, tmp_path):
    targets = find_targets(tiny.model)
    factors = {t.name: factorize(tiny.model.get_submodule(t.name).weight) for t in targets}
    model, _ = compress_model(tiny.model, targets, factors, uniform_ranks(targets, 0.5))
    return save_compressed(model, tiny.tokenizer, tmp_path / "m", {"method": "svd", "ratio": 0.5})


def svdbench_accuracy(directory: Path, out: Path) -> dict[str, float]:
    """svdbench's own zero-shot records of the saved model (``svdbench run --model DIR --methods none``)."""
    assert main(["run", "--model", str(directory), "--methods", "none", "--tasks", ",".join(TASKS),
                 "--limit", str(LIMIT), "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    return {r["task"]: r["value"] for r in records if r["metric"] == "acc"}


@pytest.mark.slow  # three zero-shot evaluations and a fresh lm-eval process: about a minute on two cores
def test_lm_eval_cli_and_simple_evaluate_match_svdbench_zero_shot(saved, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import bench.interop.hf  # noqa: F401
    from bench.interop.lm_eval import PREFIX, write_task_configs

    expected = svdbench_accuracy(saved, tmp_path / "run")
    assert set(expected) == set(TASKS)
    configs = write_task_configs(tmp_path / "configs")
    names = [PREFIX + name for name in TASKS]
    results = simple_evaluate(model="hf", model_args=f"pretrained={saved}", tasks=names, limit=LIMIT, batch_size=1,
                              device="cpu", task_manager=TaskManager(include_path=str(configs)),
                              bootstrap_iters=0)["results"]
    assert {name: results[PREFIX + name]["acc,none"] for name in TASKS} == expected

    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "bench.interop.lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={saved}", "--tasks", ",".join(names), "--limit", str(LIMIT), "--batch_size",
                           "1", "--device", "cpu", "--output_path", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert {name: written[PREFIX + name]["acc,none"] for name in TASKS} == expected


def test_task_configs_include_lm_evals_own_yaml_and_the_vendored_documents(registry, tmp_path):
    from bench.interop.lm_eval import PREFIX, write_task_configs

    configs = write_task_configs(tmp_path)
    piqa = json.loads((configs / f"{PREFIX}piqa.yaml").read_text())
    assert piqa["include"].endswith("tasks/piqa/piqa.yaml") and Path(piqa["include"]).is_file()
    data = Path(piqa["dataset_kwargs"]["data_files"]["validation"])
    documents = [json.loads(line) for line in data.read_text().splitlines()]
    assert documents == registry.get("task", "piqa").documents()
    arc = json.loads((configs / f"{PREFIX}arc_easy.yaml").read_text())
    assert arc["test_split"] == "test" and arc["validation_split"] is None and arc["training_split"] is None


def test_svdbenchs_own_load_is_plain_to_lm_eval(saved):
    """The in-memory config of svdbench's own load carries no quantization method: lm-eval's HFLM (svdbench's
    zero-shot tasks) would look it up, and a process need not have registered svdbench's quantizer."""
    from lm_eval.models.huggingface import HFLM

    from bench.model.loading import load_model

    loaded = load_model(str(saved))
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert getattr(loaded.model.config, "transformers_weights", None) is None
    HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
