"""The harness: one model, one calibration set, one evaluation, every method.

For each method the runner collects the statistics it needs (shared and
cached), decomposes every matrix once, then for each ratio allocates ranks,
builds the compressed model, refines it and evaluates every task; for each
memory budget it finds the smallest ratio that fits (``bench/budget.py``) and
evaluates that model. Each finished evaluation is written to results.json at
once; a method that fails is recorded in ``failures`` and the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.calibration import CalibrationConfig, calibration_batches, calibration_checksum, collect_statistics
from bench.budget import budget_bytes, fit_budget, parse_budget
from bench.compress import accounting, compress_model
from bench.errors import UsageError
from bench.method import Context, Method
from bench.models import DEFAULT_MODEL, LoadedModel, cache_root, find_targets, footprint, load_model
from bench.plugins import Registry, load_registry
from bench.results import Results, record_key
from bench.task import EvalSettings

log = logging.getLogger(__name__)

DENSE = "dense"
PACKAGES = ("svdbench", "torch", "transformers", "pluggy", "safetensors", "tokenizers", "lm_eval", "peft", "hqq", "numpy")


@dataclass
class RunConfig:
    """Everything that defines a run (recorded whole in the manifest)."""

    model: str = DEFAULT_MODEL
    methods: list[str] = field(default_factory=lambda: ["svd"])
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    budgets: list[str] = field(default_factory=list)  # bytes ("300MB") or fractions of the dense bytes ("0.75")
    tasks: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    limit: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    method_options: dict[str, dict[str, str]] = field(default_factory=dict)
    plugins_dirs: list[str] = field(default_factory=list)
    out: str = "runs/latest"

    def validate(self, registry: Registry) -> None:
        for ratio in self.ratios:
            if not 0.0 < ratio < 1.0:
                raise UsageError(f"ratio {ratio} is outside (0, 1); give the fraction of parameters to remove, e.g. --ratios 0.2,0.4")
        for budget in self.budgets:
            parse_budget(budget)
        for name in self.methods:
            registry.get("method", name)
        for name in self.tasks:
            registry.get("task", name)
        for name, options in self.method_options.items():  # options of methods not run are checked, then unused
            registry.get("method", name).make_config(**options)
        if self.seqlen < 2:
            raise UsageError("--seqlen must be at least 2")
        if self.limit is not None and self.limit < 1:
            raise UsageError("--limit must be at least 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device} but CUDA is not available; use --device cpu")


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Runner:
    """Runs a :class:`RunConfig` into ``config.out``."""

    def __init__(self, config: RunConfig, registry: Registry | None = None, loaded: LoadedModel | None = None):
        self.config = config
        self.registry = registry or load_registry(config.plugins_dirs)
        config.validate(self.registry)
        self.loaded = loaded
        self.results = Results(config.out)
        self.settings = EvalSettings(seqlen=config.seqlen, limit=config.limit, batch_size=config.batch_size,
                                     device=config.device)
        self.timings: dict[str, float] = {}
        self._batches = None
        self._stats = {}
        self._last_decomposition: tuple[str, dict] | None = None
        self._group: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers
    def _timed(self, label: str, start: float) -> None:
        self.timings[label] = round(time.perf_counter() - start, 3)
        self.results.manifest["timings"] = self.timings

    def method_config(self, method: Method):
        return method.make_config(**self.config.method_options.get(method.name, {}))

    def ratios_for(self, method: Method) -> list[float]:
        """The run's ratios; a method that removes no parameters (``uses_ratio = False``) runs once, at 0."""
        return self.config.ratios if method.uses_ratio else ([0.0] if self.config.ratios else [])

    def uses_calibration(self, method: Method) -> bool:
        return bool(method.requires) or method.needs_calibration_data

    def eval_key(self, method_name: str, config_dict: dict, ratio: float, task_name: str, calibrated: bool,
                 budget: int | None = None) -> str:
        """A record's resume key; a budget run is keyed by its budget in bytes instead of the ratio it finds."""
        task = self.registry.get("task", task_name)
        target = {"ratio": ratio} if budget is None else {"budget": budget}
        return record_key(model=self.loaded.identity, method=method_name, config=config_dict, **target,
                          task=task_name, settings=task.settings_key(self.settings), dtype=self.config.dtype,
                          calibration=dataclasses.asdict(self.config.calibration) if calibrated else None)

    def budget_bytes(self, spec: str) -> int:
        return budget_bytes(spec, self.dense_footprint["bytes"])

    def plan(self) -> list[tuple[str, dict, float, str, str]]:
        """(method, config, ratio, task, key) for every evaluation of the run."""
        rows = [(DENSE, {}, 0.0, task, self.eval_key(DENSE, {}, 0.0, task, False)) for task in self.config.tasks]
        for name in self.config.methods:
            method = self.registry.get("method", name)
            cfg = dataclasses.asdict(self.method_config(method))
            for ratio in self.ratios_for(method):
                for task in self.config.tasks:
                    rows.append((name, cfg, ratio, task, self.eval_key(name, cfg, ratio, task, self.uses_calibration(method))))
            for spec in self.config.budgets:
                for task in self.config.tasks:
                    rows.append((name, cfg, None, task, self.eval_key(name, cfg, None, task, self.uses_calibration(method),
                                                                      budget=self.budget_bytes(spec))))
        return rows

    def write_manifest(self) -> None:
        task_checksums = {}
        for name in self.config.tasks:
            task_checksums.update(self.registry.get("task", name).data_checksums())
        config = dataclasses.asdict(self.config)
        self.results.manifest.update({
            "svdbench_command": " ".join(sys.argv),
            "config": config,
            "model": {"name": self.loaded.name, "source": self.loaded.source, "identity": self.loaded.identity,
                      **self.loaded.info, **self.dense_footprint},
            "versions": package_versions(),
            "git_revision": git_revision(),
            "seeds": {"calibration": self.config.calibration.seed, "torch": torch.initial_seed()},
            "data_checksums": {"tasks": task_checksums,
                               "calibration": {self.config.calibration.dataset: calibration_checksum(self.config.calibration.dataset)}},
            "ratio_definition": "fraction of each compressed matrix's parameters removed: rank = floor(m*n*(1-ratio)/(m+n))",
            "method_configs": {name: dataclasses.asdict(self.method_config(self.registry.get("method", name)))
                               for name in self.config.methods},
            "timings": self.timings,
        })
        self.results.save()

    # ------------------------------------------------------------------ stages
    def evaluate(self, model, method_name: str, config_dict: dict, ratio: float, compression_id: str | None,
                 summary: dict, calibrated: bool, budget: dict | None = None) -> None:
        for task_name in self.config.tasks:
            key = self.eval_key(method_name, config_dict, ratio, task_name, calibrated,
                                budget=budget["budget_bytes"] if budget else None)
            if self.results.done(key):
                continue
            task = self.registry.get("task", task_name)
            start = time.perf_counter()
            measurements = task.evaluate(model, self.loaded.tokenizer, self.settings)
            self._timed(f"evaluate:{method_name}:{ratio}:{task_name}", start)
            self.results.add([{
                "model": self.loaded.name, "method": method_name, "ratio": ratio, "task": task_name,
                "metric": m.metric, "value": m.value, "higher_is_better": task.higher_is_better.get(m.metric),
                "extra": m.extra, "params": summary["params"], "bytes": summary["bytes"],
                "accounting": summary, "compression": compression_id, "config": config_dict, "key": key,
                "seconds": self.timings[f"evaluate:{method_name}:{ratio}:{task_name}"],
                **({"budget": budget["budget"], "budget_fit": budget} if budget else {}),
            } for m in measurements])
            log.info("%s %.2f %s: %s", method_name, ratio, task_name,
                     ", ".join(f"{m.metric}={m.value:.4g}" for m in measurements))

    def calibration_batches(self):
        if self._batches is None:
            self._batches = calibration_batches(self.loaded.tokenizer, self.config.calibration)
        return self._batches

    def statistics_for(self, method: Method):
        missing = [name for name in method.requires if name not in self._stats]
        if missing:  # collect what every method of the run needs at once: one pass over the calibration data
            for other in self.config.methods:
                missing += [n for n in self.registry.get("method", other).requires
                            if n not in self._stats and n not in missing]
            statistics = [self.registry.get("statistic", name) for name in missing]
            start = time.perf_counter()
            collected = collect_statistics(self.loaded.model, self.loaded.identity, self.targets,
                                           self.calibration_batches(), self.config.calibration, statistics,
                                           device=self.config.device)
            self._timed(f"statistics:{','.join(missing)}", start)
            self._group.update(collected.input_group)  # empty for gradient-only collections
            for name in missing:
                self._stats[name] = collected.values[name]
        if not method.requires:
            return None
        from bench.calibration import CalibrationStats

        return CalibrationStats({n: self._stats[n] for n in method.requires}, self._group)

    def prepare(self) -> None:
        """Load the model (unless given) and find its targets."""
        start = time.perf_counter()
        if self.loaded is None:
            self.loaded = load_model(self.config.model, self.config.device, getattr(torch, self.config.dtype))
        self._timed("load_model", start)
        self.targets = find_targets(self.loaded.model)
        self.dense_footprint = footprint(self.loaded.model)

    def method_context(self, method: Method) -> Context:
        """What ``method`` may read: the original model, its statistics and calibration windows."""
        return Context(model=self.loaded.model, tokenizer=self.loaded.tokenizer, targets=self.targets,
                       stats=self.statistics_for(method),
                       calibration=self.calibration_batches() if self.uses_calibration(method) else None,
                       device=self.config.device, cache_dir=cache_root(), model_identity=self.loaded.identity)

    def decompose_all(self, method: Method, config, context: Context, reuse: bool = True) -> dict:
        """Every target's ratio-independent factorization (the previous method's, when its key is the same and ``reuse``)."""
        key = method.decomposition_key(config)
        if reuse and self._last_decomposition and self._last_decomposition[0] == key:
            log.info("%s: reusing the decomposition just computed (%s)", method.name, key)
            return self._last_decomposition[1]
        self._last_decomposition = None  # free the previous one before computing the next
        start = time.perf_counter()
        factorizations = {t.name: method.decompose(t, context.weight(t), context, config)
                          for t in tqdm(self.targets, desc=f"{method.name}: decompose", leave=False, unit="matrix")}
        self._timed(f"decompose:{method.name}", start)
        self._last_decomposition = (key, factorizations)
        return factorizations

    def method_order(self) -> list[str]:
        """The run's methods with those sharing a decomposition next to each other (first appearance first)."""
        keys = {}
        for name in self.config.methods:
            method = self.registry.get("method", name)
            keys[name] = method.decomposition_key(self.method_config(method))
        first = {}
        for name in self.config.methods:
            first.setdefault(keys[name], len(first))
        return sorted(self.config.methods, key=lambda name: first[keys[name]])

    def compress_one(self, name: str, ratio: float):
        """``(model, layers, refine facts)`` of one method at one ratio, without evaluating (``svdbench compress``)."""
        self.prepare()
        method = self.registry.get("method", name)
        config = self.method_config(method)
        context = self.method_context(method)
        factorizations = self.decompose_all(method, config, context)
        ranks = method.allocate(ratio, factorizations, context, config)
        model, layers = compress_model(self.loaded.model, self.targets, factorizations, ranks)
        refined = method.refine(model, ratio, context, config)
        return model, layers, refined

    def run_method(self, name: str) -> None:
        method = self.registry.get("method", name)
        config = self.method_config(method)
        config_dict = dataclasses.asdict(config)
        calibrated = self.uses_calibration(method)
        todo = [r for r in self.ratios_for(method)
                if not all(self.results.done(self.eval_key(name, config_dict, r, t, calibrated)) for t in self.config.tasks)]
        todo_budgets = [b for b in self.config.budgets
                        if not all(self.results.done(self.eval_key(name, config_dict, None, t, calibrated,
                                                                   budget=self.budget_bytes(b)))
                                   for t in self.config.tasks)]
        if not todo and not todo_budgets:
            log.info("%s: every ratio already evaluated; reusing results", name)
            return
        context = self.method_context(method)
        factorizations = self.decompose_all(method, config, context)
        for ratio in todo:
            stage = "allocate"
            try:
                start = time.perf_counter()
                ranks = method.allocate(ratio, factorizations, context, config)
                stage = "compress"
                model, layers = compress_model(self.loaded.model, self.targets, factorizations, ranks)
                stage = "refine"
                refined = method.refine(model, ratio, context, config)
                self._timed(f"compress:{name}:{ratio}", start)
                compression_id = record_key(model=self.loaded.identity, method=name, config=config_dict, ratio=ratio)
                summary = accounting(model, layers, self.dense_footprint)
                self.results.add_compression(compression_id, {"method": name, "ratio": ratio, "config": config_dict,
                                                              "summary": summary, "refine": refined, "layers": layers})
                stage = "evaluate"
                self.evaluate(model, name, config_dict, ratio, compression_id, summary, calibrated)
                del model
            except (KeyboardInterrupt, UsageError):
                raise
            except Exception as error:  # one failing ratio must not take the run down
                self.fail(name, ratio, stage, error)
        for spec in todo_budgets:
            self.run_budget(name, method, config, context, factorizations, calibrated, spec)

    def run_budget(self, name: str, method: Method, config, context: Context, factorizations: dict,
                   calibrated: bool, spec: str) -> None:
        """Compress at the smallest ratio whose model fits the budget ``spec``, then evaluate it."""
        config_dict = dataclasses.asdict(config)
        stage = f"budget {spec}"
        try:
            start = time.perf_counter()
            fit = fit_budget(method, config, context, self.targets, factorizations, self.budget_bytes(spec))
            self._timed(f"compress:{name}:budget={spec}", start)
            kind, number = parse_budget(spec)  # the record's budget: a fraction of dense bytes, or bytes
            budget = {"budget": number if kind == "fraction" else int(number), "spec": spec, **fit.summary()}
            compression_id = record_key(model=self.loaded.identity, method=name, config=config_dict, ratio=fit.ratio)
            summary = accounting(fit.model, fit.layers, self.dense_footprint)
            self.results.add_compression(compression_id, {"method": name, "ratio": fit.ratio, "config": config_dict,
                                                          "summary": summary, "refine": fit.refined,
                                                          "layers": fit.layers, "budget": budget})
            log.info("%s fits budget %s (%d bytes) at ratio %.4f: %d bytes", name, spec, fit.budget_bytes,
                     fit.ratio, fit.bytes)
            stage = f"evaluate (budget {spec})"
            self.evaluate(fit.model, name, config_dict, fit.ratio, compression_id, summary, calibrated, budget=budget)
        except (KeyboardInterrupt, UsageError):
            raise
        except Exception as error:  # one failing budget must not take the run down
            self.fail(name, None, stage, error)

    def fail(self, name: str, ratio: float | None, stage: str, error: Exception) -> None:
        log.error("%s%s failed during %s: %s: %s", name, f" at ratio {ratio}" if ratio is not None else "",
                  stage, type(error).__name__, error)
        self.results.add_failure({"method": name, "ratio": ratio, "stage": stage,
                                  "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc(limit=6)})

    def run(self) -> Results:
        start = time.perf_counter()
        self.prepare()
        self.results.keep_only({row[-1] for row in self.plan()})
        self.write_manifest()
        self.evaluate(self.loaded.model, DENSE, {}, 0.0, None,
                      accounting(self.loaded.model, None, self.dense_footprint), False)
        for name in self.method_order():
            try:
                self.run_method(name)
            except (KeyboardInterrupt, UsageError):
                raise
            except Exception as error:
                self.fail(name, None, "decompose", error)
        self._timed("total", start)
        self.results.save()
        return self.results
