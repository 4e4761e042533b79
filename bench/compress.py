"""Building a compressed model from factorizations and ranks."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bench.lowrank import Factorization, LowRankLinear, is_worth_factorizing
from bench.models import Target, footprint, set_module


def compress_model(model: nn.Module, targets: list[Target], factorizations: dict[str, Factorization],
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


def check_finite_factors(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"non-finite values in {name} of the compressed model")
