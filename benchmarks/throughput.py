"""Prefill/decode tokens/s and peak memory of a method at several ratios vs the dense model.

Runs the harness with a throughput task (dense first, then each ratio, all in
one process so that speed-ups are ratios measured under the same conditions)
and prints tokens/s, speed-up over dense and peak memory per grid point and
decoding path: eager (the forward pass step by step on the dynamic KV cache)
and compiled (HF static cache, ``torch.compile``-d step with frozen, autotuned
GEMMs on a CPU; one to two minutes of compiling per model and batch size on two
cores, excluded from the figures).

    python benchmarks/throughput.py                      # svdllm_w at 20/40/60/80% on SmolLM2-135M
    python benchmarks/throughput.py --ratios 0.6 --batch-sizes 1 --prompt-lens 128 --decode-lens 32
    python benchmarks/throughput.py --method svd --preset v2 --paths eager

``svd`` has the same shapes, hence the same speed, as ``svdllm_w`` and needs
no calibration, which makes it the cheap stand-in on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from bench.threads import configure

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="svdllm_w")
    parser.add_argument("--ratios", default="0.2,0.4,0.6,0.8")
    parser.add_argument("--preset", choices=["cpu", "v2"], default="cpu",
                        help="cpu: the throughput task's default grid; v2: batch 4, prompt 1024, decode 256")
    parser.add_argument("--batch-sizes", type=_ints, help="override the preset's batch sizes, e.g. 1,4")
    parser.add_argument("--prompt-lens", type=_ints, help="override the preset's prompt lengths, e.g. 128,512")
    parser.add_argument("--decode-lens", type=_ints, help="override the preset's decode lengths, e.g. 32")
    parser.add_argument("--repeats", type=int, help="override the preset's repeats")
    parser.add_argument("--paths", help="decoding paths, e.g. eager or eager,compiled (default: both)")
    parser.add_argument("--threads", help="torch threads (default: the CPUs available)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    args = parser.parse_args()
    configure(args.threads)  # svdbench's thread policy, before torch loads

    import dataclasses

    import torch

    from bench import hookimpl
    from bench.engine.config import CalibrationConfig, RunConfig
    from bench.engine.executor import run
    from bench.engine.plugins import load_registry
    from tasks.throughput import CPU_GRID, V2_GRID, Throughput

    grid = CPU_GRID if args.preset == "cpu" else V2_GRID
    overrides = {"batch_sizes": args.batch_sizes, "prompt_lengths": args.prompt_lens,
                 "decode_lengths": args.decode_lens, "repeats": args.repeats,
                 "paths": tuple(args.paths.split(",")) if args.paths else None}
    grid = dataclasses.replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    task = Throughput("throughput_bench", grid)

    class Plugin:
        @hookimpl
        def register_tasks(self, register):
            register(task)

    registry = load_registry(extra=[("throughput_bench", Plugin())])
    out = args.out or tempfile.mkdtemp(prefix="svdbench-throughput-")
    config = RunConfig(model=args.model, methods=(args.method,), ratios=tuple(float(r) for r in args.ratios.split(",")),
                       tasks=(task.name,), device=args.device,
                       calibration=CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen), out=out)
    results = run(config, registry=registry)
    print_table(results.data["records"], grid, torch.get_num_threads())
    if results.data["failures"]:
        print("failures:", [f["error"] for f in results.data["failures"]])
    print(f"results: {out}/results.json")


def print_table(records: list[dict], grid, threads: int) -> None:
    cells: dict = {}
    for r in records:
        x = r["point"]
        point = (x["batch_size"], x["prompt_len"], x["decode_len"], x.get("path", "eager"))
        cells.setdefault((point, r["method"], r["ratio"]), {"MiB": r["bytes"] / 2**20})[r["metric"]] = r["value"]
    print(f"\ngrid: batch {grid.batch_sizes} x prompt {grid.prompt_lengths} x decode {grid.decode_lengths}, "
          f"{' and '.join(grid.paths)} decoding, median of {grid.repeats} after {grid.warmup} warm-up; "
          f"{threads} torch threads")
    header = ("batch", "prompt", "decode", "path", "model", "MiB", "prefill tok/s", "x dense", "decode tok/s",
              "x dense", "peak MiB", "KV MiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (point, method, ratio), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "dense", kv[0][2])):
        dense = cells.get((point, "dense", 0.0), {})
        name = "dense" if method == "dense" else f"{method}@{ratio:.0%}"
        def up(metric: str, c=c, dense=dense) -> str:
            return f"{c[metric] / dense[metric]:.2f}" if dense.get(metric) and metric in c else "-"

        def value(metric: str, digits: int = 1, c=c) -> str:
            return f"{c[metric]:.{digits}f}" if metric in c else "-"

        print("| " + " | ".join([*map(str, point), name, f"{c['MiB']:.1f}", value("prefill_tok_s"), up("prefill_tok_s"),
                                 value("decode_tok_s"), up("decode_tok_s"), value("peak_mem_mb"),
                                 value("kv_cache_mb", 2)]) + " |")


if __name__ == "__main__":
    main()
