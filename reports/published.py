"""The papers' LLaMA-7B numbers (``published.json``), printed beside measured tables.

The numbers are data with their sources (docs/PUBLISHED.md); this module only
lays them out in the shape of the measured table they accompany, labelled
"published, LLaMA-7B", and says whether the measured method ordering agrees.
They come from a 7B model on GPUs at seqlen 2048 with 256 x 2048 calibration:
compare orderings and curve shapes, not values.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

from bench import DENSE
from reports.format import markdown_table
from reports.records import frame

PUBLISHED_FILE = Path(__file__).with_name("published.json")


@functools.lru_cache(maxsize=1)
def load_published() -> dict:
    return json.loads(PUBLISHED_FILE.read_text())


def table1_curves() -> dict[str, list[tuple[float, float]]]:
    """WikiText-2 perplexity by method: [(ratio, value)], dense at ratio 0."""
    pub = load_published()
    curves: dict[str, list[tuple[float, float]]] = {DENSE: [(0.0, pub["dense"]["wikitext2"])]}
    for row in pub["table1"]["rows"]:
        curves.setdefault(row["method"], []).append((row["ratio"], row["value"]))
    return curves


def _label(title: str) -> str:
    return f"### Published, {load_published()['model']}: {title}"


def _table(header: list[str], rows: list[list]) -> str:
    return markdown_table(header, rows)


def table1_block() -> list[str]:
    pub = load_published()
    curves = table1_curves()
    ratios = sorted({r for points in curves.values() for r, _ in points if r > 0})
    header = ["method"] + [f"wikitext2 ppl ↓ @ {r:.0%}" for r in ratios]
    rows = [[DENSE] + [pub["dense"]["wikitext2"]] * len(ratios)]
    for method in (m for m in curves if m != DENSE):
        values = dict(curves[method])
        rows.append([method] + [values.get(r) for r in ratios])
    return [_label("SVD-LLM Table 1 (WikiText-2 perplexity)"), "", _table(header, rows), "",
            f"- {pub['table1']['note']}",
            f"- Original {pub['model']}: WikiText-2 {pub['dense']['wikitext2']}, C4 {pub['dense']['c4']}, "
            f"average accuracy over six tasks {pub['dense']['avg_acc']}. {pub['source']}."]


def _measured_wikitext2(data: dict) -> dict[tuple[str, float], float]:
    """This run's WikiText-2 perplexity by (method, ratio), parameter ratios only (no budgets, no bits)."""
    df = frame(data)
    chosen = df[(df["task"] == "wikitext2") & (df["kind"] == "perplexity") & df["budget"].isna() & df["bits"].isna()]
    return {(method, round(ratio, 4)): value
            for method, ratio, value in zip(chosen["method"], chosen["ratio"], chosen["value"])}


def ordering_agreement(data: dict) -> list[str]:
    """Per ratio measured in both: the measured and the published WikiText-2 orderings of the shared methods."""
    measured: dict[float, dict[str, float]] = {}
    for (method, ratio), value in _measured_wikitext2(data).items():
        measured.setdefault(ratio, {})[method] = value
    published: dict[float, dict[str, float]] = {}
    for method, points in table1_curves().items():
        for ratio, value in points:
            published.setdefault(round(ratio, 4), {})[method] = value
    lines = []
    for ratio in sorted(set(measured) & set(published)):
        shared = [m for m in measured[ratio] if m in published[ratio] and m != DENSE]
        if len(shared) < 2:
            continue
        ours = sorted(shared, key=lambda m: measured[ratio][m])
        theirs = sorted(shared, key=lambda m: published[ratio][m])
        verdict = "same order" if ours == theirs else "order differs"
        lines.append(f"- {ratio:.0%}: measured {' < '.join(ours)}; published {' < '.join(theirs)} ({verdict}).")
    if lines:
        lines.insert(0, "Ordering by WikiText-2 perplexity (best first), methods measured in both:")
    return lines


def generation_2025_block(data: dict) -> list[str]:
    """The 2025 generation's published numbers (PUBLISHED.md Part 2), each beside this run's value when measured."""
    gen = load_published()["generation_2025"]
    measured = _measured_wikitext2(data)
    rows, notes = [], []
    for row in gen["rows"]:
        note = row.get("note", "")
        if note and note not in notes:
            notes.append(note)
        mark = f" [{notes.index(note) + 1}]" if note else ""
        rows.append([row["source"] + mark, row["model"], row["method"], f"{row['ratio']:.0%}", row.get("wikitext2"),
                     row.get("c4"), row.get("avg_acc"), measured.get((row["method"], round(row["ratio"], 4)))])
    header = ["source", "model", "method", "ratio", "wikitext2 ppl ↓", "c4 ppl ↓", "avg acc ↑",
              "measured here: wikitext2 ppl ↓"]
    return ["### Published: the 2025 generation (7B-class models)", "", _table(header, rows), "",
            f"- {gen['note']}", *[f"- [{i}] {note}." for i, note in enumerate(notes, 1)]]


def ablation_block() -> list[str]:
    ab = load_published()["ablation"]
    rows = [[row["method"], row["value"]] for row in ab["rows"]]
    return [_label(f"SVD-LLM Table 4 (ablation at {ab['ratio']:.0%})"), "",
            _table(["method", f"wikitext2 ppl ↓ @ {ab['ratio']:.0%}"], rows), "", f"- {ab['note']}."]


def budget_block() -> list[str]:
    bud = load_published()["budget"]
    methods = list(dict.fromkeys(row["method"] for row in bud["rows"]))
    rows = [[f"{row['budget_gb']} GB", row["baseline"], *(row["value"] if row["method"] == m else None for m in methods)]
            for row in bud["rows"]]
    return [_label("SVD-LLM Table 7 (equal memory)"), "",
            _table(["budget", "best pruning baseline ppl ↓", *(f"{m} ppl ↓" for m in methods)], rows), "",
            f"- {bud['note']}."]


def quantization_block() -> list[str]:
    q = load_published()["quantization"]
    rows = [[row["method"], row["training"], row["memory_gb"], row["perplexity"]] for row in q["rows"]]
    return [_label("SVD-LLM Table 8 (against quantization)"), "",
            _table(["method", "training?", "memory (GB)", "wikitext2 ppl ↓"], rows), "", f"- {q['note']}."]


def throughput_block() -> list[str]:
    return [_label("throughput"), "", f"- {load_published()['throughput']['note']}"]


def blocks_beside(table_name: str, data: dict) -> list[str]:
    """Markdown lines of the published block that belongs next to measured table ``table_name``."""
    if table_name == "table1":
        agreement = ordering_agreement(data)
        return ["", *table1_block(), *([""] + agreement if agreement else []), "", *generation_2025_block(data)]
    builders = {"ablation": ablation_block, "budget": budget_block, "quantization": quantization_block,
                "throughput": throughput_block}
    return ["", *builders[table_name]()] if table_name in builders else []


def write_published_csv(path: Path) -> Path:
    """The published numbers in long form: table, model, method, ratio, metric, value, note."""
    pub = load_published()
    rows = [["table1", pub["model"], DENSE, 0.0, "wikitext2 perplexity", pub["dense"]["wikitext2"]],
            ["table1", pub["model"], DENSE, 0.0, "c4 perplexity", pub["dense"]["c4"]],
            ["table1", pub["model"], DENSE, 0.0, "avg acc (six tasks)", pub["dense"]["avg_acc"]]]
    rows += [["table1", pub["model"], r["method"], r["ratio"], "wikitext2 perplexity", r["value"]]
             for r in pub["table1"]["rows"]]
    rows += [["table4", pub["model"], r["method"], pub["ablation"]["ratio"], "wikitext2 perplexity", r["value"]]
             for r in pub["ablation"]["rows"]]
    for r in pub["other_models"]["rows"]:
        rows += [["tables2-3", r["model"], r["method"], 0.2 if r["method"] != DENSE else 0.0, "wikitext2 perplexity",
                  r["perplexity"]],
                 ["tables2-3", r["model"], r["method"], 0.2 if r["method"] != DENSE else 0.0, "avg acc (six tasks)",
                  r["avg_acc"]]]
    rows += [["table7", pub["model"], f"{r['method']} @ {r['budget_gb']} GB", None, "wikitext2 perplexity", r["value"]]
             for r in pub["budget"]["rows"]]
    rows += [["table8", pub["model"], f"{r['method']} @ {r['memory_gb']} GB", None, "wikitext2 perplexity",
              r["perplexity"]] for r in pub["quantization"]["rows"]]
    for r in pub["generation_2025"]["rows"]:
        rows += [[r["source"], r["model"], r["method"], r["ratio"], metric, r[key]]
                 for key, metric in (("wikitext2", "wikitext2 perplexity"), ("c4", "c4 perplexity"),
                                     ("avg_acc", "avg acc")) if key in r]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["table", "model", "method", "ratio", "metric", "value"])
        writer.writerows(rows)
    return path
