"""Run profiles: named sets of ``svdbench run`` settings, kept here as data.

- ``default``: the main job - SmolLM2-135M, every registered method, three
  ratios, WikiText-2 and C4 perplexity, a zero-shot subset and throughput,
  sized to finish with the full report in under 20 minutes on two CPU cores
  (short windows, few of them, small calibration).
- ``paper``: the papers' protocol - seqlen 2048, full test sets, 256 x 2048
  WikiText-2 calibration (seed 3), the six zero-shot tasks, ratios 20-80%,
  SVD-LLM V2's throughput setting. Meant for a GPU (``--device cuda``).
- ``ci``: the regression baseline's configuration (``svdbench baseline``,
  ``svdbench check``): a few minutes on two CPU cores.

Keys are the ``run`` command's option names (argparse ``dest``) with values
of the parsed type. A flag given on the command line overrides the profile;
the profile overrides the flag's default. ``--profile FILE.json`` reads the
same keys from a JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.errors import UsageError, unknown_name

PROFILES: dict[str, dict] = {
    "default": {
        "model": "smollm2-135m",
        "methods": "all",
        "ratios": [0.2, 0.4, 0.6],
        "tasks": ["wikitext2", "c4", "piqa", "arc_easy", "throughput_quick"],
        "seqlen": 256,
        "limit": 8,
        "batch_size": 8,
        "calib_dataset": "wikitext2",
        "calib_samples": 16,
        "calib_seqlen": 256,
        "seed": 3,
        # CPU-sized budgets for the two costly stages: ASVD's sensitivity search
        # (its default, 210 linears x 6 kept fractions on 2 x 256 tokens, takes about
        # 20 min on two cores; here 210 x 3 on 128 tokens) and the sequential LoRA update
        # (a step of 4 examples takes ~4 s here: 2 steps per phase is a smoke-sized update;
        # the Table-4 ablation uses the default 24 - see README)
        "method_option": ["asvd.sensitivity_samples=1", "asvd.sensitivity_seqlen=128", "asvd.candidates=0.8,0.6,0.4",
                          "svdllm.update_steps=2", "svdllm.eval_examples=8",
                          "svdllm_u.update_steps=2", "svdllm_u.eval_examples=8"],
    },
    "paper": {
        "model": "smollm2-135m",
        "methods": "all",
        "ratios": [0.2, 0.4, 0.6, 0.8],
        "tasks": ["wikitext2", "c4", "openbookqa", "arc_easy", "winogrande", "hellaswag", "piqa", "mathqa",
                  "throughput_v2"],
        "seqlen": 2048,
        "limit": None,
        "calib_dataset": "wikitext2",
        "calib_samples": 256,
        "calib_seqlen": 2048,
        "seed": 3,
    },
    "ci": {
        "model": "smollm2-135m",
        "methods": "svd,svdllm_w",
        "ratios": [0.2, 0.4],
        "tasks": ["wikitext2"],
        "seqlen": 512,
        "limit": 2,
        "dtype": "float32",
        "calib_dataset": "wikitext2",
        "calib_samples": 8,
        "calib_seqlen": 512,
        "seed": 3,
    },
}


def load_profile(name: str) -> dict:
    """A built-in profile by name, or the settings of a JSON file."""
    if name in PROFILES:
        return dict(PROFILES[name])
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        try:
            settings = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"profile file {path} does not exist; give {', '.join(PROFILES)} or a JSON file") from None
        except ValueError as error:
            raise UsageError(f"profile file {path} is not valid JSON: {error}") from None
        if not isinstance(settings, dict):
            raise UsageError(f"profile file {path} must hold a JSON object of run options, e.g. {{\"limit\": 4}}")
        return settings
    raise unknown_name("profile", name, list(PROFILES))


def explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The ``dest`` of every option given on the command line (parsed again with defaults suppressed)."""

    def suppress(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            else:
                action.default = argparse.SUPPRESS

    suppress(parser)
    return set(vars(parser.parse_args(argv)))


def apply_profile(args: argparse.Namespace, explicit: set[str]) -> dict:
    """Set every profile value the command line did not give; returns the values applied."""
    name = getattr(args, "profile", None)
    if not name:
        return {}
    applied = {}
    for key, value in load_profile(name).items():
        if not hasattr(args, key):
            raise UsageError(f"profile {name!r} sets {key!r}, which is not an option of `svdbench run` "
                             f"(options: {', '.join(sorted(k for k in vars(args) if not k.startswith('_')))})")
        if key not in explicit:
            setattr(args, key, value)
            applied[key] = value
    return applied
