"""Markdown and CSV tables rendered from a results.json dictionary.

Every table is built from the run's records (never from a previous report)
as a pandas DataFrame - records -> frame -> pivot - and kept as a
:class:`Table` of raw values; Markdown formats them for reading and the CSV
keeps them exact. A table appears only when the run's records support it:

- ``table1``: SVD-LLM Table-1 layout, a row per (method, ratio), perplexity
  and zero-shot accuracy columns and the tasks' declared average;
- ``zeroshot``: every accuracy metric with its stderr;
- ``ablation``: SVD-LLM Table 4, the methods that declare their components
  (transform, update);
- ``budget``: SVD-LLM Table 7, methods at equal memory (records with a budget);
- ``quantization``: SVD-LLM Table 8, bits, bytes and quality of quantized rows
  beside the dense model and the unquantized rows at the same ratios;
- ``throughput``: tokens/s, speed-up over dense and memory per grid point;
- ``allocation``: rank-allocation rules side by side at equal parameters
  (SVD-LLM V2's ablation): every rule's summed normalized loss, which the
  allocating method records in its facts, and the perplexity of each rule the
  records evaluated;
- ``methods``: every method's paper, defaults and deviations (the notes the
  method classes declare).
"""

from __future__ import annotations

import math

import pandas as pd

from bench import DENSE, format_budget
from reports import stats
from reports.format import Table, fmt
from reports.kv import kv_table
from reports.records import (
    QUALITY_KINDS,
    ablation_components,
    average_groups,
    dtype_bits,
    frame,
    label_rank,
    task_order,
)

ARROW = {True: "↑", False: "↓", None: ""}
DIRECTION = "↓ lower is better, ↑ higher is better."


def _plain(value):
    """A DataFrame cell as a plain Python value (NaN of a missing cell -> None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):
        value = value.item()
    return value


# ---------------------------------------------------------------- settings notes
def settings_note(manifest: dict) -> str:
    """One line with the ratio definition and the evaluation and calibration settings."""
    config = manifest.get("config", {})
    calib = config.get("calibration", {})
    limit = config.get("limit")
    return (f"Ratio = {manifest.get('ratio_definition') or 'fraction of each compressed matrix’s parameters removed'}; "
            "params (M) and MiB count the whole model (embeddings, lm_head and norms included). "
            f"Evaluation: seqlen {config.get('seqlen')}, "
            f"{'first ' + str(limit) + ' windows/examples per task' if limit else 'full test sets'}, "
            f"{config.get('dtype')} on {config.get('device')}. Calibration: {calib.get('samples')} x "
            f"{calib.get('seqlen')} tokens of {calib.get('dataset')} (seed {calib.get('seed')}). {DIRECTION}")


def settings_lines(manifest: dict, records: list[dict] | None = None) -> list[str]:
    """The report's settings; ``records`` add what the evaluation measured about itself (lower precision)."""
    config = manifest.get("config", {})
    calib = config.get("calibration", {})
    model = manifest.get("model", {})
    return [
        f"- Model: `{model.get('name')}` ({model.get('params', 0) / 1e6:.1f}M parameters, "
        f"{model.get('bytes', 0) / 2**20:.1f} MiB; identity `{str(model.get('identity', ''))[:16]}`)"
        + (f"; {model['note']}" if model.get("note") else ""),
        f"- Ratio: {manifest.get('ratio_definition', '')}. Embeddings, lm_head and norms are never compressed but "
        "count in params and MiB.",
        *_structure_lines(model),
        f"- Evaluation: seqlen {config.get('seqlen')}, "
        f"{'first ' + str(config['limit']) + ' windows/examples per task' if config.get('limit') else 'full test sets'}, "
        f"dtype {config.get('dtype')}, device {config.get('device')}.",
        *_precision_lines(records or []),
        *interval_lines(records or []),
        f"- Calibration: {calib.get('samples')} x {calib.get('seqlen')} tokens of {calib.get('dataset')} "
        f"(seed {calib.get('seed')}).",
        *_thread_lines(manifest.get("threads")),
        f"- {DIRECTION}",
    ]


def _structure_lines(model: dict) -> list[str]:
    """What svdbench changed in the model's layers on load so that every matrix is a target (MoE experts, Conv1D)."""
    lines = []
    experts = model.get("experts")
    if experts:
        lines.append(f"- Mixture of experts: {experts.get('expert_matrices', 0)} expert matrices in "
                     f"{experts.get('modules', 0)} MoE layers, each compressed (and quantized) like any other "
                     "linear; the routers stay dense.")
        left = experts.get("left_fused") or {}
        if left:
            name, reason = next(iter(left.items()))
            lines.append(f"- Left dense: the experts of {len(left)} MoE layers (e.g. `{name}`: {reason}); they are "
                         "not compressed.")
    if model.get("conv1d_as_linear"):
        lines.append(f"- {model['conv1d_as_linear']} Conv1D projections (GPT-2 style) are compressed as the linears "
                     "they are (`x @ W + b`).")
    return lines


def _precision_lines(records: list[dict]) -> list[str]:
    """How far a bfloat16/float16 evaluation's perplexity lies from float32 on the same weights."""
    checks = [(r.get("extra") or {}).get("float32_check") for r in records]
    checks = [c for c in checks if c and math.isfinite(c.get("relative_difference", math.nan))]
    if not checks:
        return []
    low, high = (f(c["relative_difference"] for c in checks) for f in (min, max))
    windows = sorted({c["windows"] for c in checks})
    return [f"- {checks[0]['dtype']} evaluation vs float32 on the same weights: perplexity {100 * low:+.3f}% to "
            f"{100 * high:+.3f}% ({len(checks)} evaluations, their first {'/'.join(map(str, windows))} windows)."]


WIDE_ACCURACY = 0.2  # an accuracy interval wider than this ranks nothing


def interval_lines(records: list[dict]) -> list[str]:
    """How the intervals are computed, how many windows/examples they rest on, and a warning when every
    accuracy interval is too wide to rank anything."""
    items: dict[str, dict[str, set]] = {"perplexity": {}, "accuracy": {}}
    widths = []
    for r in records:
        found = stats.evidence(r)
        if found is None or r.get("budget") is not None:
            continue
        items[found.kind].setdefault(r["task"], set()).add(found.items)
        if found.kind == "accuracy":
            low, high = stats.interval(found)
            widths.append(high - low)
    if not any(items.values()):
        return []
    rest = "; ".join(f"{what} per task: " + ", ".join(f"{task} {'/'.join(map(str, sorted(n)))}"
                                                      for task, n in tasks.items())
                     for what, tasks in (("windows", items["perplexity"]), ("examples", items["accuracy"])) if tasks)
    lines = [f"- Intervals and significance marks: {stats.method_text()}. They rest on {rest}."]
    if widths and min(widths) > WIDE_ACCURACY:
        lines.append(f"- **Too few examples to rank by accuracy**: every accuracy interval is wider than "
                     f"{WIDE_ACCURACY} (narrowest {min(widths):.2f}); raise --limit before reading the accuracy "
                     "columns as a ranking.")
    return lines


def _thread_lines(threads: dict | None) -> list[str]:
    if not threads or "threads" not in threads:
        return []
    return [f"- CPU: {threads.get('torch_threads', threads['threads'])} torch threads ({threads.get('threads_source')}), "
            f"OpenMP wait policy {threads.get('wait_policy')}."]


# ---------------------------------------------------------------- selections
def quality(df: pd.DataFrame, quantized: bool = False) -> pd.DataFrame:
    """Fixed-ratio quality rows: no budget search, no speed or memory; quantized rows only if asked."""
    chosen = df[df["budget"].isna() & df["kind"].isin(QUALITY_KINDS)]
    return chosen if quantized else chosen[chosen["bits"].isna()]


def _column_name(task: str, metric: str, higher_is_better) -> str:
    return f"{task} {metric} {ARROW[higher_is_better]}".strip()


def _directions(df: pd.DataFrame) -> dict[tuple[str, str], bool | None]:
    return {(t, m): h for t, m, h in df[["task", "column", "higher_is_better"]].itertuples(index=False)}


def averaged_metric(data: dict) -> dict[str, str]:
    """task -> the metric its declared average uses."""
    return {task: group["metric"] for group in average_groups(data).values() for task in group["members"]}


def main_columns(df: pd.DataFrame, data: dict) -> list[tuple[str, str]]:
    """Table-1 columns (task, column): perplexities, then each accuracy task's averaged metric (all of them if none
    is), then others."""
    pairs = set(df[["task", "column", "kind"]].itertuples(index=False, name=None))
    averaged = averaged_metric(data)
    has_averaged = {t for t, m, _ in pairs if averaged.get(t) == m}
    keep = {(t, m, k) for t, m, k in pairs if k != "accuracy" or t not in has_averaged or averaged[t] == m}
    order = task_order(data)
    return [(t, m) for t, m, k in sorted(keep, key=lambda p: (p[2] != "perplexity", order.index(p[0])
                                                               if p[0] in order else len(order), p[1]))]


def _average_label(metric: str, present: int, total: int) -> str:
    return f"avg {metric} ↑" if present == total else f"avg {metric} ({present}/{total}) ↑"


def _averages(df: pd.DataFrame, data: dict) -> list[tuple[str, str, list[str], int]]:
    """(label, metric, members present, members declared) of every declared average the records support."""
    out = []
    for group in average_groups(data).values():
        metric = group["metric"]
        present = [t for t in group["members"] if ((df["task"] == t) & (df["column"] == metric)).any()]
        if present:
            out.append((_average_label(metric, len(present), len(group["members"])), metric, present,
                        len(group["members"])))
    return out


def _sorted_index(pivot: pd.DataFrame, data: dict) -> list[tuple]:
    """(label, ratio) keys: dense first, then by ratio, then in the run's method order."""
    rank = label_rank(data)
    return sorted(pivot.index, key=lambda k: (k[0] != DENSE, k[1], rank(k[0])))


def wide(df: pd.DataFrame, index: list[str] | str, columns: list[str] | str, values: str = "value") -> pd.DataFrame:
    """``df`` pivoted: a row per ``index``, a column per ``columns`` (the last record wins; NaN values kept)."""
    index = [index] if isinstance(index, str) else index
    columns = [columns] if isinstance(columns, str) else columns
    table = df.drop_duplicates(subset=index + columns, keep="last").set_index(index + columns)[values]
    return table.unstack(columns)


def _pivot(df: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    return wide(df, index, ["task", "column"])


def _sizes(df: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    return df.groupby(index, dropna=False)[["params", "bytes"]].first()


def _size_cells(sizes: pd.DataFrame, key) -> list:
    params, nbytes = sizes.loc[key, "params"], sizes.loc[key, "bytes"]
    return [round(float(params) / 1e6, 2), round(float(nbytes) / 2**20, 1)]


def _cell(pivot: pd.DataFrame, key, column) -> float | None:
    return _plain(pivot.loc[key, column]) if column in pivot.columns else None


# ---------------------------------------------------------------- tables
def _evidence_of(records: pd.DataFrame, index: list[str]) -> dict:
    """(index..., (task, column)) -> the record's per-item numbers (``None`` when it kept none)."""
    return {(*key, (task, column)): stats.evidence({"extra": extra})
            for *key, task, column, extra in records[[*index, "task", "column", "extra"]].itertuples(index=False)}


def significance_marks(keys: list[tuple], values: dict, parts: dict, higher_is_better: bool | None) -> dict:
    """key -> "best" | "tied" | "" for the rows ``keys`` of one column at one ratio: the best value, and every
    row whose paired 95% difference from the best includes zero; rows without per-item numbers get no mark."""
    known = [k for k in keys if isinstance(values.get(k), (int, float)) and math.isfinite(values[k])]
    if len(known) < 2 or higher_is_better is None:
        return {}
    best = (max if higher_is_better else min)(known, key=lambda k: values[k])
    if not parts.get(best):
        return {}
    marks = {best: "best"}
    for key in known:
        if key != best and parts.get(key):
            marks[key] = "" if stats.difference(parts[best], parts[key]).significant else "tied"
    return marks


def _marked(text: str, mark: str | None) -> str:
    return f"**{text}**" if mark == "best" else f"*{text}*" if mark == "tied" else text


def _with_interval(value: float | None, parts: list | None) -> str:
    if value is None:
        return "-"
    if not parts:
        return fmt(value)
    low, high = stats.interval(parts)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def main_table(data: dict, df: pd.DataFrame) -> Table | None:
    """Table-1 layout: a row per (method, ratio), a column per task metric and the declared averages.

    Per ratio and column the best value is bold and every value not significantly different from it (paired
    bootstrap, 95%) italic; averages carry their 95% interval."""
    records = quality(df)
    if records.empty:
        return None
    cols = main_columns(records, data)
    hib = _directions(records)
    averages = _averages(records, data)
    pivot, sizes = _pivot(records, ["label", "ratio"]), _sizes(records, ["label", "ratio"])
    evidence = _evidence_of(records, ["label", "ratio"])
    header = ["method", "ratio", "params (M)", "MiB"] + [_column_name(t, m, hib[(t, m)]) for t, m in cols]
    header += [label for label, *_ in averages]
    keys = _sorted_index(pivot, data)
    values: dict = {}
    parts: dict = {}
    for key in keys:
        for c in cols:
            values[(key, c)] = _cell(pivot, key, c)
            found = evidence.get((*key, c))
            parts[(key, c)] = [found] if found is not None else None
        for label, metric, present, _ in averages:
            member = [_cell(pivot, key, (t, metric)) for t in present]
            values[(key, label)] = sum(member) / len(member) if all(v is not None for v in member) else None
            found = [evidence.get((*key, (t, metric))) for t in present]
            parts[(key, label)] = found if all(f is not None for f in found) else None
    columns = [*cols, *(label for label, *_ in averages)]
    marks: dict = {}
    for ratio in dict.fromkeys(k[1] for k in keys):
        at_ratio = [k for k in keys if k[1] == ratio]
        for c in columns:
            direction = hib[c] if c in hib else True  # averages are of accuracies
            found = significance_marks([(k, c) for k in at_ratio], values, parts, direction)
            marks.update(found)
    rows, display, csv_rows = [], [], []
    for key in keys:
        head = [key[0], key[1], *_size_cells(sizes, key)]
        rows.append(head + [values[(key, c)] for c in columns])
        bounds = [stats.interval(parts[(key, c)]) if parts[(key, c)] else (None, None) for c in columns]
        csv_rows.append(rows[-1] + [bound for pair in bounds for bound in pair])
        cells = []
        for c in columns:
            value = values[(key, c)]
            text = _with_interval(value, parts[(key, c)]) if c not in cols else fmt(value)
            cells.append(_marked(text, marks.get((key, c))) if value is not None else "-")
        display.append(head + cells)
    notes = [settings_note(data.get("manifest", {})),
             "Perplexity: exp(mean token NLL) over non-overlapping windows (unitless). Accuracy: fraction of "
             "examples correct (0-1), zero-shot.",
             "**Bold**: the best value at its ratio; *italic*: not significantly different from it (paired "
             f"bootstrap over the same windows/examples, 95%, {stats.RESAMPLES} resamples, seed {stats.SEED}); "
             "unmarked: significantly worse (or no per-window/example data to test). Averages: [95% interval]; table1.csv "
             "has every value's interval."]
    for label, metric, present, total in averages:
        notes.append(f"{label[:-2]}: plain mean of `{metric}` over {', '.join(present)}"
                     + ("" if len(present) == total else
                        f" ({len(present)} of the {total} tasks the average is defined over); not directly "
                        "comparable with the full average") + ".")
    csv_header = header + [f"{name} 95% {end}" for name in header[4:] for end in ("low", "high")]
    return Table("table1", "Results (methods x ratios, SVD-LLM Table-1 layout)", header, rows, notes, display=display,
                 csv_header=csv_header, csv_rows=csv_rows)


def zeroshot_table(data: dict, df: pd.DataFrame) -> Table | None:
    """Every accuracy metric with its standard error, when a task reports more than one."""
    records = quality(df)
    records = records[records["kind"] == "accuracy"]
    if records.empty or records.groupby("task")["column"].nunique().max() < 2:
        return None
    order = task_order(data)
    cols = sorted(set(records[["task", "column"]].itertuples(index=False, name=None)),
                  key=lambda tm: (order.index(tm[0]) if tm[0] in order else len(order), tm[1]))
    pivot = _pivot(records, ["label", "ratio"])
    errors = wide(records, ["label", "ratio"], ["task", "column"], "stderr")
    header = ["method", "ratio"] + [f"{t} {m} ↑" for t, m in cols]
    rows, csv_rows = [], []
    for key in _sorted_index(pivot, data):
        row, csv_row = [key[0], key[1]], [key[0], key[1]]
        for c in cols:
            value = _cell(pivot, key, c)
            stderr = _cell(errors, key, c)
            row.append(f"{fmt(value)} ± {fmt(stderr)}" if isinstance(stderr, float) else value)
            csv_row += [value, stderr]
        rows.append(row)
        csv_rows.append(csv_row)
    notes = [settings_note(data.get("manifest", {})),
             "lm-eval zero-shot accuracy (fraction correct, 0-1) ± its standard error; `acc_norm` normalizes each "
             "choice's log-likelihood by its length in bytes."]
    csv_header = ["method", "ratio"] + [f"{t} {m}{suffix}" for t, m in cols for suffix in ("", " stderr")]
    return Table("zeroshot", "Zero-shot accuracy, every metric", header, rows, notes,
                 csv_header=csv_header, csv_rows=csv_rows)


def ablation_table(data: dict, df: pd.DataFrame) -> Table | None:
    """SVD-LLM Table 4: the methods that declare their components, perplexity per ratio."""
    components = ablation_components(data)
    records = quality(df)
    records = records[(records["kind"] == "perplexity") & records["method"].isin(list(components))]
    present = [m for m in components if (records["method"] == m).any()]
    if len(present) < 2:
        return None
    order = task_order(data)
    cols = sorted(set(records[["task", "ratio"]].itertuples(index=False, name=None)),
                  key=lambda tr: (order.index(tr[0]) if tr[0] in order else len(order), tr[1]))
    values = wide(records, "method", ["task", "ratio"])
    extras = wide(records, "method", ["task", "ratio"], "extra")
    parts = list(dict.fromkeys(part for m in present for part in components[m]))
    header = ["method", *parts] + [f"{t} ppl ↓ @ {ratio:.0%}" for t, ratio in cols]
    rows = [[m, *[components[m].get(p, "-") for p in parts], *[_cell(values, m, c) for c in cols]] for m in present]
    marks: dict = {}
    for c in cols:  # per column: the best perplexity and what is not significantly different from it
        found = {(m, c): stats.evidence({"extra": _cell(extras, m, c) or {}}) for m in present}
        marks.update(significance_marks([(m, c) for m in present], {(m, c): _cell(values, m, c) for m in present},
                                        {k: [v] if v is not None else None for k, v in found.items()}, False))
    display = [[*row[:1 + len(parts)], *[_marked(fmt(v), marks.get((row[0], c))) for v, c in
                                          zip(row[1 + len(parts):], cols)]] for row in rows]
    notes = [settings_note(data.get("manifest", {})),
             "transform: the right transform S applied before the SVD (whitening = Cholesky of the calibration gram); "
             "update: the sequential LoRA update of the factors. Perplexity is unitless. **Bold**: the best of a "
             "column; *italic*: not significantly different from it (paired bootstrap, 95%)."]
    return Table("ablation", "Ablation (SVD-LLM Table 4): truncation-aware whitening and parameter update",
                 header, rows, notes, percent=(), display=display)


def budget_table(data: dict, df: pd.DataFrame) -> Table | None:
    """SVD-LLM Table 7: at each memory budget, the ratio each method needed and its quality."""
    records = df[df["budget"].notna() & df["kind"].isin(QUALITY_KINDS)]
    if records.empty:
        return None
    cols = main_columns(records, data)
    hib = _directions(records)
    pivot = _pivot(records, ["budget", "label", "ratio"])
    sizes = _sizes(records, ["budget", "label", "ratio"])
    rank = label_rank(data)
    keys = sorted(pivot.index, key=lambda k: (-float(k[0]), rank(k[1])))
    header = ["budget", "method", "ratio", "params (M)", "MiB"] + [_column_name(t, m, hib[(t, m)]) for t, m in cols]
    rows = [[format_budget(k[0]), k[1], k[2], *_size_cells(sizes, k), *[_cell(pivot, k, c) for c in cols]]
            for k in keys]
    evidence = _evidence_of(records, ["budget", "label", "ratio"])
    marks: dict = {}
    for budget in dict.fromkeys(k[0] for k in keys):  # methods at one budget are compared at equal memory
        at_budget = [k for k in keys if k[0] == budget]
        for c in cols:
            found = {(k, c): evidence.get((*k, c)) for k in at_budget}
            marks.update(significance_marks([(k, c) for k in at_budget], {(k, c): _cell(pivot, k, c) for k in at_budget},
                                            {key: [v] if v is not None else None for key, v in found.items()}, hib[c]))
    display = [[*row[:5], *[_marked(fmt(v), marks.get((k, c))) for v, c in zip(row[5:], cols)]]
               for k, row in zip(keys, rows)]
    notes = [settings_note(data.get("manifest", {})),
             "Each method takes the smallest ratio whose compressed model fits the budget (bytes as held in memory, "
             "whole model); ratio is the one it needed. Methods in one budget group are compared at equal memory: "
             "**bold** the best of the group, *italic* not significantly different from it (paired bootstrap, 95%)."]
    return Table("budget", "Equal memory budget (SVD-LLM Table 7)", header, rows, notes, display=display)


def quantization_table(data: dict, df: pd.DataFrame) -> Table | None:
    """SVD-LLM Table 8: quantized models beside the dense model and the unquantized rows at the same ratios."""
    records = quality(df, quantized=True).copy()
    quantized = records[records["bits"].notna()]
    if quantized.empty:
        return None
    removes = (records["method"] == DENSE) | (records["params_removed"].fillna(1.0) > 0)
    ratios = set(quantized[(quantized["ratio"] > 0) & removes[quantized.index]]["ratio"])
    chosen = records[records["bits"].notna() | (records["method"] == DENSE) | records["ratio"].isin(ratios)].copy()
    # a quantizer alone removes no parameters: its ratio is moot and one row stands for all of them
    chosen["row_ratio"] = chosen["ratio"].where(removes[chosen.index], -1.0)
    perplexity = chosen[chosen["kind"] == "perplexity"]
    cols = main_columns(perplexity if not perplexity.empty else chosen, data)
    hib = _directions(chosen)
    pivot = _pivot(chosen, ["label", "row_ratio"])
    sizes = _sizes(chosen, ["label", "row_ratio"])
    bits = chosen.groupby(["label", "row_ratio"])["bits"].first()
    full_bits = dtype_bits(data)
    header = ["method", "ratio", "bits", "params (M)", "MiB"] + [_column_name(t, m, hib[(t, m)]) for t, m in cols]
    rows = []
    for key in pivot.index:
        row_bits = _plain(bits.loc[key])
        rows.append([key[0], None if key[1] < 0 else key[1], int(row_bits) if row_bits is not None else full_bits,
                     *_size_cells(sizes, key), *[_cell(pivot, key, c) for c in cols]])
    rows.sort(key=lambda row: -row[4])
    notes = [settings_note(data.get("manifest", {})),
             "bits: weight bits of the quantized factors (others stay in the run's dtype); MiB counts packed weights, "
             "scales and zero points plus the unquantized embeddings, lm_head and norms. Rows sorted by memory; "
             "ratio '-': the model keeps every parameter (quantization alone)."]
    return Table("quantization", "SVD and quantization (SVD-LLM Table 8)", header, rows, notes)


def _spread_text(value: float | None, extra: dict) -> str:
    """A throughput figure with its interquartile range over repeats."""
    spread = (extra or {}).get("tok_s")
    if value is None or not isinstance(spread, dict):
        return fmt(value)
    return f"{fmt(value)} (IQR {fmt(spread['q1'])}-{fmt(spread['q3'])})"


def speedup(extra: dict, dense_extra: dict) -> tuple[float, float, float] | None:
    """(speed-up, 95% low, high) of a throughput record over the dense one, from their per-repeat seconds:
    paired by round when both were measured in one interleaved session."""
    seconds, dense_seconds = (extra or {}).get("seconds"), (dense_extra or {}).get("seconds")
    if not seconds or not dense_seconds:
        return None
    paired = extra.get("session") is not None and extra.get("session") == dense_extra.get("session")
    return stats.ratio_interval(seconds, dense_seconds, paired=paired)


def _measured_on(extra: dict) -> str:
    shared = (extra or {}).get("architecture")
    if not isinstance(shared, dict):
        return "itself"
    count = len(shared.get("models") or [])
    return f"{shared.get('measured_on')} ({count} model{'s' if count != 1 else ''}, {str(shared.get('signature'))[:8]})"


def throughput_table(data: dict, df: pd.DataFrame) -> Table | None:
    """Tokens/s and memory per grid point, with the speed-up over the dense model at the same point."""
    records = df[df["kind"].isin(["throughput", "memory"])].copy()
    if records.empty:
        return None
    metrics = sorted(set(records["metric"]), key=lambda m: (
        records.loc[records["metric"] == m, "kind"].iloc[0] != "throughput", m))
    speed = [m for m in metrics if (records.loc[records["metric"] == m, "kind"] == "throughput").all()]
    hib = {m: h for m, h in records[["metric", "higher_is_better"]].itertuples(index=False)}
    records["budget_key"] = records["budget"].map(lambda b: -1.0 if b is None or b != b else float(b))
    index = ["label", "ratio", "point", "budget_key"]
    pivot = wide(records, index, "metric")
    extras = wide(records, index, "metric", "extra")
    sizes = records.groupby(index)["bytes"].first()
    dense = wide(records[records["method"] == DENSE], "point", "metric")
    dense_extra = wide(records[records["method"] == DENSE], "point", "metric", "extra")
    header = ["method", "ratio", "grid", "MiB", "measured on"] + [f"{m} {ARROW[hib[m]]}".strip() for m in metrics] \
        + [f"{m} speed-up ↑" for m in speed]
    rank = label_rank(data)
    rows, display = [], []
    for key in sorted(pivot.index, key=lambda k: (k[2], k[0] != DENSE, k[1], rank(k[0]))):
        label, ratio, point, budget = key
        name = label if budget < 0 else f"{label} @ {format_budget(budget)}"
        values = [_cell(pivot, key, m) for m in metrics]
        extra_of = {m: _cell(extras, key, m) for m in metrics}
        ups, up_cells = [], []
        for m in speed:
            base = _cell(dense, point, m) if point in dense.index else None
            value = _cell(pivot, key, m)
            ups.append(value / base if value is not None and base else None)
            found = speedup(extra_of[m], _cell(dense_extra, point, m)) if point in dense_extra.index else None
            up_cells.append(f"{fmt(found[0])} [{fmt(found[1])}, {fmt(found[2])}]" if found and label != DENSE
                            else fmt(ups[-1]))
        measured = _measured_on(next((e for e in extra_of.values() if e), {}))
        head = [name, ratio, point or "-", round(float(sizes.loc[key]) / 2**20, 1), measured]
        rows.append([*head, *values, *ups])
        display.append([*head, *[_spread_text(v, extra_of[m]) if m in speed else fmt(v)
                                 for v, m in zip(values, metrics)], *up_cells])
    notes = [settings_note(data.get("manifest", {})),
             "tok/s: tokens per second (prefill: prompt tokens processed; decode: tokens generated), median of repeats "
             "after warm-up, with the interquartile range (IQR) of the repeats; *_mb: MiB (peak_mem_mb: stored weights "
             "plus the peak added while generating; kv_cache_mb: the KV cache); speed-up = compressed tok/s / dense "
             "tok/s at the same grid point, measured in the same run, with its 95% interval (bootstrap over the "
             "repeats, repeat i of the model paired with repeat i of the dense model when they were measured "
             "interleaved).",
             "measured on: models with the same architecture (every layer's type, shape, dtype and bits: the "
             "signature) share one measurement, taken on the first of them; the distinct architectures are measured "
             "together, their repeats interleaved (dense, A, B, dense, A, B, ...), so their differences are not the "
             "machine's drift."]
    return Table("throughput", "Throughput and memory", header, rows, notes, display=display)


def allocation_rules(data: dict) -> tuple[dict[tuple[str, float], dict], dict[str, str]]:
    """What allocating methods recorded: ``(method, ratio) -> {rule: summary}`` and ``compression id -> rule``.

    A method takes part by putting ``rule`` (the one it used) and ``rules``
    (``{rule: {"summed_normalized_loss": x, "params": n}}``, every rule it
    knows at that ratio) in its allocation facts. Budget searches, and
    compressions no current record refers to, are left out.
    """
    summaries: dict[tuple[str, float], dict] = {}
    used: dict[str, str] = {}
    reported = {r.get("compression") for r in data.get("records", [])}  # not those of earlier runs' records
    for compression, info in (data.get("compressions") or {}).items():
        if compression not in reported:
            continue
        allocation = (info.get("facts") or {}).get("allocation") or {}
        if not isinstance(allocation.get("rules"), dict) or "rule" not in allocation or info.get("budget"):
            continue
        summaries[(info["method"], float(info["ratio"]))] = allocation["rules"]
        used[compression] = allocation["rule"]
    return summaries, used


def allocation_table(data: dict, df: pd.DataFrame) -> Table | None:
    """Allocation rules x ratios at equal parameters: summed normalized loss, and perplexity where evaluated."""
    summaries, used = allocation_rules(data)
    if not summaries:
        return None
    methods = list(dict.fromkeys(method for method, _ in summaries))
    ratios = sorted({ratio for _, ratio in summaries})
    perplexity: dict[tuple[str, str, float, str], float] = {}
    tasks: list[str] = []
    for r in data.get("records", []):
        rule = used.get(r.get("compression"))
        if rule is None or r.get("kind") != "perplexity" or r.get("budget") is not None or r.get("bits") is not None:
            continue
        perplexity[(r["method"], rule, float(r["ratio"]), r["task"])] = r["value"]
        tasks += [r["task"]] if r["task"] not in tasks else []
    order = task_order(data)
    tasks.sort(key=lambda t: order.index(t) if t in order else len(order))
    header = ["method", "rule"] + [f"summed normalized loss ↓ @ {ratio:.0%}" for ratio in ratios] \
        + [f"{task} ppl ↓ @ {ratio:.0%}" for task in tasks for ratio in ratios]
    rows = []
    for method in methods:
        rules = list(dict.fromkeys(rule for (m, _), summary in summaries.items() if m == method for rule in summary))
        for rule in rules:
            losses = [(summaries.get((method, ratio)) or {}).get(rule, {}).get("summed_normalized_loss")
                      for ratio in ratios]
            rows.append([method, rule, *losses, *[perplexity.get((method, rule, ratio, task))
                                                  for task in tasks for ratio in ratios]])
    kept = sorted({(ratio, summary.get("params")) for (_, ratio), rules in summaries.items()
                   for summary in rules.values()})
    notes = [settings_note(data.get("manifest", {})),
             "Every rule keeps each group of same-kind matrices at the parameters of the uniform rank (target "
             "parameters kept: " + ", ".join(f"{p / 1e6:.3f}M at {ratio:.0%}" for ratio, p in kept if p) + "). "
             "Summed normalized loss: sum over matrices of sqrt(truncated / total squared singular values of the "
             "whitened matrix) at the rule's ranks, computed for every rule from the spectra; perplexity only for "
             "the rules the run evaluated ('-': not evaluated in this run)."]
    return Table("allocation", "Rank allocation rules at equal parameters (SVD-LLM V2 ablation)", header, rows, notes,
                 percent=())


def _block_of(name: str) -> int | None:
    """The decoder block a matrix belongs to: the number after ``layers.`` / ``h.`` / ``blocks.`` in its path."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def block_allocation_table(data: dict, df: pd.DataFrame) -> Table | None:
    """Where each method put its parameters: the kept fraction of every decoder block's compressed matrices,
    summarized over blocks (uniform allocations show one value; adaptive ones their spread)."""
    reported = {r.get("compression") for r in data.get("records", [])}
    rows = []
    for compression, info in (data.get("compressions") or {}).items():
        layers = info.get("layers") or {}
        if compression not in reported or not layers or info.get("budget") or not info.get("ratio"):
            continue
        kept: dict[int, list[int]] = {}
        for name, layer in layers.items():
            block = _block_of(name)
            if block is not None and layer.get("dense_params"):
                totals = kept.setdefault(block, [0, 0])
                totals[0] += layer.get("params", layer["dense_params"])
                totals[1] += layer["dense_params"]
        if len(kept) < 2:
            continue
        fractions = {block: p / d for block, (p, d) in sorted(kept.items())}
        values = sorted(fractions.values())
        dense = sum(1 for layer in layers.values() if layer.get("rank") is None)
        rows.append([info["method"], float(info["ratio"]), values[0], values[len(values) // 2], values[-1],
                     min(fractions, key=fractions.get), max(fractions, key=fractions.get), dense, len(layers)])
    if not rows or all(row[2] == row[4] for row in rows):
        return None
    order = list((data.get("manifest") or {}).get("methods") or {})
    rows.sort(key=lambda row: (row[1], order.index(row[0]) if row[0] in order else len(order), row[0]))
    header = ["method", "ratio", "kept: least block", "kept: median block", "kept: most block",
              "least-kept block", "most-kept block", "matrices left dense", "matrices"]
    notes = [settings_note(data.get("manifest", {})),
             "Kept: parameters stored for a decoder block's compressed matrices / their dense parameters (a shared "
             "basis counted once, in its first layer); uniform allocations keep every block alike, adaptive ones "
             "(importance- or loss-driven) move parameters between blocks at the same total."]
    return Table("block_allocation", "Rank allocation across blocks", header, rows, notes,
                 percent=("ratio", "kept: least block", "kept: median block", "kept: most block"))


def methods_table(data: dict, df: pd.DataFrame) -> Table | None:
    """Published vs measured, per method: its paper, the paper's defaults, svdbench's defaults and deviations."""
    methods = (data.get("manifest") or {}).get("methods") or {}
    rows = []
    for name, info in methods.items():
        notes = info.get("notes")
        if not notes:
            continue
        config = ", ".join(f"{k}={v}" for k, v in (info.get("config") or {}).items()) or "none"
        rows.append([name, notes.get("paper", ""), notes.get("paper_defaults", "") or "-", config,
                     "; ".join(notes.get("deviations") or ()) or "none"])
    if not rows:
        return None
    return Table("methods", "Method notes: published vs measured", ["method", "paper", "paper's defaults",
                                                                     "svdbench settings (this run)", "deviations"],
                 rows, ["Declared by each method class (a plugin declares its own); the settings are the run's."],
                 percent=())


TABLE_BUILDERS = (main_table, zeroshot_table, ablation_table, allocation_table, block_allocation_table, budget_table,
                  quantization_table, throughput_table, kv_table, methods_table)


def build_tables(data: dict) -> list[Table]:
    """Every table the run's records support, in report order."""
    df = frame(data)
    return [table for table in (builder(data, df) for builder in TABLE_BUILDERS) if table is not None]
