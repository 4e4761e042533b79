"""Palu (``palu``, Chang et al., ICLR 2025): low-rank K/V projections whose latents are the KV cache.

Only ``k_proj`` and ``v_proj`` change; ``ratio`` is the fraction of
**KV-cache bytes** removed (``--kv-ratios``), not of parameters.

**Decomposition** (decomposition.py, svd_linear.py:_per_head_whiten_decomposition_from_weight).
The ``n_kv`` key/value heads are cut into ``G = n_kv / g`` groups of ``g``
heads (``group_size``: 1 is Palu's M-LRD, ``n_kv`` its J-LRD). Group ``i``'s
``g d_h`` rows ``W_i`` get SVD-LLM's factor form with the layer-input gram
``G_x = X X^T``: ``S = chol(G_x)`` (shift ``-lambda_min + 1e-3`` when not
positive definite, as the code), ``SVD(W_i S) = U Sig V^T``,
``B_i = U_r Sig_r^1/2`` (``g d_h x r``), ``A_i = Sig_r^1/2 V_r^T S^-1``
(``r x n``). The whitened loss is ``sum_i ||(W_i - B_i A_i) S||^2 = `` the
truncated spectra, so at equal total rank one group (J-LRD) <= groups <=
per-head (M-LRD) (tested).

**Ranks** (rank_search.py, ``fisher_uniform``). The ``palu_fisher`` statistic
is ``F = sqrt(mean over windows of (dL/dW)^2)`` per weight; ``f`` = mean of F
over the module. K and V of every layer share the kept latent total
``R = (1 - ratio) 2 L n_kv d_h``; module ``m`` gets ``R f_m / sum f`` floored
(cap ``n_kv d_h``), the leftovers +1 in ascending order of the fractional
part (as coded), split evenly over the ``G`` groups. Here the unit of
allocation is ``G x block`` latent numbers, so ``R`` is met exactly whenever
it is a multiple of it (SmolLM2-135M: ``G = 3``, block 1 - 30% and 50% exact);
the code rounds each group's rank to a multiple of 32 afterwards and misses
the budget. ``allocation = uniform`` gives every module ``R / 2L``.

**The cache**: :class:`bench.LatentKVAttention` caches ``h = A x`` (``G``
latents of width ``r`` per token and layer) in the model's transformers
cache, rebuilds keys ``B_k h_k`` and then applies RoPE, and folds ``B_v``
into ``o_proj`` per head (``hidden x r_v`` per head: ``o_proj`` grows when
``r_v > d_h``, so parameters can rise; records report KV bytes and
parameters apart).

Measured (SmolLM2-135M, calibration 32 x 512 seed 3, WikiText-2 ``--limit 8
--seqlen 2048``, group_size 1, block 1; ``svdbench run --model smollm2-135m
--methods palu --kv-ratios 0.3,0.5 --tasks wikitext2,throughput --limit 8
--seqlen 2048 --out runs/kv``): perplexity dense 19.13, palu at 30% KV removed
26.64, at 50% removed 38.45; both budgets met exactly (the kept totals, 8064
and 5760 latent numbers per token, are multiples of G = 3). The latent cache
decodes the same greedy tokens as rebuilding K/V at once (tests/test_palu.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from bench import (
    Allocation,
    Factorization,
    LatentKVAttention,
    Method,
    PaperNotes,
    Statistic,
    UsageError,
    attach_rotary,
    cholesky_whitening,
    factorize,
    hookimpl,
)

PAPER = ("Chang, Lin, Lin, Chen, Huang, Wu, Wang, Wu, Abdelfattah, Chiang: Palu: KV-Cache Compression with "
         "Low-Rank Projection, ICLR 2025 (code: github.com/shadowpa0327/Palu)")
SHIFT = 1e-3  # decomposition.py: -lambda_min + 1e-3 when X X^T is not positive definite
KV_KINDS = ("k_proj", "v_proj")


def _is_kv(name: str) -> bool:
    return name.rpartition(".")[2] in KV_KINDS


class PaluFisher(Statistic):
    """``sqrt(mean over windows of g^2)`` per weight of k_proj/v_proj (rank_search.py:calib_fisher_info), reduced to
    its mean over each output row (one value per row; a module's or group's mean is the mean of its rows')."""

    name = "palu_fisher"
    description = "Palu's Fisher: sqrt(mean squared LM-loss gradient) per k/v_proj weight, mean per output row"
    needs_backward = True

    def observe(self, key, tensor):
        if _is_kv(key):
            self.add(key, tensor.double().pow(2), 1)

    def result(self):
        return {k: (v / self.counts[k]).sqrt().mean(dim=1) for k, v in self.sums.items()}


@dataclass(frozen=True)
class PaluConfig:
    group_size: int = 1  # heads per low-rank group (1: M-LRD; n_kv: J-LRD); must divide n_kv
    block: int = 1  # each group's rank is a multiple of this (the code: 32)
    allocation: Literal["fisher", "uniform"] = "fisher"


def grouped_factors(weight: torch.Tensor, gram: torch.Tensor, rows: int) -> tuple[list[Factorization], float]:
    """The whitened SVD of every ``rows``-row block of ``weight`` (one per group), and the Cholesky shift used."""
    transform, shift = cholesky_whitening(gram, SHIFT)
    blocks = weight.detach().to(torch.float64).split(rows, dim=0)
    return [factorize(block, transform) for block in blocks], shift


def truncate(factorizations: list[Factorization], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: ``A`` = the groups' ``Sig^1/2 V^T S^-1`` stacked (``G r x n``), ``B`` = ``G x rows x r``."""
    pairs = [f.factors(rank, dtype=torch.float64) for f in factorizations]
    return torch.cat([v for _, v in pairs]), torch.stack([u for u, _ in pairs])


def allocate_units(weights: dict[str, float], total: int, cap: int) -> dict[str, int]:
    """``total`` units over the modules in proportion to ``weights`` (rank_search.py, fisher branch as coded):
    floors (at least 1, at most ``cap``), then +1 in ascending order of the fractional part, cycling, until the
    total is met (or -1 in the opposite order when the minimum of 1 overshot it)."""
    names = list(weights)
    if not len(names) <= total <= cap * len(names):
        raise UsageError(f"palu: {total} rank units cannot be spread over {len(names)} modules of at most {cap}")
    whole = sum(weights.values())
    exact = {n: total * weights[n] / whole for n in names}
    units = {n: max(1, min(cap, math.floor(exact[n]))) for n in names}
    order = sorted(names, key=lambda n: exact[n] - units[n])
    missing = total - sum(units.values())
    while missing > 0:
        for n in order:
            if missing and units[n] < cap:
                units[n] += 1
                missing -= 1
    while missing < 0:
        for n in reversed(order):
            if missing and units[n] > 1:
                units[n] -= 1
                missing += 1
    return units


class Palu(Method):
    name = "palu"
    description = "Palu: grouped whitened low-rank K/V projections, Fisher ranks, latent KV cache (KV ratio)"
    config_class = PaluConfig
    requires = ("gram", "palu_fisher")
    compresses = "kv_cache"
    concurrent_decompose = True
    components = {}
    notes = PaperNotes(
        paper=PAPER,
        paper_defaults="G-LRD with 4 heads per group; S = chol(X X^T) (shift -lambda_min + 1e-3) from 256 x 2048 "
                       "WikiText-2 train; ranks by fisher_uniform from a Fisher of 2048 x 1024 WikiText-2 windows in "
                       "fp16, group ranks rounded to multiples of 32; ratio = fraction of KV-cache bytes with fp16 "
                       "latents; transformers 4.37.2",
        deviations=(
            "group_size 1 (M-LRD) by default: SmolLM2-135M has 3 KV heads, so the paper's 4 heads per group is "
            "impossible; group_size 3 is J-LRD",
            "block 1 instead of 32 (32 is half of SmolLM2's head dimension 64); the allocation unit is G x block "
            "and the kept total is met exactly, where the code rounds after allocating and misses the budget",
            "every module keeps at least one unit (the code's rounding keeps at least 32 per group); leftovers "
            "are given as the code gives them (ascending fractional part, cycling)",
            "the latent cache is real on every device (bench.LatentKVAttention, plain torch): the code's Hugging "
            "Face path rebuilds K and V at once and saves no cache memory; its latents exist only in Triton kernels",
            "keys are rebuilt for every cached position at every step (no Triton fusion): decode costs "
            "G r_k d_h g more multiply-adds per cached token than a plain cache",
            "calibration from svdbench's windows (WikiText-2 validation, --calib-samples x --calib-seqlen) for "
            "both the gram and the Fisher, instead of 256 x 2048 (gram) and 2048 x 1024 (Fisher) of train; the "
            "Fisher from float64 gradients of the float32 model (the code: fp16 model)",
            "the Fisher's loss is the model's next-token loss on each window; the code passes labels already "
            "shifted by one to a model that shifts again (it scores the token two ahead)",
            "grams in float64 (the code sums in float32 and inverts S in float32)",
        ),
    )

    def __init__(self, config=None):
        super().__init__(config)
        self._factors: dict = {}

    # ------------------------------------------------------------------ the contract's stages
    def allocate(self, ratio, factorizations, context, config):
        """Every weight stays dense (no decompose: the grouped k/v factors are made in ``refine``, small); the
        latent ranks are facts (made again in ``refine``)."""
        plan = self.latent_ranks(ratio, context, config)
        ranks = dict.fromkeys((t.name for t in context.targets), None)
        return Allocation(ranks, {"latent_ranks_per_group": plan["ranks"], "kv_ratio": ratio,
                                  "kv_ratio_planned": plan["achieved"], "group_size": config.group_size})

    def refine(self, model, ratio, context, config):
        plan = self.latent_ranks(ratio, context, config, model)
        by_block: dict[int, dict] = {}
        for target in context.targets:
            if _is_kv(target.name):
                by_block.setdefault(target.block, {})[target.name.rpartition(".")[2]] = target
        shifts = {}
        for block, pair in sorted(by_block.items()):
            k, v = pair["k_proj"], pair["v_proj"]
            attention_name = k.name.rpartition(".")[0]
            attention = model.get_submodule(attention_name)
            parts = {}
            for target in (k, v):
                found, shift = self.factors(target, context, config, model)
                if shift:
                    shifts[target.name] = shift
                parts[target.name] = truncate(found, plan["ranks"][target.name])
            (k_down, k_up), (v_down, v_up) = parts[k.name], parts[v.name]
            latent = LatentKVAttention.from_factors(attention, getattr(attention, "layer_idx", block),
                                                    config.group_size, k_down, k_up, v_down, v_up)
            parent, _, child = attention_name.rpartition(".")
            setattr(model.get_submodule(parent), child, latent)
        attach_rotary(model)
        facts = {"kv_ratio_planned": plan["achieved"], "latent_layers": len(by_block)}
        if shifts:
            facts["cholesky_shift"] = shifts
        return facts

    # ------------------------------------------------------------------ pieces
    def geometry(self, context, config, model=None) -> tuple[int, int, int]:
        """(head_dim, n_kv, groups) of the model, checked against ``group_size``."""
        text = (model if model is not None else context.model).config
        text = text.get_text_config() if hasattr(text, "get_text_config") else text
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv = int(text.num_key_value_heads)
        g = int(config.group_size)
        if g < 1 or kv % g:
            raise UsageError(f"palu.group_size must divide the model's {kv} key/value heads, got {g}")
        if config.block < 1 or (g * head_dim) % config.block:
            raise UsageError(f"palu.block must divide a group's {g * head_dim} rows, got {config.block}")
        return head_dim, kv, kv // g

    def factors(self, target, context, config, model=None) -> tuple[list[Factorization], float]:
        """The grouped whitened SVDs of one k/v_proj (computed once per run, reused at every ratio)."""
        if target.name not in self._factors:
            head_dim, _, _ = self.geometry(context, config, model)
            self._factors[target.name] = grouped_factors(context.weight(target), context.stats.get("gram", target.name),
                                                         config.group_size * head_dim)
        return self._factors[target.name]

    def latent_ranks(self, ratio: float, context, config, model=None) -> dict:
        """Each k/v_proj's rank per group at KV ratio ``ratio``, and the KV ratio they achieve."""
        head_dim, kv, groups = self.geometry(context, config, model)
        modules = [t.name for t in context.targets if _is_kv(t.name)]
        full = kv * head_dim  # numbers per token per module
        unit = groups * config.block
        total = round((1 - ratio) * full * len(modules) / unit)
        cap = full // unit
        if config.allocation == "uniform":
            weights = dict.fromkeys(modules, 1.0)
        else:
            weights = {name: float(context.stats.get("palu_fisher", name).mean()) for name in modules}
        units = allocate_units(weights, total, cap)
        ranks = {name: units[name] * config.block for name in modules}
        kept = sum(groups * r for r in ranks.values())
        return {"ranks": ranks, "achieved": 1 - kept / (full * len(modules))}


@hookimpl
def register_statistics(register):
    register(PaluFisher())


@hookimpl
def register_methods(register):
    register(Palu())
