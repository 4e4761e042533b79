"""The run's settings: one dataclass of defaults, named profiles merged over it, flags over both.

``RunConfig`` is the single source of defaults. A profile is a partial
config (the same field names, nested for ``calibration`` and
``method_options``) merged over the defaults; settings given explicitly on
the command line override the profile. ``--profile FILE.json`` reads a
profile from a JSON file. Values are read by the fields' type hints
(:mod:`bench.api.configs`), so a profile file and the command line accept the
same things.

- ``default``: the main job - SmolLM2-135M, every built-in method, three
  ratios, WikiText-2 and C4 perplexity, a zero-shot subset and throughput,
  sized to finish with the full report in under 20 minutes on two CPU cores
  (short windows, few of them, small calibration).
- ``paper``: the papers' protocol - seqlen 2048, full test sets, 256 x 2048
  WikiText-2 calibration (seed 3), the six zero-shot tasks, ratios 20-80%,
  SVD-LLM V2's throughput setting. Meant for a GPU (``--device cuda``).
- ``ci``: the regression baseline's configuration (``svdbench baseline``,
  ``svdbench check``): a few minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.api.configs import build_config, config_dict
from bench.engine.budget import parse_budget
from bench.errors import UsageError, unknown_name
from bench.model.devices import parse_device
from bench.model.loading import DEFAULT_MODEL
from bench.pathnames import check_path_name


@dataclass(frozen=True)
class CalibrationConfig:
    """Which calibration text, how many random windows of what length, which seed.

    Defaults are sized for two CPU cores; the papers use 256 x 2048 tokens of
    WikiText-2 train (seed 3). WikiText-2 train is not available offline, so
    the validation split stands in (never a test split); ``c4`` uses the
    1,000 vendored C4 documents that evaluation does not read.
    """

    dataset: Literal["wikitext2", "c4"] = "wikitext2"
    samples: int = 32
    seqlen: int = 512
    seed: int = 3

    def __post_init__(self):
        if self.samples < 1 or self.seqlen < 2:
            raise UsageError("--calib-samples must be >= 1 and --calib-seqlen >= 2")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (recorded whole in the manifest).

    ``methods`` may be ``("all",)`` (every registered method) or ``("none",)``
    (only the dense model). ``ratios`` are fractions of parameters removed;
    ``budgets`` are bytes (``300MB``) or fractions of the dense bytes
    (``0.75``). ``method_options`` maps a method name to its settings.
    A value given twice in ``methods``, ``ratios``, ``budgets`` (by value:
    ``0.9`` and ``0.90``) or ``tasks`` counts once, in the order first given.
    """

    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = ("svd",)
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6)
    kv_ratios: tuple[float, ...] = ()  # fractions of KV-cache bytes removed (methods with compresses="kv_cache")
    budgets: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    limit: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugins_dirs: tuple[str, ...] = ()
    out: str = "runs/latest"

    def __post_init__(self):
        for name in ("methods", "ratios", "kv_ratios", "tasks"):  # a repeated value is one cell, not two
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        budgets: dict = {}
        for spec in self.budgets:  # by value: 0.9 and 0.90, 300MB and 300000000B are one budget
            budgets.setdefault(parse_budget(spec), spec)
        object.__setattr__(self, "budgets", tuple(budgets.values()))
        for ratio in self.ratios:
            if not 0.0 < ratio < 1.0:
                raise UsageError(f"ratio {ratio} is outside (0, 1); give the fraction of parameters to remove, "
                                 "e.g. --ratios 0.2,0.4")
        for ratio in self.kv_ratios:
            if not 0.0 < ratio < 1.0:
                raise UsageError(f"KV ratio {ratio} is outside (0, 1); give the fraction of KV-cache bytes to remove, "
                                 "e.g. --kv-ratios 0.3,0.5")
        if self.seqlen < 2:
            raise UsageError("--seqlen must be at least 2")
        if self.limit is not None and self.limit < 1:
            raise UsageError("--limit must be at least 1")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        parse_device(self.device)
        check_path_name(self.out, "--out")
        if not self.methods:
            raise UsageError("--methods is empty; give method names, 'all' or 'none'")
        if not self.tasks:
            raise UsageError("--tasks is empty; give task names, e.g. --tasks wikitext2")
        if not self.ratios and not self.kv_ratios and not self.budgets and list(self.methods) != ["none"]:
            raise UsageError("--ratios is empty and no --budgets are given, so no method would run; "
                             "give ratios, e.g. --ratios 0.2,0.4, or --methods none for only the dense model")
        if not isinstance(self.method_options, dict) or not all(
                isinstance(v, dict) for v in self.method_options.values()):
            raise UsageError("method_options must map method names to objects of settings, "
                             "e.g. {\"asvd\": {\"alpha\": 0.5}}")

    def to_dict(self) -> dict:
        return config_dict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        return build_config(cls, values, "run config")


@dataclass(frozen=True)
class ExecutorConfig:
    """How a run's groups are executed: in this process (``local``) or as Ray tasks (``ray``).

    It never changes a result, so it is not part of :class:`RunConfig`, of
    any resume key or of any cache key; the manifest records it. ``ray_address``
    None starts or joins a local Ray instance, ``auto`` joins a running
    cluster, anything else is a cluster address. ``gpus_per_task`` None means
    1 with ``--device cuda`` and 0 otherwise. A task whose worker dies is run
    again up to ``max_retries`` times.
    """

    kind: str = "local"
    ray_address: str | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None
    max_retries: int = 2

    def __post_init__(self):
        if self.kind not in ("local", "ray"):
            raise UsageError(f"--executor {self.kind!r} is not an executor; use local or ray")
        if self.cpus_per_task <= 0:
            raise UsageError(f"--ray-cpus-per-task {self.cpus_per_task} must be > 0, e.g. 1")
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise UsageError(f"--ray-gpus-per-task {self.gpus_per_task} must be >= 0, e.g. 1")
        if self.max_retries < 0:
            raise UsageError(f"--ray-max-retries {self.max_retries} must be >= 0, e.g. 2")

    def gpus(self, device: str) -> float:
        """The GPUs each task asks for on ``device``."""
        if self.gpus_per_task is not None:
            return self.gpus_per_task
        return 1.0 if device.startswith("cuda") else 0.0


# Every built-in method, in the order the papers list them (reports keep the run's order).
BUILTIN_METHODS = ["svd", "fwsvd", "asvd", "svdllm_w", "svdllm_u", "svdllm", "svdllm_v2", "dipsvd", "basis_sharing",
                   "adasvd", "zs_svd", "svdllm_quant", "hqq"]

PROFILES: dict[str, dict] = {
    "default": {
        "model": "smollm2-135m",
        "methods": BUILTIN_METHODS,
        "ratios": [0.2, 0.4, 0.6],
        "tasks": ["wikitext2", "c4", "piqa", "arc_easy", "throughput_quick"],
        "seqlen": 256,
        "limit": 8,
        "batch_size": 8,
        "calibration": {"dataset": "wikitext2", "samples": 16, "seqlen": 256, "seed": 3},
        # CPU-sized budgets for the two costly stages: ASVD's sensitivity search
        # (its default, 210 linears x 6 kept fractions on 2 x 256 tokens, takes about
        # 6 min on two cores; here 210 x 3 on 128 tokens) and the sequential LoRA update
        # (a step of 4 examples takes ~4 s here: 2 steps per phase is a smoke-sized update;
        # the Table-4 ablation uses the default 24 - see README)
        "method_options": {
            "asvd": {"sensitivity_samples": 1, "sensitivity_seqlen": 128, "candidates": [0.8, 0.6, 0.4]},
            "svdllm": {"update_steps": 2, "eval_examples": 8},
            "svdllm_u": {"update_steps": 2, "eval_examples": 8},
        },
    },
    "paper": {
        "model": "smollm2-135m",
        "methods": BUILTIN_METHODS,
        "ratios": [0.2, 0.4, 0.6, 0.8],
        "tasks": ["wikitext2", "c4", "openbookqa", "arc_easy", "winogrande", "hellaswag", "piqa", "mathqa",
                  "throughput_v2"],
        "seqlen": 2048,
        "limit": None,
        "calibration": {"dataset": "wikitext2", "samples": 256, "seqlen": 2048, "seed": 3},
    },
    "ci": {
        "model": "smollm2-135m",
        "methods": ["svd", "svdllm_w"],
        "ratios": [0.2, 0.4],
        "tasks": ["wikitext2"],
        "seqlen": 512,
        "limit": 2,
        "dtype": "float32",
        "calibration": {"dataset": "wikitext2", "samples": 8, "seqlen": 512, "seed": 3},
    },
}


def load_profile(name: str) -> dict:
    """A built-in profile by name, or the settings of a JSON file."""
    if name in PROFILES:
        return json.loads(json.dumps(PROFILES[name]))  # a deep copy
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        try:
            settings = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"profile file {path} does not exist; give {', '.join(PROFILES)} or a JSON file") from None
        except (OSError, ValueError) as error:
            raise UsageError(f"profile file {path} is not valid JSON: {error}") from None
        if not isinstance(settings, dict):
            raise UsageError(f"profile file {path} must hold a JSON object of run settings, e.g. {{\"limit\": 4}}")
        return settings
    raise unknown_name("profile", name, list(PROFILES))


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``: nested dictionaries merge key by key, other values replace."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config(profile: str | None, explicit: dict) -> RunConfig:
    """The defaults, then the profile, then the explicitly given settings.

    When budgets are given and ratios are not (anywhere), the run has no
    fixed-ratio rows: an equal-memory comparison on its own.
    """
    values = load_profile(profile) if profile else {}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise UsageError(f"profile {profile!r} sets {unknown[0]!r}, which is not a run setting "
                         f"(settings: {', '.join(f.name for f in dataclasses.fields(RunConfig))})")
    values = _merge(values, explicit)
    if (values.get("budgets") or values.get("kv_ratios")) and "ratios" not in values:
        values["ratios"] = []
    return RunConfig.from_dict(values)
