"""Uncertainty of the reported numbers: seeded bootstrap intervals over windows and examples.

Every quality record keeps the per-item numbers its value is computed from
(:func:`evidence`): a perplexity record the summed token NLL and the token
count of each window (``extra["window_nll"]``, ``extra["window_tokens"]``), a
zero-shot record the correctness of each example (``extra["correct"]``, a
string of ``0``/``1`` in document order). From them:

- :func:`interval` - a 95% percentile-bootstrap interval of the value
  (perplexity = exp(sum NLL / sum tokens) of the resampled windows; accuracy =
  mean correctness of the resampled examples);
- :func:`difference` - the interval of B - A. When both sides were measured
  on the same items (same count: the first N windows or examples of the same
  split), it is a *paired* bootstrap - both resampled with the same indices,
  which cancels the items' shared difficulty and is far tighter than two
  overlapping intervals; otherwise the two are resampled independently
  (``paired`` is False). A difference is significant when its interval
  excludes zero.

Several parts (the tasks of an average) are resampled each over its own
items and their values averaged. ``RESAMPLES`` and ``SEED`` are fixed, so a
report is reproducible; the report's settings state them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Evidence:
    """The per-item numbers of one measured value: NLL sums and token counts, or correctness."""

    kind: str  # "perplexity" | "accuracy"
    values: np.ndarray
    tokens: np.ndarray | None = None

    @property
    def items(self) -> int:
        return len(self.values)

    def value(self, rows: np.ndarray | None = None) -> np.ndarray | float:
        """The statistic on the items (``rows``: resampled index arrays, one row per resample)."""
        values = self.values if rows is None else self.values[rows]
        if self.kind == "perplexity":
            tokens = self.tokens if rows is None else self.tokens[rows]
            return np.exp(values.sum(-1) / tokens.sum(-1))
        return values.mean(-1)


def evidence(record: dict) -> Evidence | None:
    """A record's per-item numbers, or ``None`` when it kept none (an older record, a speed metric)."""
    extra = record.get("extra") or {}
    nll = extra.get("window_nll")
    if isinstance(nll, list) and nll:
        tokens = extra.get("window_tokens")
        tokens = np.full(len(nll), tokens, dtype=float) if isinstance(tokens, (int, float)) else np.asarray(tokens, float)
        return Evidence("perplexity", np.asarray(nll, dtype=float), tokens)
    correct = extra.get("correct")
    if isinstance(correct, str) and correct:
        return Evidence("accuracy", np.frombuffer(correct.encode(), dtype=np.uint8).astype(float) - ord("0"))
    return None


def _rows(items: int, stream: int, seed: int = SEED, resamples: int = RESAMPLES) -> np.ndarray:
    """Resampled item indices, ``resamples`` x ``items``; the same (items, stream, seed) gives the same rows."""
    return np.random.default_rng([seed, stream, items]).integers(0, items, size=(resamples, items))


def _bounds(samples: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _resampled(parts: list[Evidence], stream: int) -> np.ndarray:
    """The mean over ``parts`` of each part's statistic, per resample; part ``i`` uses stream ``stream + i``."""
    return np.mean([part.value(_rows(part.items, stream + i)) for i, part in enumerate(parts)], axis=0)


def interval(parts: Evidence | list[Evidence]) -> tuple[float, float]:
    """95% bootstrap interval of the value (the mean over ``parts`` for an average)."""
    parts = [parts] if isinstance(parts, Evidence) else parts
    return _bounds(_resampled(parts, 0))


def point(parts: Evidence | list[Evidence]) -> float:
    parts = [parts] if isinstance(parts, Evidence) else parts
    return float(np.mean([part.value() for part in parts]))


@dataclass(frozen=True)
class Difference:
    """B - A with its 95% interval; ``paired`` when both were resampled on the same items."""

    value: float
    low: float
    high: float
    paired: bool
    items: int  # items per side (the smaller side when unpaired)

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 4) -> str:
        return f"[{self.low:+.{digits}g}, {self.high:+.{digits}g}]"


def same_items(a: Evidence, b: Evidence) -> bool:
    """Whether two measurements can be paired: same kind, same number of items (and of tokens per window)."""
    if a.kind != b.kind or a.items != b.items:
        return False
    return a.tokens is None or bool(np.array_equal(a.tokens, b.tokens))


def difference(a: Evidence | list[Evidence], b: Evidence | list[Evidence], relative: bool = False) -> Difference:
    """B - A (or B / A - 1 with ``relative``) and its 95% bootstrap interval, paired where the items match."""
    a = [a] if isinstance(a, Evidence) else a
    b = [b] if isinstance(b, Evidence) else b
    paired = len(a) == len(b) and all(same_items(x, y) for x, y in zip(a, b))
    sa, sb = _resampled(a, 0), _resampled(b, 0 if paired else len(a) + 1000)
    va, vb = point(a), point(b)
    if relative:
        value = vb / va - 1 if va else math.nan
        samples = sb / sa - 1
    else:
        value, samples = vb - va, sb - sa
    low, high = _bounds(samples)
    return Difference(value, low, high, paired, min(min(p.items for p in a), min(p.items for p in b)))


def ratio_interval(numerator_seconds, denominator_seconds, paired: bool = True) -> tuple[float, float, float] | None:
    """A speed-up and its 95% interval from repeated timings.

    Speed-up = median(denominator seconds) / median(numerator seconds) (the
    same tokens, so tokens/s over tokens/s). ``paired``: the repeats were
    taken in rounds (round ``i`` of both sides together), so the rounds are
    resampled jointly; otherwise each side on its own.
    """
    fast, slow = np.asarray(numerator_seconds, float), np.asarray(denominator_seconds, float)
    paired = paired and len(fast) == len(slow)
    if not len(fast) or not len(slow) or (fast <= 0).any() or (slow <= 0).any():
        return None
    samples = (np.median(slow[_rows(len(slow), 0)], axis=1)
               / np.median(fast[_rows(len(fast), 0 if paired else 1)], axis=1))
    low, high = _bounds(samples)
    return float(np.median(slow) / np.median(fast)), low, high


def method_text() -> str:
    """How the intervals are computed, for a report's settings."""
    return (f"{LEVEL:.0%} percentile bootstrap over the evaluated windows (perplexity) and examples (accuracy), "
            f"{RESAMPLES} resamples, seed {SEED}; differences between two methods are paired (both resampled on "
            "the same windows/examples)")
