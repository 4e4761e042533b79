"""ASVD's sensitivity search as it was before the batched search: the slow reference of the equality tests.

Kept verbatim (commit 8318f96 of ``methods/asvd.py``): one full forward pass
per (linear, kept fraction) on the calibration windows, the blocks before the
truncated one replaced by their recorded output.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from bench import Factorization, Target, decoder_blocks
from methods.asvd import kept_rank

log = logging.getLogger(__name__)


def _loss(model: nn.Module, ids: torch.Tensor) -> float:
    return float(model(ids, labels=ids, use_cache=False).loss)


def reference_sensitivity(model: nn.Module, targets: list[Target], factorizations: dict[str, Factorization],
                          candidates: list[float], ids: torch.Tensor, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Calibration perplexity with only one linear truncated, for every linear and kept fraction.

    Works on a private copy of ``model``. Blocks before the truncated one are
    replaced by their recorded output (see the module docstring).
    """
    work = copy.deepcopy(model).eval()
    _, blocks = decoder_blocks(work)
    ids = ids.to(device)
    outputs: dict[int, object] = {}

    def record(index: int):
        def hook(_module, _inputs, output):
            outputs[index] = output
        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
    with torch.no_grad():
        try:
            dense_loss = _loss(work, ids)
        finally:
            for handle in handles:
                handle.remove()
    if not math.isfinite(dense_loss):
        raise FloatingPointError(f"the original model's calibration loss is {dense_loss}")

    def skip_to(block: int) -> None:
        """Blocks before ``block`` return the recorded input of ``block`` without computing."""
        for i in range(len(blocks)):
            blocks[i].__dict__.pop("forward", None)
            if i < block:
                blocks[i].forward = lambda *args, _cached=outputs[block - 1], **kwargs: _cached

    by_block: dict[int, list[Target]] = {}
    for target in targets:
        by_block.setdefault(target.block, []).append(target)
    shortcut = True
    table: dict[str, dict[str, float]] = {}
    try:
        with torch.no_grad():
            for block, members in sorted(by_block.items()):
                if shortcut and block > 0:
                    skip_to(block)
                    check = _loss(work, ids)
                    if abs(check - dense_loss) > 1e-4 * max(1.0, abs(dense_loss)):
                        log.warning("asvd: skipping the blocks before %d changes the loss (%.6g vs %.6g) for %s; "
                                    "using full forward passes", block, check, dense_loss, type(model).__name__)
                        skip_to(0)
                        shortcut = False
                for target in members:
                    module = work.get_submodule(target.name)
                    original = module.weight.data
                    row = {}
                    for kept in candidates:
                        f = factorizations[target.name]
                        rank = kept_rank(target, kept)
                        truncated = (f.u[:, :rank] * f.s[:rank]) @ f.vt[:rank]
                        module.weight.data = truncated.to(original.dtype).to(original.device)
                        loss = _loss(work, ids)
                        if not math.isfinite(loss):
                            log.warning("asvd: %s truncated to kept fraction %.2f gives a non-finite calibration "
                                        "loss (%s); treated as infinite perplexity", target.name, kept, loss)
                        row[str(kept)] = math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf
                    module.weight.data = original
                    table[target.name] = row
    finally:
        skip_to(0)
    return table


def reference_sensitivity_ranks(targets: list[Target], table: dict[str, dict[str, float]],
                                budget: int) -> dict[str, int | None]:
    """ASVD's ranks as computed before the shared budget solver (commit e48c6e9 of ``methods/asvd.py``): the
    shortest prefix of sorted pairs that fits, by binary search, and the leftover back to the threshold matrix."""
    by_name = {t.name: t for t in targets}
    order = {t.name: i for i, t in enumerate(targets)}
    pairs = sorted(((name, float(kept), ppl) for name, row in table.items() for kept, ppl in row.items()),
                   key=lambda p: (p[2], -p[1], order[p[0]]))

    def stored_params(target: Target, rank: int | None) -> int:
        m, n = target.out_features, target.in_features
        return rank * (m + n) if rank is not None and rank * (m + n) < m * n else m * n

    def ranks_for(prefix: int) -> dict[str, int | None]:
        kept: dict[str, float] = {}
        for name, p, _ in pairs[:prefix]:
            kept[name] = min(kept.get(name, 1.0), p)
        return {t.name: kept_rank(t, kept[t.name]) if t.name in kept else None for t in targets}

    def total(ranks: dict[str, int | None]) -> int:
        return sum(stored_params(by_name[name], r) for name, r in ranks.items())

    if total(ranks_for(len(pairs))) > budget:
        raise ValueError("the budget is below every linear at its smallest candidate")
    low, high = 0, len(pairs)  # total(ranks_for(high)) <= budget
    while low < high:
        mid = (low + high) // 2
        if total(ranks_for(mid)) <= budget:
            high = mid
        else:
            low = mid + 1
    ranks = ranks_for(high)
    if high > 0:  # give the leftover back to the matrix whose pair crossed the budget
        name = pairs[high - 1][0]
        target = by_name[name]
        before = ranks_for(high - 1)[name]
        m, n = target.out_features, target.in_features
        ceiling = before if before is not None else max(1, math.ceil(m * n / (m + n)) - 1)
        spare = budget - total(ranks)
        ranks[name] = min(ceiling, ranks[name] + spare // (m + n))
    return ranks
