"""The method contract: what a compression plugin implements.

A method goes through up to four stages; only ``decompose`` is required:

1. ``requires`` - the calibration statistics it needs, by name. The harness
   collects each once per (model, calibration settings) and shares it.
2. ``decompose`` - a ratio-independent :class:`~bench.lowrank.Factorization`
   of one matrix. A ratio sweep calls it once per matrix and truncates the
   same factorization at every ratio; methods whose ``decomposition_key`` is
   equal (``svd`` and ``svdllm_u``, ``svdllm_w`` and ``svdllm``) share one
   decomposition within a run.
3. ``allocate`` - the rank of every matrix for a target ratio. The default
   gives every matrix the uniform rank of METHODS.md; methods with
   heterogeneous ratios (ASVD, SVD-LLM V2, DipSVD) override it.
4. ``refine`` - optional post-truncation work on the compressed model, in
   place (a LoRA update, quantization of the factors).

A method's settings are a small frozen dataclass (``config_class``) that is
recorded in results.json and is part of every resume key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bench.calibration import CalibrationStats
from bench.errors import UsageError
from bench.lowrank import Factorization, rank_for_ratio
from bench.models import Target


@dataclass(frozen=True)
class NoConfig:
    """Config of a method without settings."""


@dataclass
class Context:
    """What a method may read while compressing one model.

    ``model`` is the original model: read it, never modify it. ``stats`` has
    every statistic the method listed in ``requires``; ``calibration`` holds
    the calibration token windows (``samples x seqlen``) for methods that
    evaluate or train on them.
    """

    model: nn.Module
    tokenizer: Any
    targets: list[Target]
    stats: CalibrationStats | None
    calibration: torch.Tensor | None
    device: str
    cache_dir: Path
    model_identity: str
    options: dict = field(default_factory=dict)

    def weight(self, target: Target) -> torch.Tensor:
        return self.model.get_submodule(target.name).weight.detach()


def uniform_ranks(targets: list[Target], ratio: float) -> dict[str, int]:
    """The rank formula of METHODS.md applied to every matrix alike."""
    return {t.name: rank_for_ratio(t.out_features, t.in_features, ratio) for t in targets}


class Method:
    """Base class of compression methods. Subclasses set ``name`` and implement ``decompose``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type] = NoConfig
    requires: ClassVar[tuple[str, ...]] = ()
    needs_calibration_data: ClassVar[bool] = False  # calibration windows without statistics
    uses_ratio: ClassVar[bool] = True  # False: the method removes no parameters (e.g. plain quantization)

    def make_config(self, **options) -> Any:
        """Build the config from ``--method-option`` values, rejecting unknown keys."""
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UsageError(f"method '{self.name}' has no option '{unknown[0]}'; "
                             f"its options are: {', '.join(fields) or 'none'}")
        converted = {}
        for key, raw in options.items():
            default = fields[key].default
            kind = type(default) if default is not dataclasses.MISSING and default is not None else str
            try:
                converted[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool and isinstance(raw, str) else kind(raw)
            except (TypeError, ValueError):
                raise UsageError(f"method option {self.name}.{key}={raw!r} is not a valid {kind.__name__}") from None
        return self.config_class(**converted)

    def decompose(self, target: Target, weight: torch.Tensor, context: Context, config: Any) -> Factorization:
        """Factorize one matrix (ratio-independent)."""
        raise NotImplementedError

    def decomposition_key(self, config: Any) -> str:
        """What ``decompose`` computes: equal keys mean identical factorizations, shared within a run.

        Default: the class that defines ``decompose`` and the whole config. A
        method that reuses another's ``decompose`` with settings it does not
        read (a refine-only variant) returns that method's key.
        """
        owner = next(c for c in type(self).__mro__ if "decompose" in vars(c))
        fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
        return f"{owner.__module__}.{owner.__qualname__} {fields}"

    def allocate(self, ratio: float, factorizations: dict[str, Factorization], context: Context,
                 config: Any) -> dict[str, int]:
        """Rank per target for ``ratio`` (the fraction of parameters removed)."""
        return uniform_ranks(context.targets, ratio)

    def refine(self, model: nn.Module, ratio: float, context: Context, config: Any) -> dict:
        """Improve the compressed ``model`` in place; return facts for the record."""
        return {}
