"""A synthetic results.json with every record layout the reports render.

Values follow simple formulas (perplexity grows with the ratio, accuracy
falls, throughput rises) so tests can check where each one lands; the layouts
mirror what the runner writes: budget runs carry ``budget``, quantized
hybrids ``config["bits"]``, throughput records their grid in ``extra``.
"""

from __future__ import annotations

import copy

DENSE_PARAMS, DENSE_BYTES = 134_515_008, 538_060_032
ZERO_SHOT = ("piqa", "arc_easy", "hellaswag", "winogrande", "openbookqa", "mathqa")
QUALITY = {"dense": 1.0, "svd": 40.0, "asvd": 6.0, "svdllm_w": 2.0, "svdllm_u": 5.0, "svdllm": 1.5}


def _record(method, ratio, task, metric, value, hib, params=None, nbytes=None, **more):
    params = params if params is not None else int(DENSE_PARAMS * (1 - 0.8 * ratio))
    nbytes = nbytes if nbytes is not None else params * 4
    return {"model": "smollm2-135m", "method": method, "ratio": ratio, "task": task, "metric": metric,
            "value": value, "higher_is_better": hib, "extra": more.pop("extra", {}), "params": params,
            "bytes": nbytes, "config": more.pop("config", {}), **more}


def perplexity(method: str, ratio: float, task: str = "wikitext2") -> float:
    base = 20.0 if task == "wikitext2" else 25.0
    return base * (1 + QUALITY[method] * ratio * 10) if method != "dense" else base


def accuracy(method: str, ratio: float, task: str) -> float:
    return round(max(0.25, 0.6 - 0.02 * ZERO_SHOT.index(task) - 0.03 * QUALITY[method] * ratio), 4)


def synthetic_results(methods=("svd", "asvd", "svdllm_w", "svdllm_u", "svdllm"), ratios=(0.2, 0.4, 0.6),
                      zero_shot=True, budgets=True, quantized=True, throughput=True) -> dict:
    records = []
    rows = [("dense", 0.0)] + [(m, r) for m in methods for r in ratios]
    for method, ratio in rows:
        for task in ("wikitext2", "c4"):
            records.append(_record(method, ratio, task, "perplexity", perplexity(method, ratio, task), False))
        if zero_shot:
            for task in ZERO_SHOT:
                acc = accuracy(method, ratio, task)
                records.append(_record(method, ratio, task, "acc", acc, True, extra={"stderr": 0.01}))
                records.append(_record(method, ratio, task, "acc_norm", acc + 0.01, True, extra={"stderr": 0.011}))
    if budgets:
        for budget, ratio in ((0.9, 0.12), (0.75, 0.3)):
            for method in ("svd", "svdllm_w"):
                records.append(_record(method, ratio, "wikitext2", "perplexity", perplexity(method, ratio), False,
                                       nbytes=int(DENSE_BYTES * budget) - 1000, budget=budget))
    if quantized:
        for bits in (2, 3, 4):
            nbytes = int(DENSE_BYTES * (0.3 + 0.05 * bits))
            records.append(_record("svdllm_quant", 0.2, "wikitext2", "perplexity", 30.0 + 40 / bits, False,
                                   nbytes=nbytes, config={"base": "svdllm_w", "bits": bits}))
            for ratio in (0.2, 0.4):  # the runner gives hqq a ratio, which it ignores
                records.append(_record("hqq", ratio, "wikitext2", "perplexity", 22.0 + 60 / bits**2, False,
                                       params=DENSE_PARAMS, nbytes=int(DENSE_BYTES * (0.35 + 0.06 * bits)),
                                       config={"bits": bits}, accounting={"params_removed": 0.0}))
    if throughput:
        for method, ratio in rows:
            for batch in (1, 4):
                grid = {"batch_size": batch, "prompt_len": 128, "gen_len": 32}
                speed = 1 + ratio * (0.5 + 0.25 * batch) * (1 - 0.05 * len(method)) if method != "dense" else 1.0
                for metric, base in (("prefill_tok_s", 400.0 * batch), ("decode_tok_s", 20.0 * batch)):
                    records.append(_record(method, ratio, "throughput", metric, base * speed, True,
                                           extra=dict(grid)))
                records.append(_record(method, ratio, "throughput", "peak_mem_mb", 600.0 - 300 * ratio, False,
                                       extra=dict(grid)))
    manifest = {
        "config": {"model": "smollm2-135m", "methods": list(methods), "ratios": list(ratios),
                   "tasks": ["wikitext2", "c4"], "seqlen": 512, "limit": 2, "batch_size": 1, "device": "cpu",
                   "dtype": "float32", "calibration": {"dataset": "wikitext2", "samples": 8, "seqlen": 512, "seed": 3},
                   "method_options": {}, "plugins_dirs": [], "out": "x"},
        "model": {"name": "smollm2-135m", "identity": "abc123", "params": DENSE_PARAMS, "bytes": DENSE_BYTES},
        "ratio_definition": "fraction of each compressed matrix's parameters removed: rank = floor(m*n*(1-ratio)/(m+n))",
        "method_configs": {m: {} for m in methods},
        "versions": {"svdbench": "0.1.0"}, "timings": {"total": 1.0},
    }
    return {"manifest": manifest, "records": records, "compressions": {}, "failures": [], "previous_records": []}


def degraded(data: dict, method: str, factor: float = 1.5) -> dict:
    """A copy of ``data`` with every perplexity of ``method`` multiplied by ``factor``."""
    data = copy.deepcopy(data)
    for r in data["records"]:
        if r["method"] == method and r["metric"] == "perplexity":
            r["value"] *= factor
    return data
