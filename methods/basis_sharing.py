"""Basis Sharing (``basis_sharing``, Wang et al., ICLR 2025): one basis shared by consecutive layers.

For each shared matrix type (q, k, v, gate, up by default) the layers are
cut into groups of ``g`` consecutive blocks (``g = 2``). A group's matrices
are stacked, ``W_st = [W_1; ..; W_g]`` (``g m x n``), and whitened with the
Cholesky factor of the *pooled* gram, ``S = chol(sum_i X_i X_i^T)``:
``SVD(W_st S) = U Sigma V^T``. The basis ``B = Sigma_k V_k^T S^-1`` (an
``n -> k`` linear) is used by every layer of the group; layer i keeps its
rows of ``U_k`` as coefficients. With this ``S`` the error is the truncated
spectrum: ``||(W_st - W'_st) S||_F^2 = sum_{i>k} sigma_i^2`` (tested). The
rank is the authors' ``k = floor(g m n (1 - rho) / (n + g m))``
(utils.py:compute_num_basis), ``k (n + g m)`` parameters for the group; o and
down stay private (``g = 1``: SVD-LLM's whitening, with the code's shift).

When the layer count is not a multiple of ``g`` the authors' code gives the
leftover group its rank for ``g`` layers (more parameters than the ratio
allows); here the leftover group gets the rank of its own size, so the
budget holds. At ``rho >= 0.4`` the paper's configs set ``update``: with the
basis fixed, the coefficients are refit by least squares on inputs that flow
through the compressed model, ``C_i = W_i G' B^T (B G' B^T)^-1`` with ``G'``
the pooled gram of the basis' inputs (group.py:update_model) - option
``update`` (``auto``: on at ``rho >= 0.4``, as those configs).

The shared basis is one module in memory, counted once, saved once
(:mod:`bench.api.grouped`, :mod:`bench.engine.grouped`, :mod:`bench.model.shared`).

Fidelity (SmolLM2-135M, calibration 32 x 512 seed 3, WikiText-2 ``--limit 8
--seqlen 2048``; the authors' functions in benchmarks/basis_sharing_reference.py):
perplexity 65.5179 vs 65.5179 at 20% and 305.586 vs 305.587 at 40% with the
update off, 318.867 vs 318.867 at 40% with it on (relative differences
< 1e-6: float64 vs float32 gram sums). On this model and calibration the
update *raises* perplexity (20%: 69.95 vs 65.52 in the authors' code; 40%:
318.9 vs 305.6); ``update=off`` is the better setting here, ``auto`` follows
the authors' configs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from bench import (
    Allocation,
    LowRankLinear,
    Method,
    PaperNotes,
    cholesky_whitening,
    execution_device,
    factorize,
    group_cost,
    hookimpl,
    rank_for_ratio,
    share_factorization,
    shared_key,
)

log = logging.getLogger(__name__)

PAPER = ("Wang, Chen, Brumm, Zhang, Li: Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model "
         "Compression, ICLR 2025 (code: github.com/TUDa-HWAI/Basis_Sharing)")
SHIFT = 7e-6  # the authors' Cholesky shift (calib.py:get_s_inv_s); SVD-LLM's is 1e-6


@dataclass(frozen=True)
class BasisSharingConfig:
    group_size: int = 2  # consecutive layers sharing one basis (1: every matrix private = svdllm_w)
    shared: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # matrix types shared
    update: Literal["auto", "on", "off"] = "auto"  # coefficient refit; auto: on at ratio >= 0.4


def _kind(target) -> str:
    return target.kind.rpartition(".")[2]


class BasisSharing(Method):
    name = "basis_sharing"
    description = "Basis Sharing: one whitened SVD basis per group of consecutive layers, per-layer coefficients"
    config_class = BasisSharingConfig
    requires = ("gram",)
    components = {"transform": "whitening", "update": "coefficients (rho >= 0.4)"}
    notes = PaperNotes(
        paper=PAPER,
        paper_defaults="g = 2 for q, k, v, gate, up (o, down private); S = chol of the pooled X X^T (shift "
                       "-lambda_min + 7e-6 when not positive definite) from 256 x 2048 tokens of WikiText-2 train "
                       "(seed 2023); k = floor(g m n (1 - rho) / (n + g m)); coefficient update at rho >= 0.4",
        deviations=(
            "calibration from svdbench's windows (WikiText-2 validation, 32 x 512, seed 3 by default; train is "
            "not vendored) instead of 256 x 2048 of train with seed 2023",
            "grams accumulated in float64 (the code sums X^T X in float32)",
            "a leftover group (layer count not a multiple of g) gets the rank of its own size; the code reuses "
            "g's rank there and overshoots the budget",
            "Sigma split as Sigma^1/2 on both factors (the code puts all of it on the basis): the product C_i B, "
            "the truncation and the update's fit are the same",
            "the update is an option (default on at rho >= 0.4 as the configs); the code's test.py never calls it, "
            "so the authors' published perplexities at 40% may come without it",
        ),
    )

    # ------------------------------------------------------------------ decomposition
    def groups(self, targets, config: BasisSharingConfig):
        g = int(config.group_size)
        if g < 1:
            raise ValueError(f"basis_sharing.group_size must be at least 1, got {g}")
        by_kind: dict[str, list] = {}
        for target in targets:
            if _kind(target) in config.shared:
                by_kind.setdefault(target.kind, []).append(target)
        out = []
        for members in by_kind.values():
            members = sorted(members, key=lambda t: t.block)
            out += [chunk for i in range(0, len(members), g) if len(chunk := members[i:i + g]) > 1]
        return out

    def decompose(self, target, weight, context, config):
        """A private matrix: SVD-LLM's whitening with the authors' shift."""
        transform, shift = cholesky_whitening(context.stats.get("gram", target.name), SHIFT)
        factorization = factorize(weight, transform)
        if shift:
            factorization.facts["cholesky_shift"] = shift
        return factorization

    def decompose_group(self, targets, weights, context, config):
        pooled = sum(context.stats.get("gram", t.name).to(torch.float64) for t in targets)
        transform, shift = cholesky_whitening(pooled, SHIFT)
        del pooled
        found = share_factorization(targets, weights, transform)
        if shift:
            log.warning("%s: pooled X X^T of %s is not positive definite; shifted by %.3g", self.name,
                        targets[0].name, shift)
            for factorization in found.values():
                factorization.facts["cholesky_shift"] = shift
        return found

    def decomposition_key(self, config):
        """``update`` only refines: runs with it on and off share one decomposition."""
        return f"{__name__}.BasisSharing group_size={config.group_size} shared={list(config.shared)}"

    # ------------------------------------------------------------------ ranks
    def allocate(self, ratio, factorizations, context, config):
        groups: dict[str, list] = {}
        ranks = {}
        for target in context.targets:
            key = shared_key(factorizations[target.name]) if target.name in factorizations else None
            if key is None:
                ranks[target.name] = rank_for_ratio(target.out_features, target.in_features, ratio)
            else:
                groups.setdefault(key, []).append(target)
        for members in groups.values():
            rank = group_cost(members).uniform_rank(ratio)
            ranks.update({t.name: rank for t in members})
        return Allocation(ranks, {"shared_groups": len(groups)})

    # ------------------------------------------------------------------ the coefficient update
    def updates(self, ratio: float, config: BasisSharingConfig) -> bool:
        return config.update == "on" or (config.update == "auto" and ratio >= 0.4 - 1e-9)

    def refine(self, model, ratio, context, config):
        if not self.updates(ratio, config):
            return {}
        layers = {t.name: model.get_submodule(t.name) for t in context.targets}
        layers = {name: m for name, m in layers.items() if isinstance(m, LowRankLinear)}
        grams, tokens = basis_input_grams(model, {id(m.down): m.down for m in layers.values()}, context.calibration)
        targets = {t.name: t for t in context.targets}
        for name, layer in layers.items():
            basis = layer.down.weight.detach().to(torch.float64)
            gram = grams[id(layer.down)]
            weight = context.weight(targets[name]).to(device=basis.device, dtype=torch.float64)
            coefficients = refit(weight, basis, gram)
            with torch.no_grad():
                layer.up.weight.copy_(coefficients.to(layer.up.weight.dtype))
        return {"update": "coefficients refit on compressed-model inputs", "update_tokens": tokens,
                "updated_matrices": len(layers)}


def refit(weight: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``C = W G B^T (B G B^T)^-1`` (float64): the coefficients that best map the basis' outputs to ``W x``."""
    gram = gram.to(basis)
    left = basis @ gram @ basis.T  # k x k
    right = basis @ gram @ weight.T  # k x m
    try:
        return torch.linalg.solve(left, right).T
    except torch.linalg.LinAlgError:  # singular (dead basis directions): least squares instead
        return torch.linalg.lstsq(left, right).solution.T


@torch.no_grad()
def basis_input_grams(model, modules: dict, windows: torch.Tensor) -> tuple[dict, int]:
    """``X X^T`` (float64) of every module's input over the calibration windows, run through ``model`` one window
    at a time; a module used by several layers sees all their inputs (the pooled gram of a shared basis)."""
    grams = {key: None for key in modules}

    def hook(key):
        def observe(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            grams[key] = x.T @ x if grams[key] is None else grams[key].addmm_(x.T, x)
        return observe

    handles = [module.register_forward_hook(hook(key)) for key, module in modules.items()]
    device = execution_device(model)
    try:
        for window in windows:
            model(input_ids=window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return grams, int(windows.numel())


@hookimpl
def register_methods(register):
    register(BasisSharing())
