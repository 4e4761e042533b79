"""Activation-aware SVD (``asvd``, Yuan et al., 2023).

**Scaling.** ``S = diag((mean_t |X_jt|)^alpha + eps)`` with ``alpha = 0.5`` and
``eps = 1e-6`` (the reference's values; the ``abs_mean`` statistic), then the
shared ``SVD(W S)`` truncation. Input channels with large activations are
kept more faithfully. The exact SVD replaces the reference's randomized one.

**Sensitivity-based ranks** (``allocation = "sensitivity"``, the reference's
rule). For every compressed linear and every candidate kept fraction ``p`` in
``candidates`` (0.9 ... 0.4; rank ``floor(m*n*p/(m+n))``), the calibration
perplexity is measured with only that linear truncated. All ``(linear, p)``
pairs are sorted by perplexity, least harmful first; a prefix of that list is
"allowed" and every linear takes the smallest ``p`` allowed for it (dense if
none). The shortest prefix whose kept parameters fit the budget - the uniform
rank formula's parameter count at the target ratio, so every method is
compared at the same size - is found by the API's shared step walk
(``bench.greedy_steps``, the reference's binary search gives the same prefix). The reference stops
there, which can undershoot the budget by a whole candidate step of one
matrix; here the matrix whose pair crossed the budget gets the leftover back
as rank (never more than it had before that pair), so the total lies within
one rank step of the budget. A target ratio beyond the smallest candidate
(e.g. 0.8 with ``p >= 0.4``) cannot be met by the search; it falls back to
uniform ranks, logged and recorded. ``allocation = "uniform"`` is the ablation.

**Cost and what is measured.** SmolLM2-135M has 210 linears x 6 candidates =
1260 evaluations, so by default the perplexity is taken on a subset of the
calibration windows: the first ``sensitivity_samples`` windows cut to
``sensitivity_seqlen`` tokens (default 2 x 256). The reference measures it on
its whole calibration set: ``sensitivity_samples=none`` and
``sensitivity_seqlen=none`` do that (every window, every token; the windows
are evaluated in parts whose logits fit in memory). Each evaluation is still
the exact perplexity of the whole model with one truncated linear, but only
the blocks from the truncated one onward are run: the blocks before it are
replaced, on a private copy of the model, by their recorded output on these
windows (earlier blocks are unchanged, so this is exact - checked at run time
against a full forward pass, with a fall-back to full passes if a model
family breaks it). The candidates of one linear share batched forward passes
whose per-candidate losses are bit for bit those of one pass per candidate
(checked at run time; see :class:`_Search`). The copy's linears run on
oneDNN, the perplexity task's kernels (``bench.onednn_linears``; the table
moves by about 2e-6 relative from torch's default kernels, the ranks do not).
The search is bound by its arithmetic: about 85 GFLOP of linears per
evaluation on 2 x 256 tokens (the blocks after the truncated one, the LM
head over 49,152 tokens), 107 TFLOP for the whole grid, which oneDNN runs
near this CPU's float32 peak: the full default grid took 5.9 min on two
cores (``benchmarks/asvd_search.py``).

**Non-finite guard.** A truncation whose calibration loss is NaN/inf (the
reference produced NaNs below 0.75 parameter ratio, its issue #7) gets an
infinite perplexity, is logged with its layer and ratio, and so sorts last.

**Cache.** The sensitivity table is stored as JSON under
``<cache_dir>/asvd_sensitivity/`` keyed by the model identity, a hash of the
exact token windows used (which fixes the calibration data, seed, sample
count and lengths), ``alpha``, ``eps``, the candidates and the method version;
the fields and a sha256 of the table are verified on load and a mismatched
or corrupted entry is rebuilt with a log line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bench import (
    Allocation,
    Budget,
    Context,
    Diagonal,
    Factorization,
    JsonCache,
    MatrixCost,
    Method,
    PaperNotes,
    Target,
    UsageError,
    decoder_blocks,
    factorize,
    greedy_steps,
    hookimpl,
    linear_function,
    matrix_costs,
    onednn_linears,
    rank_for_ratio,
    uniform_ranks,
)

log = logging.getLogger(__name__)

VERSION = "1"
ALLOCATIONS = ("sensitivity", "uniform")


@dataclass(frozen=True)
class ASVDConfig:
    alpha: float = 0.5
    eps: float = 1e-6
    allocation: str = "sensitivity"  # "sensitivity" (the reference's search) or "uniform"
    candidates: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # kept fractions tried per linear
    sensitivity_samples: int | None = 2  # calibration windows used by the search (None: all, as the reference)
    sensitivity_seqlen: int | None = 256  # tokens of each of those windows (None: the whole window)

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"asvd.allocation={self.allocation!r} is unknown; use one of: {', '.join(ALLOCATIONS)}")
        if not self.alpha >= 0 or not self.eps > 0:
            raise UsageError("asvd needs alpha >= 0 and eps > 0")
        if (self.sensitivity_samples is not None and self.sensitivity_samples < 1) or (
                self.sensitivity_seqlen is not None and self.sensitivity_seqlen < 2):
            raise UsageError("asvd.sensitivity_samples must be >= 1 and asvd.sensitivity_seqlen >= 2 "
                             "(or none: the whole calibration set)")
        if not self.candidates or any(not 0 < p < 1 for p in self.candidates):
            raise UsageError(f"asvd.candidates={self.candidates!r} must be comma-separated kept fractions in (0, 1)")

    @property
    def kept_candidates(self) -> list[float]:
        return sorted(set(self.candidates), reverse=True)


def activation_scale(abs_mean: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """The diagonal of ``S``: ``mean|x_j| ** alpha + eps`` (float64)."""
    return abs_mean.to(torch.float64).clamp_min(0) ** alpha + eps


def kept_rank(target: Target, kept: float) -> int:
    """The rank keeping ``kept`` of the matrix's parameters (``floor(m*n*kept/(m+n))``)."""
    return rank_for_ratio(target.out_features, target.in_features, max(0.0, 1.0 - kept))


def stored_params(target: Target, rank: int | None) -> int:
    """Weight parameters of the matrix at ``rank`` (``None``: dense, as is a rank not worth factorizing)."""
    return MatrixCost.of(target).params(rank)


# --------------------------------------------------------------------------- sensitivity

def sensitivity_windows(context: Context, config: ASVDConfig) -> torch.Tensor:
    if context.calibration is None:
        raise UsageError("asvd's sensitivity search needs calibration windows; run it through the runner "
                         "or use --method-option asvd.allocation=uniform")
    return context.calibration[: config.sensitivity_samples, : config.sensitivity_seqlen].contiguous()


LOGITS_BUDGET = 2**30  # bytes of float32 logits one forward pass of the search may hold


def _loss(model: nn.Module, ids: torch.Tensor) -> float:
    return float(model(ids, labels=ids, use_cache=False).loss)


def _repeat(output, times: int):
    """A recorded block output (a tensor, or a tuple starting with one) repeated ``times`` along the batch."""
    if times == 1:
        return output
    if isinstance(output, torch.Tensor):
        return output.repeat(times, *([1] * (output.dim() - 1)))
    return (_repeat(output[0], times), *output[1:])


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the block it waits for has run."""


class _Search:
    """The state of one sensitivity search on a private copy of the model.

    **Batched candidates.** The candidates of one linear are evaluated
    together: the windows are repeated once per candidate along the batch,
    the truncated linear applies each candidate's weight to its own rows, and
    each candidate's loss is the model's own loss function on its rows'
    logits - the operations and values of one forward pass per candidate
    (torch's GEMMs compute each row independently of the number of rows; this
    is checked once at the start, else one pass per candidate is used, and
    the tests compare the table with the one-pass-per-candidate reference).

    **Skipped blocks.** While the linears of block ``b`` are measured, the
    blocks before ``b`` return the recorded input of block ``b``; that input
    is advanced one block at a time, so only one hidden state per window is
    kept whatever the number of blocks.

    **Memory.** Windows are evaluated in parts whose logits fit
    ``LOGITS_BUDGET`` (the whole calibration set can be searched); with more
    than one part a candidate's loss is the token-weighted mean of the parts'
    mean losses (the default 2 x 256 tokens fit in one part).
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, candidates: int):
        self.work = copy.deepcopy(model).eval()
        self.kernels = contextlib.ExitStack()  # the copy's linears use the evaluation's fast kernels
        self.kernels.enter_context(onednn_linears(self.work))
        _, self.blocks = decoder_blocks(self.work)
        window_bytes = ids.shape[1] * self.work.get_output_embeddings().weight.shape[0] * 4
        self.parts = list(ids.split(max(1, LOGITS_BUDGET // window_bytes)))
        self.group = max(1, min(candidates, LOGITS_BUDGET // (len(self.parts[0]) * window_bytes)))
        self.block, self.inputs, self.part = 0, [None] * len(self.parts), 0
        self.dense_loss = self._mean(_loss(self.work, part) for part in self.parts)
        if self.group > 1 and not self._batching_is_exact():
            log.warning("asvd: batched passes of %s do not reproduce single passes bit for bit here; "
                        "one pass per candidate", type(model).__name__)
            self.group = 1

    def _mean(self, losses) -> float:
        """Token-weighted mean of the parts' mean losses (the one loss itself when there is one part)."""
        losses = list(losses)
        if len(losses) == 1:
            return losses[0]
        tokens = [len(part) * (part.shape[1] - 1) for part in self.parts]
        return sum(loss * n for loss, n in zip(losses, tokens)) / sum(tokens)

    def _group_losses(self, logits: torch.Tensor, part: torch.Tensor, count: int) -> list[float]:
        rows, vocab = len(part), self.work.config.get_text_config().vocab_size
        return [float(self.work.loss_function(logits=logits[i * rows:(i + 1) * rows], labels=part, vocab_size=vocab))
                for i in range(count)]

    def _batching_is_exact(self) -> bool:
        """Whether one pass over the first part repeated ``group`` times gives every copy the single pass's
        logits, and the loss function the forward pass's loss."""
        part = self.parts[0]
        single = self.work(part, use_cache=False).logits
        repeated = self.work(part.repeat(self.group, 1), use_cache=False).logits
        rows = len(part)
        return (all(torch.equal(repeated[i * rows:(i + 1) * rows], single) for i in range(self.group))
                and self._group_losses(single, part, 1)[0] == _loss(self.work, part))

    def _skipped(self, *args, **kwargs):
        """The forward of a skipped block: the recorded input of the first computed block, for the current part."""
        hidden = args[0] if args else kwargs["hidden_states"]
        recorded = self.inputs[self.part]
        return _repeat(recorded, hidden.shape[0] // len(self.parts[self.part]))

    def _each_part(self):
        """The parts of the windows, each made the current one (skipped blocks return its recorded input)."""
        for index, part in enumerate(self.parts):
            self.part = index
            yield part

    def _skip_before(self, block: int) -> None:
        for i, module in enumerate(self.blocks):
            module.__dict__.pop("forward", None)
            if i < block:
                module.forward = self._skipped

    def skip_to(self, block: int) -> None:
        """Make the blocks before ``block`` (>= the current one) return block ``block``'s recorded input."""
        while self.block < block:
            def reached(_module, _inputs, output):
                self.inputs[self.part] = output
                raise _Reached

            self._skip_before(self.block)
            handle = self.blocks[self.block].register_forward_hook(reached)
            try:
                for part in self._each_part():
                    try:
                        self.work(part, use_cache=False)
                    except _Reached:
                        pass
            finally:
                handle.remove()
            self.block += 1
        self._skip_before(block)

    def stop_skipping(self) -> None:
        self._skip_before(0)

    def loss(self) -> float:
        """The loss of the model as it is (with the current skips)."""
        return self._mean(_loss(self.work, part) for part in self._each_part())

    def losses(self, module: nn.Linear, weights: list[torch.Tensor]) -> list[float]:
        """The loss with ``module`` using each of ``weights`` in turn."""
        if self.group == 1 or type(module).forward is not nn.Linear.forward:
            return [self._one(module, weight) for weight in weights]
        out = []
        kernel, forward = linear_function(module), vars(module).get("forward")
        for first in range(0, len(weights), self.group):
            chosen = weights[first:first + self.group]
            module.forward = lambda x, chosen=chosen: torch.cat(  # each candidate's rows through its own weight
                [kernel(rows, weight, module.bias) for rows, weight in zip(x.chunk(len(chosen)), chosen)])
            per_part = []
            try:
                for part in self._each_part():
                    logits = self.work(part.repeat(len(chosen), 1), use_cache=False).logits
                    per_part.append(self._group_losses(logits, part, len(chosen)))
            finally:
                del module.forward
                if forward is not None:
                    module.forward = forward
            out += [self._mean(losses) for losses in zip(*per_part)]
        return out

    def _one(self, module: nn.Linear, weight: torch.Tensor) -> float:
        original = module.weight.data
        module.weight.data = weight
        try:
            return self.loss()
        finally:
            module.weight.data = original


def measure_sensitivity(model: nn.Module, targets: list[Target], factorizations: dict[str, Factorization],
                        candidates: list[float], ids: torch.Tensor, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Calibration perplexity with only one linear truncated, for every linear and kept fraction.

    Works on a private copy of ``model``: blocks before the truncated one are
    replaced by their recorded output, and a linear's candidates share
    batched forward passes (see :class:`_Search`).
    """
    with torch.no_grad():
        search = _Search(model, ids.to(device), len(candidates))
    if not math.isfinite(search.dense_loss):
        raise FloatingPointError(f"the original model's calibration loss is {search.dense_loss}")
    by_block: dict[int, list[Target]] = {}
    for target in targets:
        by_block.setdefault(target.block, []).append(target)
    shortcut = True
    table: dict[str, dict[str, float]] = {}
    progress = tqdm(total=len(targets) * len(candidates), desc="asvd: sensitivity", leave=False, unit="eval")
    try:
        with torch.no_grad():
            for block, members in sorted(by_block.items()):
                if shortcut and block > 0:
                    search.skip_to(block)
                    check = search.loss()
                    if abs(check - search.dense_loss) > 1e-4 * max(1.0, abs(search.dense_loss)):
                        log.warning("asvd: skipping the blocks before %d changes the loss (%.6g vs %.6g) for %s; "
                                    "using full forward passes", block, check, search.dense_loss, type(model).__name__)
                        search.stop_skipping()
                        shortcut = False
                for target in members:
                    module = search.work.get_submodule(target.name)
                    f = factorizations[target.name]
                    weights = []
                    for kept in candidates:
                        rank = kept_rank(target, kept)
                        truncated = (f.u[:, :rank] * f.s[:rank]) @ f.vt[:rank]
                        weights.append(truncated.to(module.weight.dtype).to(module.weight.device))
                    row = {}
                    for kept, loss in zip(candidates, search.losses(module, weights)):
                        if not math.isfinite(loss):
                            log.warning("asvd: %s truncated to kept fraction %.2f gives a non-finite calibration "
                                        "loss (%s); treated as infinite perplexity", target.name, kept, loss)
                        row[str(kept)] = math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf
                    progress.update(len(candidates))
                    table[target.name] = row
    finally:
        progress.close()
        search.stop_skipping()
        search.kernels.close()
    return table


# --------------------------------------------------------------------------- allocation

def sensitivity_ranks(targets: list[Target], table: dict[str, dict[str, float]], budget: int) -> dict[str, int | None]:
    """Ranks from the sorted (linear, kept) pairs and a threshold; ``None`` = dense.

    The ranks of the shortest prefix of least-harmful pairs whose parameters
    fit ``budget``, with the leftover given back to the matrix at the
    threshold. Found by the shared step walk (:func:`bench.greedy_steps`):
    from every linear at its smallest candidate, undo the pairs, most harmful
    first, while the budget allows (the totals of the prefixes only fall as
    they grow, so this stops at the shortest prefix that fits); the pair it
    stops at is undone as far as whole ranks fit. Raises ``UsageError``
    when even every pair does not fit.
    """
    by_name = {t.name: t for t in targets}
    order = {t.name: i for i, t in enumerate(targets)}
    pairs = sorted(((name, float(kept), ppl) for name, row in table.items() for kept, ppl in row.items()),
                   key=lambda p: (p[2], -p[1], order[p[0]]))
    smallest: dict[str, float] = {}
    undo = []  # (name, its rank before the pair): undoing the pair gives that rank back
    for name, p, _ in pairs:
        before = smallest.get(name)
        undo.append((name, kept_rank(by_name[name], before) if before is not None else None))
        smallest[name] = min(before if before is not None else 1.0, p)
    start = {t.name: kept_rank(t, smallest[t.name]) if t.name in smallest else None for t in targets}
    return greedy_steps(reversed(undo), matrix_costs(targets), Budget(budget), start, fill=False, partial=True)


def uniform_budget(targets: list[Target], ratio: float) -> int:
    """Parameters of the targets at the uniform rank formula (what every method keeps)."""
    return int(Budget.uniform(matrix_costs(targets), ratio).limit)


class ASVD(Method):
    name = "asvd"
    description = "activation-aware SVD: channels scaled by mean|x|^alpha, sensitivity-searched per-layer ranks"
    config_class = ASVDConfig
    requires = ("abs_mean",)
    needs_calibration_data = True
    components = {"transform": "activation scaling", "update": "no"}
    notes = PaperNotes(
        paper="Yuan et al., ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language "
              "Models (2023, arXiv:2312.05821)",
        paper_defaults="alpha 0.5; 32 x 2048 calibration tokens of WikiText-2; sensitivity-based ranks over kept "
                       "fractions 0.9-0.4, each measured as calibration perplexity on the whole calibration set",
        deviations=(
            "the sensitivity perplexity is measured on the first 2 x 256 calibration tokens (1,260 evaluations of "
            "the model fit a CPU run); asvd.sensitivity_samples=none and asvd.sensitivity_seqlen=none measure it on "
            "the whole calibration set, as the reference does",
            "exact SVD instead of the reference's randomized SVD",
            "the rank budget is the uniform rank formula's parameter count at the target ratio, and the matrix at "
            "the threshold gets the leftover back as rank (the reference can undershoot by a candidate step)",
            "a target ratio beyond the smallest candidate falls back to uniform ranks (logged and recorded)",
            "a truncation with a non-finite calibration loss counts as infinite perplexity and sorts last (the "
            "reference produced NaN, its issue #7)",
        ),
    )

    def decomposition_key(self, config: ASVDConfig) -> str:
        """Only alpha and eps shape the factorizations; the allocation settings choose ranks from them, so runs
        that differ only there share one factor store entry."""
        return f"{type(self).__module__}.{type(self).__qualname__} alpha={config.alpha!r} eps={config.eps!r}"

    def decompose(self, target, weight, context, config) -> Factorization:
        scale = activation_scale(context.stats.get("abs_mean", target.name), config.alpha, config.eps)
        return factorize(weight, Diagonal(scale))

    def cache_fields(self, context: Context, config: ASVDConfig, ids: torch.Tensor) -> dict:
        return {"method": self.name, "version": VERSION, "code": self.code_version(), "model": context.model_identity,
                "windows_sha256": hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest(),
                "windows_shape": list(ids.shape), "alpha": config.alpha, "eps": config.eps,
                "candidates": config.kept_candidates, "targets": [t.name for t in context.targets]}

    def sensitivity(self, factorizations: dict[str, Factorization], context: Context,
                    config: ASVDConfig) -> tuple[dict[str, dict[str, float]], dict]:
        """The sensitivity table, from the cache or measured (and then cached); plus facts for the record."""
        ids = sensitivity_windows(context, config)
        fields = self.cache_fields(context, config, ids)
        cache = JsonCache(Path(context.cache_dir) / "asvd_sensitivity", "asvd sensitivity")
        stored = cache.load(fields)
        if stored is not None:
            log.info("asvd: sensitivity table reused from the cache (%s)", cache.path(fields).name)
            table = {name: {k: float(v) for k, v in row.items()} for name, row in stored.items()}
            return table, {"sensitivity_cached": True, "sensitivity_tokens": list(ids.shape)}
        start = time.perf_counter()
        log.info("asvd: measuring sensitivity of %d linears x %d kept fractions on %d x %d calibration tokens",
                 len(context.targets), len(config.kept_candidates), *ids.shape)
        table = measure_sensitivity(context.model, context.targets, factorizations, config.kept_candidates, ids,
                                    context.device)
        seconds = time.perf_counter() - start
        log.info("asvd: sensitivity search took %.1f s", seconds)
        # JSON has no infinity: store it as a string float() reads back
        cache.save(fields, {name: {k: (v if math.isfinite(v) else "inf") for k, v in row.items()}
                            for name, row in table.items()})
        return table, {"sensitivity_cached": False, "sensitivity_seconds": round(seconds, 3),
                       "sensitivity_tokens": list(ids.shape)}

    def allocate(self, ratio, factorizations, context, config) -> Allocation:
        if config.allocation == "uniform":
            return Allocation(uniform_ranks(context.targets, ratio))
        table, facts = self.sensitivity(factorizations, context, config)
        budget = uniform_budget(context.targets, ratio)
        try:
            ranks = sensitivity_ranks(context.targets, table, budget)
        except UsageError:
            log.warning("asvd: ratio %.2f needs more compression than the smallest candidate kept fraction %.2f "
                        "allows; using uniform ranks", ratio, min(config.kept_candidates))
            facts["allocation_fallback"] = "uniform (target beyond the smallest candidate)"
            return Allocation(uniform_ranks(context.targets, ratio), facts)
        dense = [name for name, r in ranks.items() if r is None]
        facts["dense_linears"] = len(dense)
        kept = sum(stored_params(t, ranks[t.name]) for t in context.targets)
        log.info("asvd at ratio %.2f: %d of %d parameters kept (budget %d), %d linears left dense",
                 ratio, kept, sum(t.out_features * t.in_features for t in context.targets), budget, len(dense))
        # a dense linear gets a rank that compress_model keeps dense
        return Allocation({t.name: r if r is not None else min(t.out_features, t.in_features)
                           for t, r in ((t, ranks[t.name]) for t in context.targets)}, facts)


@hookimpl
def register_methods(register):
    register(ASVD())
