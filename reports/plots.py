"""The report's plots (matplotlib, Agg backend), drawn from results.json records.

- ``perplexity_vs_ratio.png``: perplexity (log scale) against the ratio, a
  line per method, a panel per perplexity task (plus the published LLaMA-7B
  curves with ``--with-published``);
- ``accuracy_vs_ratio.png``: the tasks' declared average accuracy against the ratio;
- ``perplexity_vs_bytes.png``: perplexity against model MiB for every
  compressed model (fixed ratios, budgets, quantized), with the Pareto front;
- ``throughput_speedup.png``: compressed / dense tokens per second against
  the ratio, a panel per throughput metric, each speed-up with its 95% interval.

A plot is written only when the records support it. Non-finite values are
left out of a plot (the tables show them) and counted in its title.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench import DENSE
from reports.published import table1_curves
from reports.records import dtype_bits, finite, frame, label_rank, task_order
from reports.tables import main_table, quality, speedup

MARKERS = "osD^v<>pP*Xh"
BUDGET = " (budget)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(labels, rank) -> dict[str, dict]:
    """A fixed colour and marker per label, in the run's method order (same in every plot of a report)."""
    ordered = sorted(set(labels) - {DENSE} - {label for label in labels if label.endswith(BUDGET)}, key=rank)
    from matplotlib import colormaps

    # ten strong colours first (the papers' methods come first), then the light tab20 shades
    colors = [f"C{i}" for i in range(10)] + [colormaps["tab20"](i) for i in range(1, 20, 2)]
    styles = {label: {"color": colors[i % len(colors)], "marker": MARKERS[i % len(MARKERS)]}
              for i, label in enumerate(ordered)}
    for label in set(labels):  # a budget point: its method's marker, hollow
        if label.endswith(BUDGET):
            base = styles.get(label[:-len(BUDGET)], {"color": "grey", "marker": "o"})
            styles[label] = {"marker": base["marker"], "facecolors": "none", "edgecolors": base["color"]}
    styles[DENSE] = {"color": "black", "marker": "*"}
    return styles


def all_styles(data: dict, with_published: bool = False) -> dict[str, dict]:
    """Styles for every label any plot of this report draws."""
    df = frame(data)
    labels = list(df["label"]) + [label + BUDGET for label in df.loc[df["budget"].notna(), "label"]]
    if with_published:
        labels += list(table1_curves())
    return _styles(labels, label_rank(data))


def _subtitle(data: dict) -> str:
    manifest = data.get("manifest", {})
    config = manifest.get("config", {})
    calib = config.get("calibration", {})
    limit = config.get("limit")
    return (f"{manifest.get('model', {}).get('name', '?')}, seqlen {config.get('seqlen')}, "
            f"{'first ' + str(limit) + ' windows/examples' if limit else 'full test sets'}; "
            f"calibration {calib.get('samples')} x {calib.get('seqlen')} {calib.get('dataset')}")


def _percent_axis(ax, ratios) -> None:
    """Ticks at the ratios measured, written as percentages."""
    from matplotlib.ticker import PercentFormatter

    ax.set_xticks(sorted(set(ratios)))
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _curves(records: pd.DataFrame, values: pd.Series | None = None) -> dict[str, list[tuple[float, float]]]:
    """label -> sorted [(ratio, value)] of finite values, dense excluded."""
    values = records["value"] if values is None else values
    curves: dict[str, list[tuple[float, float]]] = {}
    for label, method, ratio, value in zip(records["label"], records["method"], records["ratio"], values):
        if method != DENSE and finite(value):
            curves.setdefault(label, []).append((ratio, value))
    return {label: sorted(points) for label, points in curves.items()}


def _figure_legend(fig, axes, fontsize: int = 8) -> None:
    """One legend for every panel, right of the plotting area, so it never hides a curve."""
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.0, 0.92))


def _wrapped(text: str, inches: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``inches`` at ``fontsize`` (about 0.55 em per character)."""
    import textwrap

    return textwrap.fill(text, max(20, int(inches * 72 / (0.55 * fontsize))))


def _titles(fig, axes, titles: list[str], suptitle: str, fontsize: float = 9) -> None:
    """Panel titles and the figure title, each wrapped to its width, so that none runs into another."""
    width = fig.get_figwidth()
    for ax, title in zip(axes, titles):
        ax.set_title(_wrapped(title, width / len(axes) * 0.8, fontsize), fontsize=fontsize)
    fig.suptitle(_wrapped(suptitle, width * 0.95, fontsize + 1), fontsize=fontsize + 1)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def perplexity_vs_ratio(data: dict, path: Path, with_published: bool = False,
                        styles: dict | None = None) -> Path | None:
    records = quality(frame(data))
    records = records[records["kind"] == "perplexity"]
    tasks = [t for t in task_order(data) if t in set(records["task"])]
    if not tasks or (records["method"] == DENSE).all():
        return None
    plt = _pyplot()
    published = table1_curves() if with_published else None
    panels = len(tasks) + (1 if published else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False, layout="constrained")
    styles = styles or all_styles(data, with_published)
    titles = []
    for ax, task in zip(axes[0], tasks):
        task_records = records[records["task"] == task]
        skipped = sum(not finite(v) for v in task_records["value"])
        for label, points in _curves(task_records).items():
            ax.plot(*zip(*points), label=label, **styles[label])
        for value in task_records.loc[task_records["method"] == DENSE, "value"]:
            if finite(value):
                ax.axhline(value, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        titles.append(f"{task} (measured)" + (f", {skipped} non-finite omitted" if skipped else ""))
        ax.set_xlabel("ratio (fraction of parameters removed)")
        ax.set_ylabel("perplexity (log scale, lower is better)")
        _percent_axis(ax, list(task_records.loc[task_records["method"] != DENSE, "ratio"]))
        ax.grid(True, which="both", alpha=0.3)
    if published:
        ax = axes[0][-1]
        for method, points in published.items():
            if method == DENSE:
                ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="dense")
            else:
                ax.plot(*zip(*points), label=method, linestyle=":", **styles[method])
        ax.set_yscale("log")
        titles.append("wikitext2 (published, LLaMA-7B, SVD-LLM Table 1)")
        ax.set_xlabel("ratio (fraction of parameters removed)")
        ax.set_ylabel("perplexity (log scale, lower is better)")
        _percent_axis(ax, [r for m, points in published.items() if m != DENSE for r, _ in points])
        ax.grid(True, which="both", alpha=0.3)
    _figure_legend(fig, axes[0])
    _titles(fig, axes[0], titles, f"Perplexity vs compression ratio - {_subtitle(data)}")
    return _save(fig, path)


def accuracy_vs_ratio(data: dict, path: Path, styles: dict | None = None) -> Path | None:
    """The first declared task average (Table 1's last column) against the ratio."""
    table = main_table(data, frame(data))
    if table is None or not table.header[-1].startswith("avg "):
        return None
    curves: dict[str, list[tuple[float, float]]] = {}
    dense = None
    for row in table.rows:
        label, ratio, value = row[0], row[1], row[-1]
        if value is None:
            continue
        if label == DENSE:
            dense = value
        else:
            curves.setdefault(label, []).append((ratio, value))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.4), layout="constrained")
    styles = styles or all_styles(data)
    rank = label_rank(data)
    for label, points in sorted(curves.items(), key=lambda kv: rank(kv[0])):
        ax.plot(*zip(*sorted(points)), label=label, **styles[label])
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    name = table.header[-1][:-2]
    ax.set_xlabel("ratio (fraction of parameters removed)")
    ax.set_ylabel(f"{name} (higher is better)")
    ax.set_title(f"{name} vs ratio\n{_wrapped(_subtitle(data), 6.2 * 0.8, 9)}", fontsize=9)
    _percent_axis(ax, [r for points in curves.values() for r, _ in points])
    ax.grid(True, alpha=0.3)
    _figure_legend(fig, [ax])
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bytes, perplexity) points no other point beats in both (smaller and better), by bytes."""
    front, best = [], math.inf
    for size, value in sorted(points, key=lambda p: (p[0], p[1])):
        if value < best:
            front.append((size, value))
            best = value
    return front


def perplexity_vs_bytes(data: dict, path: Path, styles: dict | None = None) -> Path | None:
    df = frame(data)
    records = df[df["kind"] == "perplexity"].copy()
    tasks = [t for t in task_order(data) if t in set(records["task"])]
    if not tasks or records["bytes"].nunique() < 2:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.4), squeeze=False, layout="constrained")
    records["plot_label"] = [label + (BUDGET if budget is not None and budget == budget else "")
                             for label, budget in zip(records["label"], records["budget"])]
    styles = styles or all_styles(data)
    rank = label_rank(data)
    for ax, task in zip(axes[0], tasks):
        task_records = records[(records["task"] == task) & records["value"].map(finite)]
        for label in sorted(set(task_records["plot_label"]), key=rank):
            chosen = task_records[task_records["plot_label"] == label]
            ax.scatter(chosen["bytes"] / 2**20, chosen["value"], label=label, s=36, zorder=3, **styles[label])
        front = pareto_front(list(zip(task_records["bytes"] / 2**20, task_records["value"])))
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="grey", linewidth=1.2, alpha=0.8, label="Pareto front", zorder=2)
        ax.set_yscale("log")
        ax.set_xlabel("model size (MiB, whole model)")
        ax.set_ylabel("perplexity (log scale, lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    _figure_legend(fig, axes[0])
    _titles(fig, axes[0], tasks, f"Perplexity vs memory (down-left is better) - {_subtitle(data)}; "
            f"unquantized weights in {dtype_bits(data)}-bit")
    return _save(fig, path)


def throughput_speedup(data: dict, path: Path, styles: dict | None = None) -> Path | None:
    df = frame(data)
    records = df[(df["kind"] == "throughput") & df["budget"].isna()]
    metrics = sorted(set(records["metric"]))
    dense = {(m, p): v for m, p, v, meth in zip(records["metric"], records["point"], records["value"],
                                                 records["method"]) if meth == DENSE}
    dense_extras = {(m, p): e for m, p, e, meth in zip(records["metric"], records["point"], records["extra"],
                                                       records["method"]) if meth == DENSE}
    if not metrics or not dense or (records["method"] == DENSE).all():
        return None
    grids = sorted(set(records["point"]))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.4 * len(metrics), 4.4), squeeze=False, layout="constrained")
    styles = styles or all_styles(data)
    linestyles = ["-", "--", ":", "-."]
    for ax, metric in zip(axes[0], metrics):
        for g, grid in enumerate(grids):
            base = dense.get((metric, grid))
            if not base:
                continue
            chosen = records[(records["metric"] == metric) & (records["point"] == grid)]
            for label, points in _curves(chosen, chosen["value"] / base).items():
                ax.plot(*zip(*points), label=label if g == 0 else None, linestyle=linestyles[g % len(linestyles)],
                        **styles[label])
            dense_extra = dense_extras.get((metric, grid)) or {}
            for label, method, ratio, extra in zip(chosen["label"], chosen["method"], chosen["ratio"], chosen["extra"]):
                found = speedup(extra, dense_extra) if method != DENSE else None
                if found and all(finite(v) for v in found):  # the speed-up's 95% interval
                    ax.errorbar([ratio], [found[0]], yerr=[[found[0] - found[1]], [found[2] - found[0]]], fmt="none",
                                ecolor=styles[label].get("color", "grey"), capsize=3, alpha=0.6, linewidth=1)
            if len(grids) > 1:  # one legend entry per grid point, by line style
                ax.plot([], [], color="grey", linestyle=linestyles[g % len(linestyles)], label=grid)
        ax.axhline(1.0, color="black", linestyle=(0, (1, 1)), linewidth=1, label="dense (1x)")
        ax.set_xlabel("ratio (fraction of parameters removed)")
        ax.set_ylabel("speed-up over dense (higher is better)")
        _percent_axis(ax, list(records.loc[records["method"] != DENSE, "ratio"]))
        ax.grid(True, alpha=0.3)
    _figure_legend(fig, axes[0], fontsize=7)
    grid = f" [{grids[0]}]" if len(grids) == 1 and grids[0] else ""  # one grid point: named once, not per panel
    _titles(fig, axes[0], metrics, f"Throughput speed-up vs ratio{grid} - {_subtitle(data)}")
    return _save(fig, path)


def write_plots(data: dict, out_dir: Path | str, with_published: bool = False) -> list[Path]:
    """Every plot the records support, as PNG files in ``out_dir``; returns their paths."""
    from reports.kv_plot import perplexity_vs_kv_bytes

    out_dir = Path(out_dir)
    styles = all_styles(data, with_published)
    made = [perplexity_vs_ratio(data, out_dir / "perplexity_vs_ratio.png", with_published, styles),
            accuracy_vs_ratio(data, out_dir / "accuracy_vs_ratio.png", styles),
            perplexity_vs_bytes(data, out_dir / "perplexity_vs_bytes.png", styles),
            throughput_speedup(data, out_dir / "throughput_speedup.png", styles),
            perplexity_vs_kv_bytes(data, out_dir / "perplexity_vs_kv_bytes.png", styles)]
    return [path for path in made if path is not None]
