"""The method contract: what a compression plugin implements.

A method goes through up to four stages (one that works on whole modules or
only quantizes, like MoDeGPT or HQQ, has no ``decompose`` and does it in ``refine``):

1. ``requires`` - the calibration statistics it needs, by name (a method
   whose needs depend on its config overrides ``required_statistics``). The
   harness collects each once per (model, calibration settings) and shares it.
2. ``decompose`` - a ratio-independent :class:`~bench.api.lowrank.Factorization`
   of one matrix (``groups`` / ``decompose_group``: of a group of matrices
   sharing one right factor, :mod:`bench.api.grouped`). A ratio sweep calls it once per matrix and truncates the
   same factorization at every ratio; methods whose ``decomposition_key`` is
   equal (``svd`` and ``svdllm_u``, ``svdllm_w`` and ``svdllm``) share one
   decomposition within a run.
3. ``allocate`` - the rank of every matrix for a target ratio, as an
   :class:`~bench.api.allocation.Allocation` (None: keep it dense). The default
   gives every matrix the uniform rank of METHODS.md; methods with
   heterogeneous ratios (ASVD, SVD-LLM V2, DipSVD) override it, on the
   shared budget solver and cost model of :mod:`bench.api.allocation`.
4. ``refine`` - optional post-truncation work on the compressed model, in
   place (a LoRA update, quantization of the factors); ``Context.block_pass``
   streams the calibration windows through the compressed model block by
   block (AdaSVD's alternating least squares on its inputs).

A method's settings are a small frozen dataclass (``config_class``) built
from ``--method-option`` values by its type hints; it is recorded in
results.json and is part of every resume key. The object registered by a
plugin is a prototype: every run works on its own copy, made by
:meth:`Method.configured` with the run's config, so nothing a stage computes
leaks into another run. Stages report what they found by returning it -
``Factorization.facts``, ``Allocation.facts``, ``refine``'s dictionary - and
the harness records it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bench.api.allocation import Allocation, uniform_ranks
from bench.api.configs import build_config, config_dict
from bench.api.lowrank import Factorization
from bench.api.statistic import CalibrationStats
from bench.api.versions import code_version, source_version
from bench.model.targets import Target


@dataclass(frozen=True)
class NoConfig:
    """Config of a method without settings."""


class Context:
    """What a method may read while compressing one model.

    ``model`` is the original model: read it, never modify it. (The harness
    may hand it over lazily - a function that loads it - when the model is not
    kept in memory; it is loaded on first use.) ``weight(target)`` reads one
    matrix without needing the whole model. ``stats`` has every statistic the
    method listed in ``requires``; ``calibration`` holds the calibration token
    windows (``samples x seqlen``) for methods that evaluate or train on them;
    ``cache_dir`` is where a method may keep its own verified caches.
    ``block_pass(model)`` streams the calibration windows through any model
    (a refiner's: the compressed one) one decoder block at a time.
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], tokenizer: Any, targets: list[Target],
                 stats: CalibrationStats | None, calibration: torch.Tensor | None, device: str, cache_dir: Path,
                 model_identity: str, weights: Callable[[Target], torch.Tensor] | None = None,
                 blocks: Callable[[nn.Module, torch.Tensor, str], Iterator] | None = None):
        self._model, self._weights, self._blocks = model, weights, blocks
        self.tokenizer, self.targets, self.stats, self.calibration = tokenizer, targets, stats, calibration
        self.device, self.cache_dir, self.model_identity = device, cache_dir, model_identity

    def block_pass(self, model: nn.Module) -> Iterator:
        """The calibration windows streamed through ``model``'s decoder blocks, one step per block, in order.

        Each step has ``index``, ``name`` (the block's module path), ``block``
        (on the device) and ``run()``, which feeds the block every window's
        input as it stands - inputs that went through the earlier blocks as
        the caller left them - so hooks on its modules see them. When the
        caller moves to the next step, the block's outputs (as the caller left
        it) become the next block's inputs. Needs the calibration windows
        (``needs_calibration_data`` or a statistic in ``requires``).
        """
        if self._blocks is None or self.calibration is None:
            raise RuntimeError("this context has no calibration pass: the method needs calibration data "
                               "(set needs_calibration_data or require a statistic)")
        return self._blocks(model, self.calibration, self.device)

    @property
    def model(self) -> nn.Module:
        return self._model if isinstance(self._model, nn.Module) else self._model()

    def weight(self, target: Target) -> torch.Tensor:
        if self._weights is not None:
            return self._weights(target)
        return self.model.get_submodule(target.name).weight.detach()


@dataclass(frozen=True)
class PaperNotes:
    """Where a method comes from and how svdbench's version differs (the report's method notes).

    ``paper``: citation; ``paper_defaults``: the settings the paper used;
    ``deviations``: every way svdbench's implementation or defaults differ,
    each with its reason.
    """

    paper: str
    paper_defaults: str = ""
    deviations: tuple[str, ...] = ()


class Method:
    """Base class of compression methods. Subclasses set ``name`` and implement ``decompose``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type] = NoConfig
    requires: ClassVar[tuple[str, ...]] = ()
    needs_calibration_data: ClassVar[bool] = False  # calibration windows without statistics
    # False: the method removes no parameters (plain quantization): it is evaluated once per run, at ratio 0
    uses_ratio: ClassVar[bool] = True
    # What ``ratio`` is a fraction of: "weights" (parameters, --ratios) or "kv_cache" (KV-cache bytes removed,
    # --kv-ratios; the method changes the attention's cache, e.g. Palu's latents).
    compresses: ClassVar[str] = "weights"
    # How the method is built, for the ablation table (SVD-LLM Table 4), e.g.
    # {"transform": "whitening", "update": "yes"}; empty: not part of it.
    components: ClassVar[dict[str, str]] = {}
    notes: ClassVar[PaperNotes | None] = None
    # The host may run ``decompose`` on several targets at once in worker threads (on the CPU): it must read
    # only its arguments and change nothing shared. A method that cannot promise this sets False.
    concurrent_decompose: ClassVar[bool] = True
    # Part of every factor-store and resume key; None: derived from the plugin's source (bench.api.versions).
    version: ClassVar[str | None] = None
    # Optional packages the method imports, each with the command that installs it: ``--methods all`` leaves
    # the method out while one is missing (and says so), naming the method explicitly is then an error.
    packages: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.config_class()

    def missing_packages(self) -> dict[str, str]:
        """The optional packages of ``packages`` that are not installed, with their install commands."""
        import importlib.util

        return {name: command for name, command in self.packages.items() if importlib.util.find_spec(name) is None}

    # ------------------------------------------------------------------ per run
    def make_config(self, options: Mapping[str, Any] | None = None) -> Any:
        """The config from ``--method-option`` strings or profile values; unknown keys are an error."""
        return build_config(self.config_class, dict(options or {}), self.name)

    def configured(self, config: Any, create: Callable[[str], Method]) -> Method:
        """A fresh copy of this method for one run, holding ``config``.

        ``create(name)`` makes another registered method configured for the
        same run; a method built on others (SVD + quantization) overrides
        this to make its parts.
        """
        method = copy.deepcopy(self)
        method.config = config
        return method

    def required_statistics(self) -> tuple[str, ...]:
        """The statistics this configured method needs (default: ``requires``)."""
        return tuple(self.requires)

    def decomposition_statistics(self) -> tuple[str, ...]:
        """The statistics ``decompose`` reads (part of the factor-store key; default: all it requires). A method
        whose ``allocate`` or ``refine`` needs more narrows it, so it shares factors with its base method."""
        return self.required_statistics()

    def decomposes(self) -> bool:
        """Whether the method factorizes matrices one by one (it defines ``decompose``); one that does not -
        plain quantization, MoDeGPT's module decompositions - works in ``refine`` on the dense targets."""
        return type(self).decompose is not Method.decompose

    def uses_calibration(self) -> bool:
        """Whether results depend on the calibration data (so resume keys include its settings)."""
        return bool(self.required_statistics()) or self.needs_calibration_data

    def settings(self) -> dict:
        """Everything that determines this configured method's results (part of every resume key).

        Default: its config. A method built on others adds their settings.
        """
        return config_dict(self.config)

    def storage_bits(self) -> int | None:
        """Weight bits of the compressed model when it is quantized (reports group by it); else ``None``."""
        return None

    def describe(self) -> dict:
        """What reports need to know about this configured method (recorded in the run manifest)."""
        info: dict = {"description": self.description, "config": self.settings(),
                      "uses_ratio": self.uses_ratio, "bits": self.storage_bits(), "compresses": self.compresses}
        if self.components:
            info["components"] = dict(self.components)
        if self.notes is not None:
            info["notes"] = dataclasses.asdict(self.notes)
        return info

    # ------------------------------------------------------------------ stages
    def decompose(self, target: Target, weight: torch.Tensor, context: Context, config: Any) -> Factorization:
        """Factorize one matrix (ratio-independent); may run beside other targets' (``concurrent_decompose``)."""
        raise NotImplementedError

    def groups(self, targets: list[Target], config: Any) -> list[list[Target]]:
        """Targets factorized jointly, sharing one right factor (:mod:`bench.api.grouped`); default: none."""
        return []

    def decompose_group(self, targets: list[Target], weights: list[torch.Tensor], context: Context,
                        config: Any) -> dict[str, Factorization]:
        """One factorization per member of a group from ``groups``, all with the same ``s`` and ``vt``."""
        raise NotImplementedError

    def code_version(self) -> str:
        """The version of this method's code (resume keys): ``version``, else derived from its source files."""
        return code_version(self)

    def decomposition_version(self) -> str:
        """The version of the code that computes the factorizations (factor-store keys): ``version``, else
        derived from the source of the class that defines ``decompose``."""
        owner = next(c for c in type(self).__mro__ if "decompose" in vars(c))
        return str(self.version) if self.version is not None else source_version(owner)

    def decomposition_key(self, config: Any) -> str:
        """What ``decompose`` computes: equal keys mean identical factorizations, shared within a run.

        Default: the class that defines ``decompose`` and the whole config. A
        method that reuses another's ``decompose`` with settings it does not
        read (a refine-only variant) returns that method's key.
        """
        owner = next(c for c in type(self).__mro__ if "decompose" in vars(c))
        return f"{owner.__module__}.{owner.__qualname__} {config_dict(config)}"

    def allocate(self, ratio: float, factorizations: Mapping[str, Factorization], context: Context,
                 config: Any) -> Allocation:
        """The rank of every target for ``ratio`` (the fraction of parameters removed); None keeps one dense."""
        return Allocation(uniform_ranks(context.targets, ratio))

    def refine(self, model: nn.Module, ratio: float, context: Context, config: Any) -> dict:
        """Improve the compressed ``model`` in place; return facts for the record."""
        return {}
