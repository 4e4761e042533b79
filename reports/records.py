"""A run's records as a pandas DataFrame, and what the manifest says about its methods and tasks.

Every table, plot and regression row is built from :func:`frame`: one row per
record of results.json, with the columns the :class:`bench.Record` schema
defines (kind of metric, direction, bits, budget, grid point, variant) plus a
few derived for display (``label``, ``stderr``, ``order``) and the record's
``extra`` (the per-item numbers :mod:`reports.stats` resamples). Methods and
tasks are ordered as the run listed them (the manifest's ``methods`` and
``tasks``), the dense model first and perplexity tasks before the others;
nothing here knows a method or task by name.
"""

from __future__ import annotations

import math

import pandas as pd

from bench import DENSE, format_point

COLUMNS = ["key", "model", "method", "ratio", "task", "metric", "column", "value", "kind", "higher_is_better", "params",
           "bytes", "bits", "budget", "variant", "point", "label", "stderr", "params_removed", "extra"]
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
QUALITY_KINDS = ("perplexity", "accuracy", "other")  # what a quality table shows (not speed or memory)


def label_of(method: str, bits) -> str:
    """The method as a table row names it: 'svdllm_quant (4-bit)'. Grid and budget get their own columns."""
    return f"{method} ({int(bits)}-bit)" if bits is not None and not _missing(bits) else method


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def frame(data: dict) -> pd.DataFrame:
    """Every record of ``data`` as a row, in results.json order.

    ``column`` is the metric as a table column names it: with its grid point
    when the task measured several (``nll [length=16]``).
    """
    rows = []
    for r in data.get("records", []):
        bits, point = r.get("bits"), format_point(r.get("point") or {})
        rows.append({
            "key": r.get("key"), "model": r["model"], "method": r["method"], "ratio": float(r.get("ratio") or 0.0),
            "task": r["task"], "metric": r["metric"], "column": r["metric"] + (f" [{point}]" if point else ""),
            "value": r["value"], "kind": r.get("kind", "other"),
            "higher_is_better": r.get("higher_is_better"), "params": r.get("params"), "bytes": r.get("bytes"),
            "bits": bits, "budget": r.get("budget"), "variant": r.get("variant", ""),
            "point": point, "label": label_of(r["method"], bits),
            "stderr": (r.get("extra") or {}).get("stderr"),
            "params_removed": (r.get("accounting") or {}).get("params_removed"),
            "extra": r.get("extra") or {},
        })
    df = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("higher_is_better", "bits", "budget", "stderr", "extra"):  # integers and None stay as they are, not floats
        df[column] = pd.Series([row[column] for row in rows], dtype=object)
    return df.astype({"value": float})


def method_order(data: dict) -> list[str]:
    """Method names as the run listed them, the dense model first, others (old records) after."""
    listed = list((data.get("manifest") or {}).get("methods") or {})
    seen = [r["method"] for r in data.get("records", [])]
    order = [DENSE] + [m for m in listed if m != DENSE]
    return order + sorted(set(seen) - set(order))


def label_rank(data: dict):
    """A sort key for row labels ('svdllm_quant (4-bit)'): the method's place in the run, then the label."""
    order = {name: i for i, name in enumerate(method_order(data))}
    return lambda label: (order.get(label.split(" (")[0], len(order)), label)


def task_info(data: dict) -> dict[str, dict]:
    return (data.get("manifest") or {}).get("tasks") or {}


def task_order(data: dict) -> list[str]:
    """Tasks as the run listed them; perplexity tasks first."""
    info = task_info(data)
    listed = list(info) + sorted({r["task"] for r in data.get("records", [])} - set(info))
    kinds = {name: {m.get("kind") for m in (info.get(name) or {}).get("metrics", {}).values()} for name in listed}
    return sorted(listed, key=lambda t: ("perplexity" not in kinds[t], listed.index(t)))


def average_groups(data: dict) -> dict[str, dict]:
    """Task averages the run's tasks declare: ``{group: {"metric": ..., "members": [...]}}``."""
    groups: dict[str, dict] = {}
    for info in task_info(data).values():
        average = info.get("average")
        if average:
            groups[average["group"]] = {"metric": average["metric"], "members": list(average["members"])}
    return groups


def ablation_components(data: dict) -> dict[str, dict]:
    """Methods that declare their components (transform, update), in run order."""
    methods = (data.get("manifest") or {}).get("methods") or {}
    return {name: info["components"] for name, info in methods.items() if info.get("components")}


def dtype_bits(data: dict) -> int:
    return DTYPE_BITS.get(((data.get("manifest") or {}).get("config") or {}).get("dtype", "float32"), 32)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
