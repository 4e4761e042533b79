"""Ray speedup: the wall time of one plan under ``--executor ray`` over its wall time under ``local``.

The plan has 4 groups that share nothing: the dense model and three methods
whose statistics differ (``svd`` needs none, ``fwsvd`` gradients, ``svdllm_w``
the gram), on SmolLM2-135M (or ``--model``) with the CI profile's sizes.
Each executor runs it into a fresh output directory with a fresh, empty
statistics and factor store (the converted model cache is shared), so both
compute everything. The local executor runs the groups one after the other
in this process with torch's default threads; the Ray executor runs them as
tasks of ``--ray-cpus-per-task`` CPUs (default 1) on a local Ray instance
with all cores, each task running torch with that many threads.

Ray's own start (``ray.init``, a one-off per machine or cluster) happens
before the timed run and is printed separately; starting the worker
processes and loading the model in each is timed. Both runs must give the
same perplexities (checked).

    python benchmarks/ray_speedup.py [--model smollm2-135m] [--ray-cpus-per-task 1] [--methods svd,fwsvd,svdllm_w]

Prints both wall times and ``ratio ray/local``; exits with status 1 when the
ratio is above 0.8 (the goal on a 2-core machine) or the records differ.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from bench.engine.config import CalibrationConfig, ExecutorConfig, RunConfig
from bench.engine.executor import run
from bench.memory import reuse_freed_memory
from bench.model.loading import load_model
from bench.storage import cache_root

GOAL = 0.8


def fresh_cache(root: Path, shared_models: Path) -> None:
    """Point the stores at an empty directory that still sees the converted model cache."""
    root.mkdir(parents=True)
    (root / "models").symlink_to(shared_models, target_is_directory=True)
    os.environ["SVDBENCH_CACHE"] = str(root)
    os.environ.pop("SVDBENCH_STATS_CACHE", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="svd,fwsvd,svdllm_w", help="with the dense model, the plan's groups")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--ray-cpus-per-task", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray instance (default: Ray counts them); e.g. 2 under taskset -c 0,1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    reuse_freed_memory()  # as the svdbench command does (Ray's workers do it themselves)

    shared_models = cache_root() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    load_model(args.model)  # converted (when needed) and in the page cache before either run is timed
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, logging_level=logging.WARNING)  # a local instance
    ray_start = time.perf_counter() - start
    cpus = ray.cluster_resources().get("CPU", 0)
    walls, values = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("local", "ray"):
            fresh_cache(Path(tmp) / f"cache-{kind}", shared_models)
            config = RunConfig(model=args.model, methods=tuple(args.methods.split(",")),
                               ratios=tuple(float(r) for r in args.ratios.split(",")), tasks=("wikitext2",),
                               limit=2, seqlen=512, calibration=CalibrationConfig(samples=8, seqlen=512),
                               out=str(Path(tmp) / f"run-{kind}"))
            executor = ExecutorConfig(kind=kind, cpus_per_task=args.ray_cpus_per_task)
            start = time.perf_counter()
            results = run(config, executor=executor)
            walls[kind] = time.perf_counter() - start
            values[kind] = {r["key"]: r["value"] for r in results.records}
            groups = len(results.manifest["executor"]["groups"])
            print(f"{kind:5}: {walls[kind]:7.1f} s  ({groups} groups, {len(results.records)} records, "
                  f"{len(results.data['failures'])} failures)", flush=True)
            for label, group in results.manifest["executor"]["groups"].items():
                node = group.get("node") or {}
                print(f"       {label:10} {group.get('seconds', 0):7.1f} s in pid {node.get('pid')}"
                      + (f", model load {group['timings'].get('load_model', 0):.1f} s" if "timings" in group else ""))
    ray.shutdown()
    ratio = walls["ray"] / walls["local"]
    import torch

    print(f"ray start (not in the ray wall time): {ray_start:.1f} s; Ray CPUs {cpus:g}, "
          f"{args.ray_cpus_per_task:g} per task; local torch threads: {torch.get_num_threads()}")
    print(f"ratio ray/local: {ratio:.3f} (goal <= {GOAL}); with Ray's start: {(walls['ray'] + ray_start) / walls['local']:.3f}")
    same = values["local"] == values["ray"]
    print("records: identical" if same else "records: DIFFER")
    return 0 if ratio <= GOAL and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
