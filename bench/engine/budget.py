"""Equal-memory comparison (SVD-LLM Table 7): the smallest ratio that fits a byte budget.

A budget is given as bytes (``300MB``, ``3.1e8B``, ``250MiB``) or as a fraction
of the dense model's bytes (``0.75``: any plain number up to 1); a plain number
above 1 is refused (``2.0``: 2 bytes, or 2 GB?) and must name its unit. For one
method the bytes of its compressed model at a ratio follow from the ranks its
``allocate`` gives (from the method's existing factorizations: no new SVD),
and the ratio is bisected until the smallest ratio whose model fits is pinned
to within ``tol``; the model found is built and its real bytes
(:func:`bench.model.targets.footprint`) checked against the budget.

The search assumes the method's bytes do not grow with the ratio (true of the
uniform rank formula and of every allocator that keeps a parameter budget). If
the method's ``refine`` changes the storage (quantized factors), that is
noticed after the first fit and the search is repeated with ``refine`` inside
it, building each candidate.
A budget at or above the dense model's bytes needs no compression: ratio 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bench.api.lowrank import Factorization
from bench.api.method import Context, Method
from bench.engine.compress import Assembler, Compressed, allocation_of, build_compressed, layer_plan, predicted_bytes
from bench.errors import UsageError

MAX_RATIO = 0.99  # the search bound: rank 1 or close to it for every matrix
TOLERANCE = 1e-3  # ratio resolution of the bisection (about a third of a rank step on SmolLM2)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_budget(spec: str) -> tuple[str, float]:
    """``("fraction", f)`` for a plain number in (0, 1], ``("bytes", n)`` for a number with a unit; a plain
    number above 1 is refused (its unit is not obvious)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(spec))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(f"budget {spec!r} is not understood; give bytes (300MB, 250MiB, 3.1e8B) "
                         "or a fraction of the dense model's bytes (0.75)")
    try:
        number = float(match.group(1))
    except ValueError:
        raise UsageError(f"budget {spec!r} is not a number; e.g. --budgets 0.9,0.75 or --budgets 300MB") from None
    if not 0 < number < float("inf") or not 0 < number * _UNITS[unit] < 2**63:
        raise UsageError(f"budget {spec!r} must be a positive, finite size; e.g. --budgets 0.9,0.75 or --budgets 300MB")
    if not match.group(2):
        if number > 1.0:
            raise UsageError(f"budget {spec!r} is a number above 1 without a unit; give a unit ({spec.strip()}GB, "
                             f"{spec.strip()}MB, {spec.strip()}B) or a fraction of the dense model's bytes up to 1 (0.75)")
        return "fraction", number
    return "bytes", number * _UNITS[unit]


class UnreachableBudget(ValueError):
    """A budget below the smallest model a method makes (found once its factorizations give its sizes)."""

    def __init__(self, budget: int, smallest: int, ratio: float):
        super().__init__(f"budget of {budget} bytes ({budget / 1e6:.3g} MB) is below the smallest model this method "
                         f"makes, {smallest} bytes ({smallest / 1e6:.3g} MB) at ratio {ratio}; give a budget of at "
                         f"least {smallest}B (embeddings, lm_head and norms are never compressed)")
        self.budget, self.smallest, self.ratio = budget, smallest, ratio


def unreachable_line(failures: list[dict]) -> str | None:
    """The one line for a run whose budgets some method could not reach (None: every budget was reached)."""
    found = [f for f in failures if str(f.get("error", "")).startswith(f"{UnreachableBudget.__name__}: ")]
    if not found:
        return None
    first = found[0]
    line = f"{first['method']} at {first['stage']}: {first['error'].partition(': ')[2]}"
    more = f" ({len(found) - 1} more unreachable budget(s) in report.md's Failures)" if len(found) > 1 else ""
    return line + more + "; the run's other results are kept"


def check_budget_floor(specs: tuple[str, ...], dense_bytes: int, target_weight_bytes: int) -> None:
    """Refuse, before any decomposition, a budget no method can reach: below the bytes of what is never
    compressed (embeddings, lm_head, norms - the dense bytes less every target's weight)."""
    floor = dense_bytes - target_weight_bytes
    for spec in specs:
        size = budget_bytes(spec, dense_bytes)
        if floor > 0 and size <= floor:
            raise UsageError(f"budget {spec} ({size} bytes) is below {floor} bytes ({floor / 1e6:.3g} MB), what this "
                             "model's uncompressed parts alone take (embeddings, lm_head, norms); every compressed "
                             f"model is larger: give a budget above {floor}B")


def budget_bytes(spec: str, dense_bytes: int) -> int:
    """The budget in bytes, fractions taken of ``dense_bytes``."""
    kind, number = parse_budget(spec)
    return int(number * dense_bytes) if kind == "fraction" else int(number)


def bisect_ratio(size_at: Callable[[float], int], budget: int, dense_bytes: int, hi: float = MAX_RATIO,
                 tol: float = TOLERANCE) -> tuple[float, int]:
    """Smallest ratio in [0, hi] (to ``tol``) whose ``size_at(ratio) <= budget``, and its size.

    Ratio 0 is tried first: a model whose ``refine`` shrinks storage (quantized
    factors) may fit the budget without removing any parameter, and then 0 -
    not the bisection's ``tol`` - is the answer. Raises ValueError when even
    ``hi`` does not fit.
    """
    if budget >= dense_bytes:
        return 0.0, dense_bytes
    zero_size = size_at(0.0)
    if zero_size <= budget:
        return 0.0, zero_size
    hi_size = size_at(hi)
    if hi_size > budget:
        raise UnreachableBudget(budget, hi_size, hi)
    lo = 0.0  # invariant: lo does not fit, hi fits
    while hi - lo > tol:
        mid = (lo + hi) / 2
        size = size_at(mid)
        if size <= budget:
            hi, hi_size = mid, size
        else:
            lo = mid
    return hi, hi_size


@dataclass
class BudgetFit:
    """The model that fits, and how it was found."""

    compressed: Compressed
    budget_bytes: int
    builds: int  # models built while searching
    refine_in_search: bool

    @property
    def bytes(self) -> int:
        return self.compressed.summary["bytes"]

    def summary(self) -> dict:
        return {"ratio": self.compressed.ratio, "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "builds": self.builds, "refine_in_search": self.refine_in_search, "tolerance": TOLERANCE}


def fit_budget(method: Method, factorizations: Mapping[str, Factorization], context: Context,
               dense_footprint: dict[str, int], budget: int, element_size: int = 4,
               assemble: Assembler | None = None) -> BudgetFit:
    """The method's compressed (and refined) model at the smallest ratio that fits ``budget`` bytes.

    Without ``refine`` the bytes follow from the ranks alone (``element_size``
    bytes per weight), so the search builds a model only when ``refine``
    changes the storage.
    """
    dense_bytes = dense_footprint["bytes"]
    builds = 0

    def build(ratio: float, refine: bool) -> Compressed:
        nonlocal builds
        builds += 1
        return build_compressed(method, ratio, factorizations, context, dense_footprint, refine=refine,
                                assemble=assemble)

    def size_at(ratio: float, refine: bool) -> int:
        if refine:
            return build(ratio, True).summary["bytes"]
        layers = layer_plan(context.targets, allocation_of(method, ratio, factorizations, context).ranks, factorizations)
        return predicted_bytes(layers, dense_footprint, element_size)

    refine_in_search = False
    ratio, _ = bisect_ratio(lambda r: size_at(r, False), budget, dense_bytes)
    unrefined_bytes = size_at(ratio, False)
    compressed = build(ratio, True)
    if compressed.summary["bytes"] != unrefined_bytes:  # refine changed the storage: search again with it
        refine_in_search = True
        del compressed
        ratio, _ = bisect_ratio(lambda r: size_at(r, True), budget, dense_bytes)
        compressed = build(ratio, True)
    if compressed.summary["bytes"] > budget:
        raise ValueError(f"the model at ratio {ratio:.4f} takes {compressed.summary['bytes']} bytes, over the budget "
                         f"of {budget} (its bytes are not monotone in the ratio)")
    return BudgetFit(compressed, budget, builds, refine_in_search)
