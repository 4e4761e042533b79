"""Perplexity against KV-cache bytes per token: the KV-cache table's rows as a plot (no method named here).

Standalone (it does not import :mod:`reports.plots`, which calls it: no import circle).
"""

from __future__ import annotations

from pathlib import Path

from bench import DENSE
from reports.kv import kv_table


def perplexity_vs_kv_bytes(data: dict, path: Path, styles: dict | None = None) -> Path | None:
    """One point per (method, KV ratio) of :func:`reports.kv.kv_table`, a curve per method, dense as a star."""
    table = kv_table(data)
    if table is None:
        return None
    columns = [i for i, h in enumerate(table.header) if h.endswith("perplexity ↓")]
    if not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4), squeeze=False)
    kib = table.header.index("KV MiB / 1k tokens")
    for ax, column in zip(axes[0], columns):
        curves: dict[str, list] = {}
        for row in table.rows:
            if row[kib] is not None and row[column] is not None:
                curves.setdefault(row[0], []).append((row[kib], row[column]))
        for label, points in curves.items():
            style = {"marker": "*", "color": "black", "markersize": 12} if label == DENSE else \
                (styles or {}).get(label, {"marker": "o"})
            ax.plot(*zip(*sorted(points)), label=label, **style)
        ax.set_xlabel("KV cache, MiB per 1k tokens")
        ax.set_ylabel(table.header[column].removesuffix(" ↓") + " (lower is better)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    model = (data.get("manifest", {}).get("config", {}) or {}).get("model", "")
    fig.suptitle(f"Perplexity vs KV-cache bytes - {model}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
