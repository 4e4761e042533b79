"""The KV-cache table: methods that compress the KV cache, at their KV ratios, beside the dense model.

A row per (method, KV ratio) whose records carry a KV ratio in their
accounting (``kv_ratio``: what a KV method was asked to remove; the engine
records it with the achieved ratio and the cache bytes per token), plus the
dense model; no method is named here. Columns: the KV ratio asked and
achieved, KV-cache MiB per 1,000 cached tokens, parameters, every perplexity
the run measured, and decode tokens/s at the longest prompt of the
throughput grid (with the speed-up over dense at that point).

KV MiB per 1k tokens is *measured* where the run has a throughput record at
the long-prompt point: the cache's bytes after greedy decoding divided by
``batch x (prompt + decode)`` cached tokens; otherwise it is the
accounting's bytes per token (the model's structure).
"""

from __future__ import annotations

from bench import DENSE
from reports.format import Table

MIB = 2**20


def _long_point(records: list[dict]) -> dict | None:
    """The throughput grid point with the longest prompt (smallest batch among them)."""
    points = [r["point"] for r in records if r.get("metric") == "kv_cache_mb" and (r.get("point") or {}).get("prompt_len")]
    if not points:
        return None
    return max(points, key=lambda p: (p["prompt_len"], -p.get("batch_size", 1), p.get("path") == "eager"))


def _row_key(record: dict):
    return record["method"], float((record.get("accounting") or {}).get("kv_ratio", 0.0) or 0.0), record.get("bits")


def kv_table(data: dict, df=None) -> Table | None:
    records = data.get("records", [])
    kv_keys = {_row_key(r) for r in records if "kv_ratio" in (r.get("accounting") or {})}
    if not kv_keys:
        return None
    keys = [(DENSE, 0.0, None), *sorted(k for k in kv_keys if k[0] != DENSE)]
    point = _long_point(records)
    perplexities = list(dict.fromkeys((r["task"], r["metric"]) for r in records if r.get("kind") == "perplexity"))
    rows_of = {k: [r for r in records if _row_key(r) == k and (k[0] == DENSE) == (r["method"] == DENSE)] for k in keys}

    def at_point(rows, metric):
        return next((r for r in rows if r.get("metric") == metric and r.get("point") == point), None)

    dense_decode = at_point(rows_of[keys[0]], "decode_tok_s")
    header = ["method", "KV ratio", "KV ratio achieved", "KV MiB / 1k tokens", "params (M)",
              *[f"{task} {metric} ↓" for task, metric in perplexities]]
    if point:
        where = f"prompt {point['prompt_len']}, batch {point.get('batch_size', 1)}, {point.get('path', 'eager')}"
        header += [f"KV MiB measured ({where})", f"decode tok/s ({where}) ↑", "decode speed-up ↑"]
    rows = []
    for key in keys:
        rows_k = rows_of[key]
        if not rows_k:
            continue
        accounting = rows_k[0].get("accounting") or {}
        kv = at_point(rows_k, "kv_cache_mb")
        per_token = None
        if kv is not None:
            p = kv["point"]
            per_token = kv["extra"].get("bytes", kv["value"] * MIB) / (p.get("batch_size", 1) *
                                                                        (p["prompt_len"] + p.get("decode_len", 0)))
        elif "kv_bytes_per_token" in accounting:
            per_token = accounting["kv_bytes_per_token"]
        ppl = [next((r["value"] for r in rows_k if (r["task"], r["metric"]) == c), None) for c in perplexities]
        row = [key[0], key[1] if key[0] != DENSE else 0.0, accounting.get("kv_ratio_achieved", 0.0 if key[0] == DENSE
                                                                           else None),
               per_token * 1000 / MIB if per_token is not None else None,
               round(rows_k[0]["params"] / 1e6, 2) if rows_k[0].get("params") else None, *ppl]
        if point:
            decode = at_point(rows_k, "decode_tok_s")
            speed = decode["value"] / dense_decode["value"] if decode and dense_decode and dense_decode["value"] \
                else None
            row += [kv["value"] if kv else None, decode["value"] if decode else None, speed]
        rows.append(row)
    notes = ["KV ratio: the fraction of KV-cache bytes the method was asked to remove; achieved: from the model's "
             "structure (latent numbers per token against 2 x KV heads x head dim per layer). KV MiB / 1k tokens: "
             "measured cache bytes at the long-prompt grid point / cached tokens x 1000 where measured, else the "
             "structure's. Weights and KV cache are separate budgets: params (M) is the whole model."]
    return Table("kv_cache", "KV cache: methods at equal KV-cache bytes", header, rows, notes,
                 percent=("KV ratio", "KV ratio achieved"))
