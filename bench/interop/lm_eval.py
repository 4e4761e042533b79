"""lm-eval's own command line on saved models, offline: ``python -m bench.interop.lm_eval`` + lm-eval's arguments.

This runs lm-eval's CLI (``lm_eval.__main__.cli_evaluate``, unchanged, every flag of ``lm_eval``) after the two
things lm-eval cannot do by itself:

- register svdbench's quantization method with transformers (:mod:`bench.interop.hf`), so that
  ``--model hf --model_args pretrained=DIR`` builds the compressed layers of a saved model;
- offer svdbench's zero-shot tasks on their vendored data as lm-eval task configs, named ``svdbench_<task>``
  (``svdbench_piqa``, ``svdbench_arc_easy``, ...): each includes lm-eval's own YAML for the task (prompt,
  choices, metrics, ``process_docs``) and changes only the data source, the vendored documents written as
  JSON lines - what ``svdbench run --tasks piqa`` evaluates. ``--include_path`` to them is added unless given.

From Python, :func:`write_task_configs` writes the same configs for ``lm_eval.simple_evaluate``::

    import bench.interop.hf  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from bench.interop.lm_eval import write_task_configs

    tasks = TaskManager(include_path=str(write_task_configs("lm_eval_tasks")))
    simple_evaluate(model="hf", model_args="pretrained=DIR", tasks=["svdbench_piqa"], task_manager=tasks, limit=8)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PREFIX = "svdbench_"


def _offline() -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _split(yaml_path: Path) -> str:
    """The split lm-eval evaluates for this task: its ``test_split``, else its ``validation_split``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(yaml_path, resolve_func=False)
    return config.get("test_split") or config["validation_split"]


def write_task_configs(directory: str | Path | None = None) -> Path:
    """Write an lm-eval task config and a JSON-lines data file for every zero-shot task svdbench vendors.

    Default directory: ``task_configs/lm_eval`` in the svdbench cache. Returns the directory.
    """
    _offline()
    import lm_eval

    from bench.disk import make_dir
    from bench.engine.plugins import load_registry
    from bench.storage import atomic_write_text, cache_root

    out = Path(directory) if directory is not None else cache_root() / "task_configs" / "lm_eval"
    make_dir(out)
    installed = Path(lm_eval.__file__).parent / "tasks"
    for name, task in load_registry().tasks.items():
        if not (hasattr(task, "documents") and hasattr(task, "yaml")):  # only lm-eval tasks on vendored files
            continue
        included = installed / task.yaml
        split = _split(included)
        data = out / f"{PREFIX}{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps(doc) + "\n" for doc in task.documents()))
        config = {"include": str(included), "task": f"{PREFIX}{name}", "tag": None, "dataset_path": "json",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data.resolve())}},
                  "training_split": None, "fewshot_split": None,
                  "validation_split": split if split == "validation" else None,
                  "test_split": split if split != "validation" else None, "num_fewshot": 0}
        atomic_write_text(out / f"{PREFIX}{name}.yaml", json.dumps(config, indent=1) + "\n")  # JSON is YAML
    return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with svdbench's quantizer registered and its vendored tasks on the include path.

    svdbench's thread policy comes first (before torch loads OpenMP): OpenMP workers that spin while another
    process shares the cores make evaluation many times slower (see bench/threads.py).
    """
    from bench.threads import configure

    configure()
    _offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    import bench.interop.hf  # noqa: F401  (registers the svdbench quantization method)

    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv) and len(argv) > 1:
        argv += ["--include_path", str(write_task_configs())]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
