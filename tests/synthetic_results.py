"""A synthetic results.json with every record layout the reports render.

Values follow simple formulas (perplexity grows with the ratio, accuracy
falls, throughput rises) so tests can check where each one lands; the layouts
mirror what the executor writes: records are :class:`bench.Record` dictionaries
(kind of metric, direction, bits, budget, grid point, variant), budget runs
carry ``budget`` and ``budget_fit``, quantized methods their ``bits``, a method
that removes no parameters (``hqq``) is recorded once at ratio 0, throughput
records their grid in ``point``; the manifest describes the run's methods (in
run order, with the ablation ``components`` the real methods declare) and
tasks (metric kinds, the zero-shot average) as ``Method.describe()`` and
``Task.describe()`` do.
"""

from __future__ import annotations

import copy
import math

from bench import Record

DENSE_PARAMS, DENSE_BYTES = 134_515_008, 538_060_032
ZERO_SHOT = ("piqa", "arc_easy", "hellaswag", "winogrande", "openbookqa", "mathqa")
PERPLEXITY_TASKS = ("wikitext2", "c4")
QUALITY = {"dense": 1.0, "svd": 40.0, "fwsvd": 20.0, "asvd": 6.0, "svdllm_w": 2.0, "svdllm_u": 5.0, "svdllm": 1.5}
MODEL = "smollm2-135m"

# What methods/*.py declare (tests/test_reports.py checks these against the real classes).
COMPONENTS = {
    "svd": {"transform": "none", "update": "no"},
    "asvd": {"transform": "activation scaling", "update": "no"},
    "svdllm_w": {"transform": "whitening", "update": "no"},
    "svdllm_u": {"transform": "none", "update": "yes"},
    "svdllm": {"transform": "whitening", "update": "yes"},
}
QUANT_CONFIGS = {"svdllm_quant": {"base": "svdllm_w", "bits": 4, "group_size": 64, "meta_dtype": "float16",
                                  "base_config": {}},
                 "hqq": {"bits": 4, "group_size": 64, "meta_dtype": "float16"}}
# The zero-shot average as tasks/zeroshot.py declares it (checked against it in tests/test_reports.py).
AVERAGE = {"group": "SVD-LLM's six zero-shot tasks", "metric": "acc",
           "members": ["openbookqa", "arc_easy", "winogrande", "hellaswag", "piqa", "mathqa"]}
THROUGHPUT_METRICS = {"prefill_tok_s": ("throughput", True, "tokens/s"), "decode_tok_s": ("throughput", True, "tokens/s"),
                      "peak_mem_mb": ("memory", False, "MiB")}
KINDS = {"perplexity": "perplexity", "acc": "accuracy", "acc_norm": "accuracy",
         **{metric: kind for metric, (kind, _, _) in THROUGHPUT_METRICS.items()}}


def _record(method, ratio, task, metric, value, hib, params=None, nbytes=None, **more) -> dict:
    params = params if params is not None else int(DENSE_PARAMS * (1 - 0.8 * ratio))
    nbytes = nbytes if nbytes is not None else params * 4
    accounting = more.pop("accounting", {"params": params, "bytes": nbytes, "dense_params": DENSE_PARAMS,
                                         "dense_bytes": DENSE_BYTES, "params_removed": 1 - params / DENSE_PARAMS})
    point = more.pop("point", {})
    budget = more.pop("budget", None)
    key = f"{method}|{ratio}|{budget}|{more.get('bits')}|{task}|{sorted(point.items())}"  # one cell per key
    return Record(key=key, model=MODEL, method=method, ratio=ratio, task=task, metric=metric, value=value,
                  kind=KINDS[metric], higher_is_better=hib, params=params, bytes=nbytes, budget=budget, point=point,
                  extra=more.pop("extra", {}), config=more.pop("config", {}), accounting=accounting,
                  **more).to_dict()


WINDOWS, WINDOW_TOKENS = 8, 511
DIFFICULTY = (0.7, 1.3, 0.9, 1.1, 0.8, 1.2, 1.05, 0.95)  # per window, mean 1: shared by every method


def window_nll(value: float, method: str) -> list[float]:
    """Per-window NLL sums whose perplexity is exactly ``value``: a difficulty every method shares plus a small
    method-specific jitter summing to zero, so paired differences are tight and the intervals real."""
    jitter = [0.02 * ((i + len(method)) % 3 - 1) for i in range(WINDOWS)]
    jitter = [j - sum(jitter) / WINDOWS for j in jitter]
    return [math.log(value) * WINDOW_TOKENS * (d + j) for d, j in zip(DIFFICULTY, jitter)]


def throughput_extra(value: float, tokens: int) -> dict:
    """Per-repeat seconds (median matching ``value``) of one interleaved session, as tasks/throughput.py records."""
    median = tokens / value
    seconds = [median * 0.97, median, median * 1.04]
    rates = sorted(tokens / s for s in seconds)
    return {"repeats": 3, "seconds": seconds, "session": "s1",
            "tok_s": {"median": rates[1], "q1": (rates[0] + rates[1]) / 2, "q3": (rates[1] + rates[2]) / 2}}


def perplexity(method: str, ratio: float, task: str = "wikitext2") -> float:
    base = 20.0 if task == "wikitext2" else 25.0
    return base * (1 + QUALITY[method] * ratio * 10) if method != "dense" else base


def accuracy(method: str, ratio: float, task: str) -> float:
    return round(max(0.25, 0.6 - 0.02 * ZERO_SHOT.index(task) - 0.03 * QUALITY[method] * ratio), 4)


def zero_shot_metrics(task: str) -> tuple[str, ...]:
    """lm-eval reports ``acc_norm`` for every zero-shot task but winogrande."""
    return ("acc",) if task == "winogrande" else ("acc", "acc_norm")


def method_info(method: str) -> dict:
    """What ``Method.describe()`` records for ``method`` in the manifest."""
    config = QUANT_CONFIGS.get(method, {})
    info = {"description": f"synthetic {method}", "config": config, "uses_ratio": method != "hqq",
            "bits": config.get("bits")}
    if method in COMPONENTS:
        info["components"] = dict(COMPONENTS[method])
    return info


def task_info(task: str) -> dict:
    """What ``Task.describe()`` records for ``task`` in the manifest."""
    if task in PERPLEXITY_TASKS:
        metrics = {"perplexity": ("perplexity", False, "")}
    elif task in ZERO_SHOT:
        metrics = {m: ("accuracy", True, "") for m in zero_shot_metrics(task)}
    else:
        metrics = THROUGHPUT_METRICS
    info = {"description": f"synthetic {task}",
            "metrics": {name: {"kind": kind, "higher_is_better": hib, "unit": unit}
                        for name, (kind, hib, unit) in metrics.items()}}
    if task in AVERAGE["members"]:
        info["average"] = copy.deepcopy(AVERAGE)
    return info


def synthetic_results(methods=("svd", "asvd", "svdllm_w", "svdllm_u", "svdllm"), ratios=(0.2, 0.4, 0.6),
                      zero_shot=True, budgets=True, quantized=True, throughput=True) -> dict:
    records = []
    rows = [("dense", 0.0)] + [(m, r) for m in methods for r in ratios]
    for method, ratio in rows:
        for task in PERPLEXITY_TASKS:
            value = perplexity(method, ratio, task)
            records.append(_record(method, ratio, task, "perplexity", value, False,
                                   extra={"window_nll": window_nll(value, method), "window_tokens": WINDOW_TOKENS}))
        if zero_shot:
            for task in ZERO_SHOT:
                acc = accuracy(method, ratio, task)
                records.append(_record(method, ratio, task, "acc", acc, True, extra={"stderr": 0.01}))
                if "acc_norm" in zero_shot_metrics(task):
                    records.append(_record(method, ratio, task, "acc_norm", acc + 0.01, True,
                                           extra={"stderr": 0.011}))
    if budgets:
        for budget, ratio in ((0.9, 0.12), (0.75, 0.3)):
            for method in ("svd", "svdllm_w"):
                nbytes = int(DENSE_BYTES * budget) - 1000
                fit = {"budget": budget, "spec": str(budget), "ratio": ratio, "bytes": nbytes,
                       "budget_bytes": int(DENSE_BYTES * budget), "builds": 12, "refine_in_search": False,
                       "tolerance": 1e-3}
                records.append(_record(method, ratio, "wikitext2", "perplexity", perplexity(method, ratio), False,
                                       nbytes=nbytes, budget=budget, budget_fit=fit))
    quantizers = ("svdllm_quant", "hqq") if quantized else ()
    if quantized:
        for bits in (2, 3, 4):
            nbytes = int(DENSE_BYTES * (0.3 + 0.05 * bits))
            records.append(_record("svdllm_quant", 0.2, "wikitext2", "perplexity", 30.0 + 40 / bits, False,
                                   nbytes=nbytes, bits=bits, config={**QUANT_CONFIGS["svdllm_quant"], "bits": bits}))
            # hqq removes no parameters: the executor evaluates it once, at ratio 0
            nbytes = int(DENSE_BYTES * (0.35 + 0.06 * bits))
            records.append(_record("hqq", 0.0, "wikitext2", "perplexity", 22.0 + 60 / bits**2, False,
                                   params=DENSE_PARAMS, nbytes=nbytes, bits=bits,
                                   config={**QUANT_CONFIGS["hqq"], "bits": bits},
                                   accounting={"params": DENSE_PARAMS, "bytes": nbytes, "dense_params": DENSE_PARAMS,
                                               "dense_bytes": DENSE_BYTES, "params_removed": 0.0}))
    tasks = [*PERPLEXITY_TASKS, *(ZERO_SHOT if zero_shot else ())]
    if throughput:
        tasks.append("throughput")
        for method, ratio in rows:
            for batch in (1, 4):
                point = {"batch_size": batch, "prompt_len": 128, "decode_len": 32, "path": "eager"}
                speed = 1 + ratio * (0.5 + 0.25 * batch) * (1 - 0.05 * len(method)) if method != "dense" else 1.0
                for metric, base, tokens in (("prefill_tok_s", 400.0 * batch, batch * 128),
                                             ("decode_tok_s", 20.0 * batch, batch * 32)):
                    records.append(_record(method, ratio, "throughput", metric, base * speed, True, point=dict(point),
                                           extra=throughput_extra(base * speed, tokens)))
                records.append(_record(method, ratio, "throughput", "peak_mem_mb", 600.0 - 300 * ratio, False,
                                       point=dict(point), extra={"repeats": 3}))
    run_methods = [*methods, *quantizers]
    described = {m: method_info(m) for m in run_methods}
    manifest = {
        "config": {"model": MODEL, "methods": list(run_methods), "ratios": list(ratios),
                   "budgets": ["0.9", "0.75"] if budgets else [], "tasks": tasks, "seqlen": 512, "limit": 2,
                   "batch_size": 1, "device": "cpu", "dtype": "float32",
                   "calibration": {"dataset": "wikitext2", "samples": 8, "seqlen": 512, "seed": 3},
                   "method_options": {}, "plugins_dirs": [], "out": "x"},
        "model": {"name": MODEL, "identity": "abc123", "params": DENSE_PARAMS, "bytes": DENSE_BYTES},
        "ratio_definition": "fraction of each compressed matrix's parameters removed: rank = floor(m*n*(1-ratio)/(m+n))",
        "methods": described,
        "method_configs": {m: info["config"] for m, info in described.items()},
        "tasks": {t: task_info(t) for t in tasks},
        "versions": {"svdbench": "0.1.0"}, "timings": {"total": 1.0},
    }
    return {"manifest": manifest, "records": records, "compressions": {}, "failures": [], "previous_records": []}


def degraded(data: dict, method: str, factor: float = 1.5) -> dict:
    """A copy of ``data`` with every perplexity of ``method`` multiplied by ``factor`` (every window's too)."""
    data = copy.deepcopy(data)
    for r in data["records"]:
        if r["method"] == method and r["metric"] == "perplexity":
            r["value"] *= factor
            if "window_nll" in r["extra"]:
                r["extra"]["window_nll"] = [nll + math.log(factor) * r["extra"]["window_tokens"]
                                            for nll in r["extra"]["window_nll"]]
    return data
