"""Building a compressed model: allocate ranks, truncate the factorizations, refine.

:func:`build_compressed` is the one compression path: ``svdbench run`` (every
ratio and budget of a sweep) and ``svdbench compress`` (one model to save)
both go through it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from bench.api.lowrank import Factorization, is_worth_factorizing
from bench.api.method import Allocation, Context, Method
from bench.model.layers import LowRankLinear
from bench.model.targets import Target, footprint, set_module


def compress_model(model: nn.Module, targets: list[Target], factorizations: Mapping[str, Factorization],
                   ranks: dict[str, int]) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of ``model`` with each target replaced by its rank-``r`` factors.

    A target whose factors would not save parameters stays dense. Returns the
    model and per-matrix accounting (rank, dense and stored parameters).
    """
    compressed = copy.deepcopy(model)
    layers: dict[str, dict] = {}
    for target in targets:
        m, n = target.out_features, target.in_features
        rank = max(1, min(int(ranks[target.name]), min(m, n)))
        dense = target.params
        if not is_worth_factorizing(m, n, rank):
            layers[target.name] = {"rank": None, "dense_params": dense, "params": dense}
            continue
        original = compressed.get_submodule(target.name)
        dtype = original.weight.dtype
        w_u, w_v = factorizations[target.name].factors(rank, dtype=dtype)
        bias = original.bias.detach() if original.bias is not None else None
        layer = LowRankLinear.from_factors(w_u.to(original.weight.device), w_v.to(original.weight.device), bias)
        set_module(compressed, target.name, layer)
        layers[target.name] = {"rank": rank, "dense_params": dense, "params": rank * (m + n) + (m if bias is not None else 0)}
    return compressed, layers


def accounting(model: nn.Module, layers: dict[str, dict] | None, dense_footprint: dict[str, int]) -> dict:
    """Whole-model parameters/bytes plus the compressed share, for a record."""
    now = footprint(model)
    summary = {"params": now["params"], "bytes": now["bytes"],
               "dense_params": dense_footprint["params"], "dense_bytes": dense_footprint["bytes"],
               "params_removed": 1 - now["params"] / dense_footprint["params"]}
    if layers:
        dense = sum(v["dense_params"] for v in layers.values())
        kept = sum(v["params"] for v in layers.values())
        summary["target_params_dense"] = dense
        summary["target_params"] = kept
        summary["target_ratio_achieved"] = 1 - kept / dense
    return summary


def allocation_of(method: Method, ratio: float, factorizations: Mapping[str, Factorization],
                  context: Context) -> Allocation:
    """The method's ranks at ``ratio`` as an :class:`Allocation` (a plain dictionary of ranks is accepted)."""
    result = method.allocate(ratio, factorizations, context, method.config)
    return result if isinstance(result, Allocation) else Allocation(ranks=dict(result))


def decomposition_facts(factorizations: Mapping[str, Factorization]) -> dict[str, dict]:
    """What ``decompose`` reported, by fact and target (``{"cholesky_shift": {target: 1e-3}}``)."""
    facts: dict[str, dict] = {}
    for name, factorization in factorizations.items():
        for fact, value in factorization.facts.items():
            facts.setdefault(fact, {})[name] = value
    return facts


@dataclass
class Compressed:
    """A compressed model and everything known about how it was made."""

    model: nn.Module
    ratio: float
    layers: dict[str, dict]
    summary: dict  # whole-model accounting (see :func:`accounting`)
    facts: dict = field(default_factory=dict)  # allocation / decomposition / refine facts

    def info(self, method: Method) -> dict:
        """The compression as results.json records it."""
        return {"method": method.name, "ratio": self.ratio, "config": method.settings(),
                "summary": self.summary, "facts": self.facts, "layers": self.layers}


def build_compressed(method: Method, ratio: float, factorizations: Mapping[str, Factorization], context: Context,
                     dense_footprint: dict[str, int], refine: bool = True) -> Compressed:
    """``method`` at ``ratio``: allocate, truncate, and (unless ``refine`` is False) refine."""
    allocation = allocation_of(method, ratio, factorizations, context)
    model, layers = compress_model(context.model, context.targets, factorizations, allocation.ranks)
    facts: dict = {}
    if allocation.facts:
        facts["allocation"] = allocation.facts
    found = decomposition_facts(factorizations)
    if found:
        facts["decomposition"] = found
    if refine:
        refined = method.refine(model, ratio, context, method.config)
        if refined:
            facts["refine"] = refined
    return Compressed(model, ratio, layers, accounting(model, layers, dense_footprint), facts)
