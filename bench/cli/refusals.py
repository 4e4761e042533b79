"""Command-line values that make no sense for the chosen method, refused in one line before any work."""

from __future__ import annotations

from bench.api.configs import coerce_value
from bench.errors import UsageError


def compress_ratio(registry, method: str, ratio: str | None) -> float:
    """The ratio ``compress --method METHOD`` works at: ``--ratio`` for a method that removes parameters,
    0 for a quantize-only one (``uses_ratio = False``), which would silently ignore a given ratio."""
    uses_ratio = registry.get("method", method).uses_ratio
    if not uses_ratio:
        if ratio is not None:
            raise UsageError(f"--ratio {ratio} is ignored by {method}, a quantize-only method that removes no "
                             "parameters; drop --ratio")
        return 0.0
    if ratio is None:
        what = ("KV-cache bytes" if getattr(registry.get("method", method), "compresses", "weights") == "kv_cache"
                else "parameters")
        raise UsageError(f"{method} needs --ratio, the fraction of {what} removed, e.g. --ratio 0.4")
    return coerce_value(float, ratio, "--ratio")
