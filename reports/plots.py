"""The report's plots (matplotlib, Agg backend), drawn from results.json records.

- ``perplexity_vs_ratio.png``: perplexity (log scale) against the ratio, a
  line per method, a panel per perplexity task (plus the published LLaMA-7B
  curves with ``--with-published``);
- ``accuracy_vs_ratio.png``: the average zero-shot accuracy against the ratio;
- ``perplexity_vs_bytes.png``: perplexity against model MiB for every
  compressed model (fixed ratios, budgets, quantized), with the Pareto front;
- ``throughput_speedup.png``: compressed / dense tokens per second against
  the ratio, a panel per throughput metric.

A plot is written only when the records support it. Non-finite values are
left out of a plot (the tables show them) and counted in its title.
"""

from __future__ import annotations

import math
from pathlib import Path

from reports.records import (DENSE, budget_of, dtype_bits, finite, grid_of, is_throughput, method_label, method_rank,
                             metric_kind, task_rank)
from reports.tables import average_accuracy, average_tasks, quality_records

MARKERS = "osD^v<>pP*Xh"
BUDGET = " (budget)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(labels) -> dict[str, dict]:
    """A fixed colour and marker per label, in the papers' method order (same in every plot of a report)."""
    ordered = sorted(set(labels) - {DENSE} - {label for label in labels if label.endswith(BUDGET)}, key=method_rank)
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
    labels = [method_label(r) for r in data["records"]]
    labels += [method_label(r) + BUDGET for r in data["records"] if budget_of(r) is not None]
    if with_published:
        from reports.published import table1_curves

        labels += list(table1_curves())
    return _styles(labels)


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


def _curves(records: list[dict], value) -> dict[str, list[tuple[float, float]]]:
    """label -> sorted [(ratio, value)] of finite values, dense excluded."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r["method"] == DENSE:
            continue
        v = value(r)
        if finite(v):
            curves.setdefault(method_label(r), []).append((r["ratio"], v))
    return {label: sorted(points) for label, points in curves.items()}


def _figure_legend(fig, axes, fontsize: int = 8) -> None:
    """One legend for every panel, right of the plotting area, so it never hides a curve."""
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.0, 0.92))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def perplexity_vs_ratio(data: dict, path: Path, with_published: bool = False,
                        styles: dict | None = None) -> Path | None:
    records = [r for r in quality_records(data) if metric_kind(r) == "perplexity"]
    tasks = sorted({r["task"] for r in records}, key=task_rank)
    if not tasks or not any(r["method"] != DENSE for r in records):
        return None
    plt = _pyplot()
    published = None
    if with_published:
        from reports.published import table1_curves

        published = table1_curves()
    panels = len(tasks) + (1 if published else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    styles = styles or all_styles(data, with_published)
    for ax, task in zip(axes[0], tasks):
        task_records = [r for r in records if r["task"] == task]
        skipped = sum(not finite(r["value"]) for r in task_records)
        for label, points in _curves(task_records, lambda r: r["value"]).items():
            ax.plot(*zip(*points), label=label, **styles[label])
        for r in task_records:
            if r["method"] == DENSE and finite(r["value"]):
                ax.axhline(r["value"], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_title(f"{task} (measured)" + (f", {skipped} non-finite omitted" if skipped else ""))
        ax.set_xlabel("ratio (fraction of parameters removed)")
        ax.set_ylabel("perplexity (log scale, lower is better)")
        _percent_axis(ax, [r["ratio"] for r in task_records if r["method"] != DENSE])
        ax.grid(True, which="both", alpha=0.3)
    if published:
        ax = axes[0][-1]
        for method, points in published.items():
            if method == DENSE:
                ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="dense")
            else:
                ax.plot(*zip(*points), label=method, linestyle=":", **styles[method])
        ax.set_yscale("log")
        ax.set_title("wikitext2 (published, LLaMA-7B, SVD-LLM Table 1)")
        ax.set_xlabel("ratio (fraction of parameters removed)")
        ax.set_ylabel("perplexity (log scale, lower is better)")
        _percent_axis(ax, [r for m, points in published.items() if m != DENSE for r, _ in points])
        ax.grid(True, which="both", alpha=0.3)
    _figure_legend(fig, axes[0])
    fig.suptitle(f"Perplexity vs compression ratio - {_subtitle(data)}", fontsize=10)
    return _save(fig, path)


def accuracy_vs_ratio(data: dict, path: Path, styles: dict | None = None) -> Path | None:
    records = quality_records(data)
    tasks = average_tasks(records)
    if not tasks:
        return None
    rows: dict[tuple[str, float], dict] = {}
    for r in records:
        rows.setdefault((method_label(r), r["ratio"]), {})[(r["task"], r["metric"])] = r
    curves: dict[str, list[tuple[float, float]]] = {}
    dense = None
    for (label, ratio), cells in rows.items():
        value = average_accuracy(cells, tasks)
        if value is None:
            continue
        if label == DENSE:
            dense = value
        else:
            curves.setdefault(label, []).append((ratio, value))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    styles = styles or all_styles(data)
    for label, points in sorted(curves.items(), key=lambda kv: method_rank(kv[0])):
        ax.plot(*zip(*sorted(points)), label=label, **styles[label])
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("ratio (fraction of parameters removed)")
    ax.set_ylabel(f"average zero-shot acc over {len(tasks)} task(s) (higher is better)")
    ax.set_title(f"Average accuracy ({', '.join(tasks)}) vs ratio\n{_subtitle(data)}", fontsize=9)
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
    records = [r for r in data["records"] if metric_kind(r) == "perplexity" and not is_throughput(r)]
    tasks = sorted({r["task"] for r in records}, key=task_rank)
    if not tasks or len({r["bytes"] for r in records}) < 2:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.4), squeeze=False)
    labels = [method_label(r) + (BUDGET if budget_of(r) is not None else "") for r in records]
    styles = styles or all_styles(data)
    for ax, task in zip(axes[0], tasks):
        task_records = [(label, r) for label, r in zip(labels, records) if r["task"] == task and finite(r["value"])]
        for label in sorted({label for label, _ in task_records}, key=method_rank):
            points = [(r["bytes"] / 2**20, r["value"]) for lab, r in task_records if lab == label]
            ax.scatter(*zip(*points), label=label, s=36, zorder=3, **styles[label])
        front = pareto_front([(r["bytes"] / 2**20, r["value"]) for _, r in task_records])
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="grey", linewidth=1.2, alpha=0.8, label="Pareto front", zorder=2)
        ax.set_yscale("log")
        ax.set_xlabel("model size (MiB, whole model)")
        ax.set_ylabel("perplexity (log scale, lower is better)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    _figure_legend(fig, axes[0])
    fig.suptitle(f"Perplexity vs memory (down-left is better) - {_subtitle(data)}; "
                 f"unquantized weights in {dtype_bits(data.get('manifest', {}))}-bit", fontsize=9)
    return _save(fig, path)


def throughput_speedup(data: dict, path: Path, styles: dict | None = None) -> Path | None:
    records = [r for r in data["records"] if is_throughput(r) and metric_kind(r) == "throughput"
               and budget_of(r) is None]
    metrics = sorted({r["metric"] for r in records})
    dense = {(r["metric"], grid_of(r)): r["value"] for r in records if r["method"] == DENSE}
    if not metrics or not dense or all(r["method"] == DENSE for r in records):
        return None
    grids = sorted({grid_of(r) for r in records})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.4 * len(metrics), 4.4), squeeze=False)
    styles = styles or all_styles(data)
    linestyles = ["-", "--", ":", "-."]
    for ax, metric in zip(axes[0], metrics):
        for g, grid in enumerate(grids):
            base = dense.get((metric, grid))
            if not base:
                continue
            chosen = [r for r in records if r["metric"] == metric and grid_of(r) == grid]
            for label, points in _curves(chosen, lambda r: r["value"] / base).items():
                ax.plot(*zip(*points), label=label if g == 0 else None, linestyle=linestyles[g % len(linestyles)],
                        **styles[label])
            if len(grids) > 1:  # one legend entry per grid point, by line style
                ax.plot([], [], color="grey", linestyle=linestyles[g % len(linestyles)], label=grid)
        ax.axhline(1.0, color="black", linestyle=(0, (1, 1)), linewidth=1, label="dense (1x)")
        ax.set_xlabel("ratio (fraction of parameters removed)")
        ax.set_ylabel("speed-up over dense (higher is better)")
        ax.set_title(metric + (f" [{grids[0]}]" if len(grids) == 1 and grids[0] else ""), fontsize=9)
        _percent_axis(ax, [r["ratio"] for r in records if r["method"] != DENSE])
        ax.grid(True, alpha=0.3)
    _figure_legend(fig, axes[0], fontsize=7)
    fig.suptitle(f"Throughput speed-up vs ratio - {_subtitle(data)}", fontsize=9)
    return _save(fig, path)


def write_plots(data: dict, out_dir: Path | str, with_published: bool = False) -> list[Path]:
    """Every plot the records support, as PNG files in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    styles = all_styles(data, with_published)
    made = [perplexity_vs_ratio(data, out_dir / "perplexity_vs_ratio.png", with_published, styles),
            accuracy_vs_ratio(data, out_dir / "accuracy_vs_ratio.png", styles),
            perplexity_vs_bytes(data, out_dir / "perplexity_vs_bytes.png", styles),
            throughput_speedup(data, out_dir / "throughput_speedup.png", styles)]
    return [path for path in made if path is not None]
