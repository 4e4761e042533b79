"""Time ASVD's sensitivity search, and compare it with the one-pass-per-candidate search it replaced.

Builds ASVD's factorizations of SmolLM2-135M through the harness (the main
job's calibration, 16 x 256 tokens of WikiText-2, seed 3), then times
``measure_sensitivity`` on the linears of the chosen blocks with the default
grid (6 kept fractions, 2 x 256 tokens); ``--reference`` also times the
previous implementation (``tests/asvd_reference.py``) on the same linears and
the same kernels (oneDNN linears) and checks that both tables are equal bit
for bit, then measures the reference on torch's default kernels (the
search's kernels before) and prints how far the table moved and whether the
ranks it gives at 20/40/60% change.

    python benchmarks/asvd_search.py                       # the full default grid: 210 linears x 6
    python benchmarks/asvd_search.py --blocks 0,29 --reference
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.memory import reuse_freed_memory
from bench.threads import configure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", help="comma-separated block indices (default: every block)")
    parser.add_argument("--reference", action="store_true", help="also time the previous search and compare")
    parser.add_argument("--threads", help="torch threads (default: the CPUs available)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    policy = configure(args.threads)
    reuse_freed_memory()  # as the svdbench command does

    from bench.engine.config import CalibrationConfig, RunConfig
    from bench.engine.plugins import load_registry
    from bench.engine.workspace import Workspace
    from methods.asvd import measure_sensitivity, sensitivity_windows

    workspace = Workspace(RunConfig(methods=("asvd",), calibration=CalibrationConfig(samples=16, seqlen=256)),
                          load_registry())
    method = workspace.create("asvd")
    factorizations = workspace.factorizations(method)  # from the factor store (made on the first run)
    context = workspace.context(method)
    config = method.config
    ids = sensitivity_windows(context, config)
    blocks = {int(b) for b in args.blocks.split(",")} if args.blocks else None
    targets = [t for t in context.targets if blocks is None or t.block in blocks]
    candidates = config.kept_candidates
    print(f"{len(targets)} linears x {len(candidates)} kept fractions on {ids.shape[0]} x {ids.shape[1]} tokens; "
          f"{policy['threads']} threads; load average {open('/proc/loadavg').read().split()[0]}", flush=True)

    start = time.perf_counter()
    table = measure_sensitivity(context.model, targets, factorizations, candidates, ids, context.device)
    seconds = time.perf_counter() - start
    print(f"batched search: {seconds:.1f} s ({seconds / (len(targets) * len(candidates)):.3f} s per evaluation)",
          flush=True)
    if args.reference:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from asvd_reference import reference_sensitivity

        from bench import onednn_linears
        from methods.asvd import sensitivity_ranks, uniform_budget

        start = time.perf_counter()
        with onednn_linears(context.model):
            reference = reference_sensitivity(context.model, targets, factorizations, candidates, ids, context.device)
        before = time.perf_counter() - start
        print(f"previous search (same kernels): {before:.1f} s ({before / (len(targets) * len(candidates)):.3f} s "
              f"per evaluation); speed-up {before / seconds:.2f}x; tables equal bit for bit: {table == reference}",
              flush=True)
        start = time.perf_counter()
        default = reference_sensitivity(context.model, targets, factorizations, candidates, ids, context.device)
        aten = time.perf_counter() - start
        moved = max(abs(table[n][k] - v) / v for n, row in default.items() for k, v in row.items())
        same_ranks = all(sensitivity_ranks(targets, table, uniform_budget(targets, r))
                         == sensitivity_ranks(targets, default, uniform_budget(targets, r)) for r in (0.2, 0.4, 0.6))
        print(f"previous search on torch's default kernels: {aten:.1f} s; largest relative difference of a "
              f"perplexity from this table {moved:.2e}; same ranks at 20/40/60%: {same_ranks}")
    print(f"load average after: {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
