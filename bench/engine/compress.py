"""Building a compressed model: allocate ranks, truncate the factorizations, refine.

:func:`build_compressed` is the one compression path: ``svdbench run`` (every
ratio and budget of a sweep) and ``svdbench compress`` (one model to save)
both go through it. The model itself is put together by an *assembler*:
:func:`compress_model` copies a model held in memory; :func:`assemble_from_checkpoint`
builds it from the checkpoint on disk, so the dense model need not be in
memory beside the compressed one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.api.lowrank import Factorization, is_worth_factorizing
from bench.api.method import Allocation, Context, Method
from bench.engine.grouped import shared_groups, shared_plan, tie_shared
from bench.errors import UsageError
from bench.model.checkpoint import Checkpoint, build_from_checkpoint
from bench.model.latent_attention import kv_summary
from bench.model.layers import LowRankLinear
from bench.model.loading import place_model
from bench.model.targets import Target, footprint, set_module

Assembler = Callable[[dict[str, int]], tuple[nn.Module, dict[str, dict]]]


def layer_plan(targets: list[Target], ranks: dict[str, int | None],
               factorizations: Mapping[str, Factorization] | None = None) -> dict[str, dict]:
    """Per-matrix accounting for ``ranks`` (None: keep dense): the rank kept (None: left dense, also where
    factors would not save parameters), dense and stored parameters
    (a group sharing a right factor: :func:`bench.engine.grouped.shared_plan`)."""
    layers: dict[str, dict] = {}
    shared = {name: layer for group in shared_groups(targets, factorizations).values()
              for name, layer in shared_plan(group, ranks).items()}
    for target in targets:
        if target.name in shared:
            layers[target.name] = shared[target.name]
            continue
        m, n = target.out_features, target.in_features
        rank = ranks[target.name]
        rank = None if rank is None else max(1, min(int(rank), min(m, n)))
        if rank is not None and is_worth_factorizing(m, n, rank):
            layers[target.name] = {"rank": rank, "dense_params": target.params,
                                   "params": rank * (m + n) + (m if target.bias else 0)}
        else:
            layers[target.name] = {"rank": None, "dense_params": target.params, "params": target.params}
    return layers


def _low_rank(factorization: Factorization, rank: int, dtype: torch.dtype, device, bias) -> LowRankLinear:
    w_u, w_v = factorization.factors(rank, dtype=dtype)
    return LowRankLinear.from_factors(w_u.to(device), w_v.to(device), bias)


def compress_model(model: nn.Module, targets: list[Target], factorizations: Mapping[str, Factorization],
                   ranks: dict[str, int]) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of ``model`` with each target replaced by its rank-``r`` factors.

    A target whose factors would not save parameters stays dense. Returns the
    model and per-matrix accounting (rank, dense and stored parameters).
    """
    compressed = copy.deepcopy(model)
    layers = layer_plan(targets, ranks, factorizations)
    for name, layer in layers.items():
        if layer["rank"] is None:
            continue
        original = compressed.get_submodule(name)
        bias = original.bias.detach() if original.bias is not None else None
        set_module(compressed, name, _low_rank(factorizations[name], layer["rank"], original.weight.dtype,
                                               original.weight.device, bias))
    tie_shared(layers, compressed.get_submodule)
    return compressed, layers


def assemble_from_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype, device, targets: list[Target],
                             factorizations: Mapping[str, Factorization],
                             ranks: dict[str, int]) -> tuple[nn.Module, dict[str, dict]]:
    """The compressed model built from the checkpoint's other weights and the factors; the dense model is not read."""
    layers = layer_plan(targets, ranks, factorizations)
    factorized = {name: layer for name, layer in layers.items() if layer["rank"] is not None}
    biases = checkpoint.read([f"{name}.bias" for name in factorized if f"{name}.bias" in checkpoint.file_of], dtype)
    replacements = {name: _low_rank(factorizations[name], layer["rank"], dtype, "cpu", biases.get(f"{name}.bias"))
                    for name, layer in factorized.items()}
    tie_shared(layers, replacements.__getitem__)
    return place_model(build_from_checkpoint(checkpoint, dtype, replacements), device), layers


def predicted_bytes(layers: dict[str, dict], dense_footprint: dict[str, int], element_size: int) -> int:
    """The whole model's bytes once ``layers`` are applied, without building it (plain factors, no refine)."""
    change = sum(layer["params"] - layer["dense_params"] for layer in layers.values())
    return dense_footprint["bytes"] + change * element_size


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


def resized_layers(model: nn.Module, layers: dict[str, dict]) -> dict[str, dict]:
    """``layers`` with the parameters of every dense target a refine replaced by a smaller layer (MoDeGPT's structured
    layers) as they now are, so the accounting counts what the model holds."""
    out = {}
    for name, layer in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        params = sum(p.numel() for p in module.parameters()) if isinstance(module, nn.Linear) else None
        if layer["rank"] is None and params is not None and params != layer["dense_params"]:
            layer = {**layer, "params": params, "shape": [module.out_features, module.in_features]}
        out[name] = layer
    return out


def allocation_of(method: Method, ratio: float, factorizations: Mapping[str, Factorization],
                  context: Context) -> Allocation:
    """The method's :class:`Allocation` at ``ratio``, checked: a rank (or None) for every target."""
    result = method.allocate(ratio, factorizations, context, method.config)
    if not isinstance(result, Allocation):
        raise UsageError(f"method '{method.name}': allocate returned {type(result).__name__}; return "
                         "bench.Allocation(ranks={target: rank or None to keep it dense})")
    missing = [t.name for t in context.targets if t.name not in result.ranks]
    if missing:
        raise UsageError(f"method '{method.name}': allocate gave no rank for {missing[0]} "
                         f"({len(missing)} targets); give every target a rank, or None to keep it dense")
    return result


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
                     dense_footprint: dict[str, int], refine: bool = True,
                     assemble: Assembler | None = None) -> Compressed:
    """``method`` at ``ratio``: allocate, truncate, and (unless ``refine`` is False) refine.

    ``assemble(ranks)`` puts the model together (default: a copy of ``context.model``).
    """
    allocation = allocation_of(method, ratio, factorizations, context)
    assemble = assemble or (lambda ranks: compress_model(context.model, context.targets, factorizations, ranks))
    model, layers = assemble(allocation.ranks)
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
        layers = resized_layers(model, layers)
    summary = accounting(model, layers, dense_footprint)
    summary.update(kv_summary(model, ratio if method.compresses == "kv_cache" else None))
    return Compressed(model, ratio, layers, summary, facts)
