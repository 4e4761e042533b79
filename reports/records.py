"""What a results.json record *is*: its kind of metric, its variant, its row.

Tables, plots and the regression check all group records the same way; the
rules live here once. A record is a dict written by ``bench.runner`` (model,
method, ratio, task, metric, value, higher_is_better, params, bytes, config,
extra, and optionally ``budget``). Quantized hybrids are told apart by a
``bits`` field in their config, budget runs by their ``budget`` field and
throughput measurements by their grid point (batch size, prompt and decode
lengths in ``extra``).
"""

from __future__ import annotations

import math

from tasks.zeroshot import AVERAGE_METRIC, PAPER_TASKS as PAPER_ZERO_SHOT  # the six tasks SVD-LLM Table 1 averages

DENSE = "dense"
ZERO_SHOT_ORDER = PAPER_ZERO_SHOT + ("arc_challenge",)
PERPLEXITY_ORDER = ("wikitext2", "c4")
# Known methods in the order the papers list them; others follow alphabetically.
METHOD_ORDER = ("dense", "svd", "fwsvd", "asvd", "svdllm_w", "svdllm_u", "svdllm", "svdllm_v2", "dipsvd")
ABLATION_METHODS = ("asvd", "svd", "svdllm_w", "svdllm_u", "svdllm")
# Keys of ``extra`` that locate a throughput measurement on its grid.
GRID_KEYS = ("batch_size", "batch", "prefill", "prefill_len", "prompt_len", "prompt_tokens", "decode", "decode_len",
             "gen_len", "new_tokens", "generated")
BITS_KEYS = ("bits", "nbits", "wbits", "quant_bits")
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def metric_kind(record: dict) -> str:
    """'perplexity', 'accuracy', 'throughput', 'memory', 'stderr' or 'other'."""
    metric = record["metric"].lower()
    if metric.endswith("stderr") or metric.endswith("_se"):
        return "stderr"
    if "perplexity" in metric or metric in ("ppl", "word_perplexity"):
        return "perplexity"
    if metric.startswith("acc") or metric in ("exact_match", "f1", "mc1", "mc2"):
        return "accuracy"
    if metric.endswith("tok_s") or metric.endswith("per_s") or "tokens_per_second" in metric:
        return "throughput"
    if metric.endswith("_mb") or metric.endswith("_bytes") or "mem" in metric:
        return "memory"
    return "other"


def is_throughput(record: dict) -> bool:
    return record["task"].startswith("throughput") or metric_kind(record) == "throughput"


def bits_of(record: dict) -> int | None:
    """The quantization bit width of a record's model, ``None`` when not quantized."""
    for source in (record, record.get("config") or {}, record.get("accounting") or {}):
        for key in BITS_KEYS:
            value = source.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value)
    return None


def budget_of(record: dict):
    """The memory budget a record was compressed to, ``None`` outside budget runs."""
    return record.get("budget")


def fmt_budget(budget) -> str:
    """A budget as a reader wants it: a share of the dense bytes, or MiB."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return f"{budget:.0%} of dense" if budget <= 1.5 else f"{budget / 2**20:.1f} MiB"
    return str(budget)


def grid_of(record: dict) -> str:
    """A throughput record's grid point, e.g. 'batch_size=4 prompt_len=128'; '' otherwise."""
    extra = record.get("extra") or {}
    return " ".join(f"{k}={extra[k]}" for k in GRID_KEYS if k in extra)


def variant(record: dict) -> str:
    """What tells two records of the same (method, ratio, task, metric) apart."""
    parts = []
    if budget_of(record) is not None:
        parts.append(f"budget={fmt_budget(budget_of(record))}")
    if bits_of(record) is not None:
        parts.append(f"{bits_of(record)}-bit")
    if is_throughput(record) and grid_of(record):
        parts.append(grid_of(record))
    return ", ".join(parts)


def method_label(record: dict) -> str:
    """The method as a table row names it: 'svdllm_quant (4-bit)'. Grid and budget get their own columns."""
    bits = bits_of(record)
    return f"{record['method']} ({bits}-bit)" if bits is not None else record["method"]


def method_rank(name: str) -> tuple:
    base = name.split(" ")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), base, name)


def task_rank(task: str) -> tuple:
    for position, order in enumerate((PERPLEXITY_ORDER, ZERO_SHOT_ORDER)):
        if task in order:
            return (position, order.index(task), task)
    return (2, 0, task)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def dtype_bits(manifest: dict) -> int:
    return DTYPE_BITS.get((manifest.get("config") or {}).get("dtype", "float32"), 32)
