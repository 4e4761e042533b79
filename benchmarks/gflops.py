"""The perplexity evaluation's achieved GFLOP/s against the machine's GEMM peak at the model's shapes.

Peak: every linear of one forward pass (the model's distinct ``out x in``
shapes, each with its count, lm_head included) is timed as a GEMM of
``batch x seqlen`` rows, alone, with each available kernel - torch's default
(``aten``: MKL for float32 on this wheel), oneDNN for float32, and bfloat16
where the CPU supports it - and the peak of a dtype is the best kernel's
FLOPs / seconds over the whole set. The evaluation is then timed (the
perplexity task's own code, best of ``--repeats``) in float32 with torch's
kernels, in float32 with oneDNN (the task's default) and in bfloat16, and its
FLOPs - 2 per weight per token for every linear and the LM head, plus the
causal attention's ``QK^T`` and ``AV`` - over the time give its GFLOP/s.

    python benchmarks/gflops.py                              # the main job's evaluation: 8 x 256 tokens, batch 8
    python benchmarks/gflops.py --seqlen 2048 --windows 2 --batch-size 1
"""

from __future__ import annotations

import argparse
import os
import time

from bench.threads import configure


def _best_seconds(fn, min_seconds: float = 0.3, repeats: int = 3) -> float:
    """Best time of one call of ``fn``: each repeat runs it until ``min_seconds`` have passed."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def linear_shapes(model) -> dict[tuple[int, int], int]:
    """(out, in) -> how many linears of that shape one forward pass runs (the LM head included)."""
    from torch import nn

    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            key = (module.out_features, module.in_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def gemm_peaks(shapes: dict[tuple[int, int], int], rows: int) -> dict[str, float]:
    """GFLOP/s of each kernel over the model's GEMMs (``rows`` x in -> out), the best time per shape."""
    import torch
    import torch.nn.functional as F

    from bench import onednn_linear_works

    kernels = {"float32 aten": (torch.float32, F.linear)}
    if onednn_linear_works():
        kernels["float32 oneDNN"] = (torch.float32, lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none",
                                                                                                   [], ""))
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        kernels["bfloat16 aten"] = (torch.bfloat16, F.linear)
    flops = sum(2 * rows * out * inp * count for (out, inp), count in shapes.items())
    peaks = {}
    for name, (dtype, kernel) in kernels.items():
        seconds = 0.0
        for (out, inp), count in shapes.items():
            x, w = torch.randn(rows, inp, dtype=dtype), torch.randn(out, inp, dtype=dtype)
            seconds += count * _best_seconds(lambda x=x, w=w, kernel=kernel: kernel(x, w))
        peaks[name] = flops / seconds / 1e9
    return peaks


def forward_flops(model, batch: int, seqlen: int) -> int:
    """FLOPs of one forward pass over ``batch x seqlen`` tokens: linears and LM head, plus causal attention."""
    config = model.config
    tokens = batch * seqlen
    linear = sum(2 * tokens * out * inp * count for (out, inp), count in linear_shapes(model).items())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    pairs = seqlen * (seqlen + 1) // 2  # query-key pairs a causal mask keeps
    attention = 2 * 2 * batch * heads * pairs * head_dim * config.num_hidden_layers
    return linear + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", help="torch threads (default: the CPUs available)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    policy = configure(args.threads)

    import torch

    from bench.model.loading import load_model
    from tasks.perplexity import _token_stream, perplexity, windows

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    batches = windows(_token_stream(tokenizer, "wikitext2"), args.seqlen, args.windows)
    rows = args.batch_size * args.seqlen
    print(f"{loaded.name}: {len(batches)} windows x {args.seqlen} tokens, batch {args.batch_size}; "
          f"{torch.get_num_threads()} threads ({policy['threads_source']}), OMP_WAIT_POLICY={policy['wait_policy']}; "
          f"load average {open('/proc/loadavg').read().split()[0]}", flush=True)

    peaks = gemm_peaks(linear_shapes(model), rows)
    for name, value in peaks.items():
        print(f"GEMM peak at the model's shapes ({rows} rows), {name}: {value:.0f} GFLOP/s", flush=True)
    fp32_peak = max(v for k, v in peaks.items() if k.startswith("float32"))
    bf16_peak = peaks.get("bfloat16 aten")

    flops = sum(forward_flops(model, len(batches[i:i + args.batch_size]), args.seqlen)
                for i in range(0, len(batches), args.batch_size))
    evaluations = {"float32, torch's kernels": (model, False), "float32, oneDNN linears (default)": (model, True)}
    if bf16_peak:
        low = load_model(args.model, "cpu", torch.bfloat16).model
        evaluations["bfloat16"] = (low, True)
    print(f"\nevaluation: {flops / 1e9:.0f} GFLOP per pass (linears, LM head and causal attention)")
    print("| evaluation | seconds | perplexity | GFLOP/s | % of float32 peak |" + (" % of bfloat16 peak |" if bf16_peak else ""))
    print("|---|---|---|---|---|" + ("---|" if bf16_peak else ""))
    values = {}
    for name, (m, onednn) in evaluations.items():
        def run(m=m, onednn=onednn):
            return perplexity(m, batches, args.batch_size, onednn=onednn)

        values[name] = run().value  # warm-up
        seconds = min(_timed(run) for _ in range(args.repeats))
        rate = flops / seconds / 1e9
        print(f"| {name} | {seconds:.2f} | {values[name]:.4f} | {rate:.0f} | {100 * rate / fp32_peak:.0f}% |"
              + (f" {100 * rate / bf16_peak:.0f}% |" if bf16_peak else ""), flush=True)
    if "bfloat16" in values:
        reference = values["float32, oneDNN linears (default)"]
        print(f"\nbfloat16 perplexity vs float32: {values['bfloat16']:.4f} vs {reference:.4f} "
              f"({100 * (values['bfloat16'] / reference - 1):+.3f}%)")
    print(f"load average after: {open('/proc/loadavg').read().split()[0]}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
