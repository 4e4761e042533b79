"""How much slower svdbench gets when one other CPU-bound process shares the machine.

Two workloads - the decomposition step (``factorize`` of the linears of the
first ``--blocks`` decoder blocks of SmolLM2-135M, float64 SVDs, as the
executor runs them: one matrix per thread, see
``bench.threads.ordered_in_threads``) and a
perplexity evaluation (the main job's: 8 WikiText-2 windows of 256 tokens,
batch 8) - each run alone and beside one competing process that this script
starts and stops, alternately, ``--repeats`` times; the slowdown is the median
time beside the competitor over the median time alone. Each thread policy runs
in its own Python process, because the policy must be set before torch loads:

- ``svdbench``: :func:`bench.threads.configure` (what ``svdbench`` does: a
  bounded spin, ``GOMP_SPINCOUNT=300``);
- ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (workers never spin;
  svdbench's policy before the bounded spin);
- ``torch-defaults``: torch's own settings (spinning OpenMP workers, one per
  core), and the matrices decomposed one after another on all threads: what
  svdbench did before issue 15.

Competitors: ``busy`` is one Python thread in a busy loop; ``torch`` is a
process multiplying matrices with torch's defaults (all cores, spinning
workers) - another ML job. Both run at ``--nice`` (0: an equal).

    python benchmarks/contention.py                          # all policies, both workloads, busy competitor
    python benchmarks/contention.py --competitor torch --policies svdbench

Other load on the machine (``/proc/loadavg`` is printed) inflates every
figure: compare policies measured in the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMPETITORS = {
    "busy": "while True:\n    pass\n",
    "torch": "import torch\na = torch.randn(768, 768)\nwhile True:\n    a = torch.tanh(a @ a)\n",
}
POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")


def _clean_env() -> dict[str, str]:
    """The environment without any thread setting: torch's defaults."""
    return {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}


# --------------------------------------------------------------------------- worker (one policy, one process)

def _workload(name: str, args):
    """A function that runs the workload once."""
    from bench import EvalSettings, factorize
    from bench.model.loading import load_model
    from bench.model.targets import find_targets

    loaded = load_model(args.model)
    if name == "decompose":
        import torch

        from bench.threads import ordered_in_threads

        targets = [t for t in find_targets(loaded.model) if t.block < args.blocks]
        weights = [loaded.model.get_submodule(t.name).weight.detach() for t in targets]
        if args.policy == "torch-defaults":  # as before issue 15: one matrix after another
            return lambda: [factorize(w) for w in weights]
        return lambda: [f for _, f, _ in ordered_in_threads(factorize, weights, torch.get_num_threads())]
    if name == "perplexity":
        from tasks.perplexity import WikiText2

        task, settings = WikiText2(), EvalSettings(seqlen=args.seqlen, limit=args.windows, batch_size=args.batch_size)
        return lambda: task.evaluate(loaded.model, loaded.tokenizer, settings)
    raise SystemExit(f"unknown workload {name!r}; use decompose or perplexity")


def worker(args) -> None:
    if args.policy in ("svdbench", "passive"):
        from bench.threads import configure

        if args.policy == "passive":
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        configure(args.threads)
        from bench.memory import reuse_freed_memory

        reuse_freed_memory()
    import torch

    from bench.threads import describe

    run = _workload(args.worker, args)
    run()  # warm-up (and the tokenizer's cache)
    quiet, shared = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        quiet.append(time.perf_counter() - start)
        competitor = subprocess.Popen(["nice", "-n", str(args.nice), sys.executable, "-c", COMPETITORS[args.competitor]],
                                      env=_clean_env())
        try:
            time.sleep(1.0)  # let it start (and, for torch, load)
            start = time.perf_counter()
            run()
            shared.append(time.perf_counter() - start)
        finally:
            competitor.kill()
            competitor.wait()
    print(json.dumps({"quiet": quiet, "shared": shared, "threads": torch.get_num_threads(), "policy": describe()}))


# --------------------------------------------------------------------------- driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="decompose,perplexity")
    parser.add_argument("--policies", default="svdbench,passive,torch-defaults")
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="busy")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the competitor (default 0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", help="--threads for the svdbench policy (default: the CPUs available)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=4, help="decompose the linears of the first N blocks")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.worker:
        worker(args)
        return

    print(f"load average before: {open('/proc/loadavg').read().strip()}; {os.cpu_count()} CPUs; "
          f"competitor: {args.competitor} at nice {args.nice}", flush=True)
    rows = []
    passthrough = ["--competitor", args.competitor, "--nice", str(args.nice), "--repeats", str(args.repeats),
                   "--model", args.model, "--blocks", str(args.blocks), "--windows", str(args.windows),
                   "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
    if args.threads:
        passthrough += ["--threads", args.threads]
    for workload in args.workloads.split(","):
        for policy in args.policies.split(","):
            command = [sys.executable, __file__, "--worker", workload, "--policy", policy, *passthrough]
            done = subprocess.run(command, env=_clean_env(), capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                print(f"{workload} / {policy} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            quiet, shared = statistics.median(result["quiet"]), statistics.median(result["shared"])
            rows.append((workload, policy, result["threads"], quiet, shared, shared / quiet))
            print(f"{workload:10s} {policy:15s} threads {result['threads']}: alone {quiet:.2f} s, beside the "
                  f"competitor {shared:.2f} s -> {shared / quiet:.2f}x  (alone {_fmt(result['quiet'])}; beside "
                  f"{_fmt(result['shared'])})", flush=True)
    print("\n| workload | policy | threads | alone s | beside one competitor s | slowdown |\n|---|---|---|---|---|---|")
    for workload, policy, threads, quiet, shared, slowdown in rows:
        print(f"| {workload} | {policy} | {threads} | {quiet:.2f} | {shared:.2f} | {slowdown:.2f}x |")
    print(f"\nload average after: {open('/proc/loadavg').read().strip()}")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
