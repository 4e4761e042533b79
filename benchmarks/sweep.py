"""Sweep efficiency: compression time for one ratio versus four, per registered method.

A ratio sweep decomposes every matrix once and only re-allocates and rebuilds
the model per ratio (bench/engine/groups.py), so four ratios should cost at
most 1.5x one ratio. This script measures it on SmolLM2-135M (or ``--model``)
with the harness's own pieces: ``Workspace.context`` collects the statistics
(timed separately and excluded), ``Workspace.decompose`` decomposes every
matrix once, then ``allocate`` + :func:`bench.engine.compress.compress_model`
run per ratio.
ASVD's sensitivity search is excluded, as issue 3 asks, by timing ASVD with
``asvd.allocation=uniform`` unless ``--method-option`` says otherwise; and
``allocate`` is called once untimed before timing so that any other one-off
work a method caches is excluded too. ``refine`` (LoRA updates,
quantization) and evaluation are not part of compression and are not run.

    python benchmarks/sweep.py [--methods svd,svdllm_v2] [--calib-samples 8 --calib-seqlen 256]
                               [--method-option asvd.allocation=sensitivity]

Prints one row per method and exits with status 1 when a ratio exceeds 1.5.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time

from bench.engine.compress import allocation_of, compress_model
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.plugins import load_registry
from bench.engine.workspace import Workspace
from bench.model.loading import load_model

LIMIT = 1.5


def build_all(method, context, factorizations, ratios) -> float:
    """Seconds to allocate ranks and build the compressed model for each ratio."""
    start = time.perf_counter()
    for ratio in ratios:
        ranks = allocation_of(method, ratio, factorizations, context).ranks
        model, _ = compress_model(context.model, context.targets, factorizations, ranks)
        del model
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all' registered")
    parser.add_argument("--single", type=float, default=0.4, help="the one-ratio case")
    parser.add_argument("--ratios", default="0.2,0.4,0.6,0.8", help="the four-ratio case")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    args = parser.parse_args(argv)

    registry = load_registry()
    names = sorted(registry.methods) if args.methods == "all" else args.methods.split(",")
    ratio_free = [n for n in names if not registry.get("method", n).uses_ratio]
    if ratio_free:  # e.g. hqq: the runner evaluates it once, at ratio 0, so there is no sweep to measure
        print(f"skipped (no ratio sweep: they run once): {', '.join(ratio_free)}", file=sys.stderr)
        names = [n for n in names if n not in ratio_free]
    ratios = [float(r) for r in args.ratios.split(",")]
    options: dict[str, dict[str, str]] = {"asvd": {"allocation": "uniform"}} if "asvd" in names else {}
    for item in args.method_option:
        key, _, value = item.partition("=")
        method_name, _, option = key.partition(".")
        options.setdefault(method_name, {})[option] = value
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(model=args.model, methods=tuple(names), ratios=tuple(ratios), out=out,
                           method_options=options,
                           calibration=CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen))
        workspace = Workspace(config, registry, loaded)
        rows = []
        for name in names:
            method = workspace.create(name)
            start = time.perf_counter()
            context = workspace.context(method)  # collects the statistics (excluded from the times)
            stats_s = time.perf_counter() - start
            workspace._last = None  # each method's own decomposition cost, nothing shared
            start = time.perf_counter()
            factorizations = workspace.decompose(method, context)
            decompose_s = time.perf_counter() - start
            allocation_of(method, args.single, factorizations, context)  # untimed: one-off cached searches
            one = decompose_s + build_all(method, context, factorizations, [args.single])
            four = decompose_s + build_all(method, context, factorizations, ratios)
            label = name + "".join(f" ({k}={v})" for k, v in options.get(name, {}).items())
            rows.append((label, stats_s, decompose_s, one, four, four / one))
            print(f"{name}: decompose {decompose_s:.1f}s, 1 ratio {one:.1f}s, {len(ratios)} ratios {four:.1f}s", file=sys.stderr)
            del factorizations
            gc.collect()

    print(f"\nmodel {loaded.name}, {len(workspace.targets)} matrices, calibration {args.calib_samples} x {args.calib_seqlen} tokens; "
          f"1 ratio = {args.single}, {len(ratios)} ratios = {args.ratios}; statistics excluded from the times")
    print(f"| method | statistics s (excluded) | decompose s | 1 ratio s | {len(ratios)} ratios s | {len(ratios)}-ratio / 1-ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, stats_s, decompose_s, one, four, ratio in rows:
        print(f"| {name} | {stats_s:.1f} | {decompose_s:.1f} | {one:.1f} | {four:.1f} | {ratio:.2f} |")
    worst = max(row[-1] for row in rows)
    print(f"\nworst ratio {worst:.2f} (limit {LIMIT}): {'OK' if worst <= LIMIT else 'TOO SLOW'}")
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
