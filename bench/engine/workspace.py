"""What the groups of one run share in one process: the model, its targets, calibration and statistics."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from bench.api.lowrank import Factorization
from bench.api.method import Context, Method
from bench.api.statistic import CalibrationStats
from bench.engine import decomposition
from bench.engine.blocks import stream_blocks
from bench.engine.calibration import calibration_batches, collect_statistics, stored_statistics
from bench.engine.compress import Compressed, assemble_from_checkpoint, build_compressed
from bench.engine.config import RunConfig
from bench.engine.plan import eval_settings
from bench.engine.plugins import Registry
from bench.engine.shared import SharedMeasurements
from bench.memory import release_free_memory
from bench.model.checkpoint import Checkpoint
from bench.model.loaded import LoadedModel
from bench.model.loading import load_model, reload_weights
from bench.model.targets import find_targets, footprint
from bench.storage import cache_root


class Workspace:
    """What the groups of one run share in one process.

    The dense model is loaded on first use (or given). The decomposition pass
    (:func:`bench.engine.decomposition.prepare`) makes every decomposition a set of methods needs in one calibration pass, block
    by block, straight into the factor store (statistics for every method of
    the plan come along, so the pass is not repeated); afterwards the
    factorizations are read from the store - their spectra in memory, their
    factors on use. When the model came from a checkpoint, :meth:`release_model`
    drops the dense model before compressed models are built from the
    checkpoint and the store, so the two are never both in memory; a method
    that asks for the dense model later gets it read back.
    """

    def __init__(self, config: RunConfig, registry: Registry, loaded: LoadedModel | None = None):
        self.config = config
        self.registry = registry
        self.create = registry.method_factory(config.method_options)
        self.settings = eval_settings(config)
        self.dtype = getattr(torch, config.dtype)
        self.timings: dict[str, float] = {}
        self._loaded = loaded
        self._windows: torch.Tensor | None = None
        self._stats: dict[str, Mapping] = {}
        self._groups: dict[str, str] = {}
        self.failed_decompositions: dict[str, Exception] = {}  # factor store key -> why its decomposition failed
        self.decomposing_seconds = 0.0  # wall time inside the block passes' decompositions
        self.shared = SharedMeasurements()  # per-architecture cells (throughput), measured together at the end

    def flush_shared(self) -> None:
        """Measure the per-architecture cells held so far (one model per distinct architecture, interleaved)."""
        self.shared.flush(self.loaded.tokenizer, self.settings)

    def timed(self, label: str, start: float) -> float:
        self.timings[label] = round(time.perf_counter() - start, 3)
        return self.timings[label]

    # ------------------------------------------------------------------ the dense model
    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            start = time.perf_counter()
            self._loaded = load_model(self.config.model, self.config.device, self.dtype)
            self.timed("load_model", start)
        return self._loaded

    @property
    def model(self) -> torch.nn.Module:
        """The dense model, read back from its checkpoint if it was released."""
        loaded = self.loaded
        if loaded.model is None:
            start = time.perf_counter()
            loaded.model = reload_weights(loaded.checkpoint, self.config.device, self.dtype)
            self.timed("reload_model", start)
        return loaded.model

    def release_model(self) -> None:
        """Drop the dense model from memory when it can be read back from its checkpoint."""
        if self._loaded is not None and self._loaded.checkpoint is not None and self._loaded.model is not None \
                and not self.shared.holds(self._loaded.model):  # held for throughput: dropping it frees nothing
            self._loaded.model = None
            release_free_memory()

    @property
    def targets(self):
        if not hasattr(self, "_targets"):
            self._targets = find_targets(self.model)
        return self._targets

    @property
    def dense_footprint(self) -> dict[str, int]:
        if not hasattr(self, "_footprint"):
            self._footprint = footprint(self.model)
        return self._footprint

    def weight(self, target) -> torch.Tensor:
        """One dense matrix, from the model in memory or else from the checkpoint."""
        loaded = self.loaded
        if loaded.model is not None or loaded.checkpoint is None:
            return self.model.get_submodule(target.name).weight.detach()
        return self.checkpoint().read([f"{target.name}.weight"], self.dtype)[f"{target.name}.weight"]

    def checkpoint(self) -> Checkpoint:
        if not hasattr(self, "_checkpoint"):
            self._checkpoint = Checkpoint(self.loaded.checkpoint)
        return self._checkpoint

    def windows(self) -> torch.Tensor:
        if self._windows is None:
            self._windows = calibration_batches(self.loaded.tokenizer, self.config.calibration)
        return self._windows

    # ------------------------------------------------------------------ statistics and decompositions
    def collect(self, names: list[str], on_block=None) -> None:
        """Statistics ``names`` from the store, computed where missing; ``on_block`` sees each block."""
        computed: list[str] = []
        start, decomposing_before = time.perf_counter(), self.decomposing_seconds
        collected = collect_statistics(self.model, self.loaded.identity, self.targets, self.windows(),
                                       self.config.calibration, [self.registry.get("statistic", n) for n in names],
                                       device=self.config.device, on_block=on_block, computed=computed)
        seconds = time.perf_counter() - start - (self.decomposing_seconds - decomposing_before)
        if computed:
            self.timings[f"statistics:{','.join(computed)}"] = round(seconds, 3)
        self._groups.update(collected.input_group)
        self._stats.update(collected.values)

    def statistics(self, needed: tuple[str, ...], collect_with: tuple[str, ...] = ()) -> CalibrationStats | None:
        """The statistics ``needed``; when any is not at hand, every one of ``collect_with`` comes along."""
        missing = [name for name in needed if name not in self._stats]
        stored = stored_statistics(self.loaded.identity, self.targets, self.config.calibration,
                                   [self.registry.get("statistic", name) for name in missing]) if missing else None
        if stored is not None:  # all on disk already: the dense model is not needed
            self._groups.update(stored.input_group)
            self._stats.update(stored.values)
        elif missing:
            self.collect(list(dict.fromkeys([*missing, *(n for n in collect_with if n not in self._stats)])))
        if not needed:
            return None
        return CalibrationStats({name: self._stats[name] for name in needed}, self._groups)

    def factorizations(self, method: Method, collect_with: tuple[str, ...] = ()) -> dict[str, Factorization]:
        """Every target's factorization, from the factor store (made first when missing)."""
        return decomposition.factorizations(self, method, collect_with)

    # ------------------------------------------------------------------ compressing
    def context(self, method: Method, collect_with: tuple[str, ...] = ()) -> Context:
        """What ``method`` may read: the original model (read back on use), its statistics and calibration windows."""
        return Context(model=lambda: self.model, tokenizer=self.loaded.tokenizer, targets=self.targets,
                       stats=self.statistics(method.required_statistics(), collect_with),
                       calibration=self.windows() if method.uses_calibration() else None,
                       device=self.config.device, cache_dir=cache_root(), model_identity=self.loaded.identity,
                       weights=self.weight, blocks=stream_blocks)

    def assembler(self, factorizations: Mapping[str, Factorization]):
        """How compressed models are put together: from the checkpoint when there is one, else from a copy."""
        if self.loaded.checkpoint is None:
            return None
        return lambda ranks: assemble_from_checkpoint(self.checkpoint(), self.dtype, self.config.device, self.targets,
                                                      factorizations, ranks)

    def compress(self, name: str, ratio: float) -> tuple[Method, Compressed]:
        """One method at one ratio, refined, not evaluated (``svdbench compress``)."""
        method = self.create(name)
        factorizations = self.factorizations(method)
        self.dense_footprint  # noqa: B018 (measured before the dense model is released)
        self.release_model()
        context = self.context(method)
        start = time.perf_counter()
        compressed = build_compressed(method, ratio, factorizations, context, self.dense_footprint,
                                      assemble=self.assembler(factorizations))
        self.timed(f"compress:{name}:{ratio}", start)
        return method, compressed


