"""Throughput and memory: prefill and decode tokens/s over a grid of shapes.

For every (batch size, prompt length, decode length) of the grid, random
prompt tokens (fixed seed) go through one prefill pass (``use_cache``, logits
of the last position only, as ``generate`` does) and then ``decode`` greedy
single-token steps on the Hugging Face KV cache. Warm-up passes are run first
and excluded; each figure is the median over ``repeats``; on CUDA the device is
synchronized before the clock is read.

Measurements per grid point (the point is in ``extra``):

- ``prefill_tok_s`` = batch x prompt / prefill seconds;
- ``decode_tok_s`` = batch x decode / decode seconds;
- ``kv_cache_mb``: bytes of the key/value tensors held by the cache at the end;
- ``peak_mem_mb``: the model's stored bytes (``footprint``) plus the peak
  memory added while generating (activations, KV cache, temporaries). The
  increment is measured, not the absolute figure, because the harness holds
  the dense model next to the compressed one in the same process. On CPU it
  is the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``
  before each repeat) minus the RSS before generating, after ``malloc_trim``
  handed back the heap the C allocator kept; on CUDA ``max_memory_allocated``
  minus the allocated bytes before. CPU figures are approximate (page
  granularity, allocator caching). If the peak cannot be
  reset, ``peak_increment_exact`` is false in ``extra``.

MB here are MiB (2**20 bytes), as in the report. Speed depends on the machine
and its load: compare models measured in the same run (dense is always
measured first), as ratios. ``throughput`` has a grid sized for two CPU
cores; ``throughput_quick`` (batch 1, prompt 128, decode 16) is the main job's;
``throughput_v2`` is SVD-LLM V2's setting (batch 4, prompt 1024,
decode 256). ``limit`` and ``batch_size`` of the run do not apply.
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import EvalSettings, Measurement, Metric, Task, footprint, hookimpl

MIB = 2**20


@dataclass(frozen=True)
class Grid:
    """The shapes measured and how often."""

    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_lengths: tuple[int, ...] = (32,)
    repeats: int = 3
    warmup: int = 1

    def points(self) -> list[tuple[int, int, int]]:
        return [(b, p, g) for b in self.batch_sizes for p in self.prompt_lengths for g in self.decode_lengths]


CPU_GRID = Grid()
QUICK_GRID = Grid(batch_sizes=(1,), prompt_lengths=(128,), decode_lengths=(16,), repeats=3, warmup=1)
V2_GRID = Grid(batch_sizes=(4,), prompt_lengths=(1024,), decode_lengths=(256,), repeats=3, warmup=1)


def kv_cache_bytes(cache) -> int:
    """Bytes of every key/value tensor in a Hugging Face cache (or a legacy tuple cache)."""
    layers = getattr(cache, "layers", None)
    pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else list(cache)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if isinstance(t, torch.Tensor))


class _PeakMemory:
    """Peak memory added while inside the block: CUDA allocator on GPU, process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True
        self.increment = 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{field} not in /proc/self/status")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                self.exact = False
            self.before = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status("VmHWM")
        self.increment = max(0, peak - self.before)


def _release_free_heap() -> None:
    """Give memory the C allocator kept back to the OS, so that new allocations raise the RSS again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the increment may then read low
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_timed(model: nn.Module, prompt: torch.Tensor, decode: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, KV-cache bytes) of one greedy generation."""
    device = prompt.device
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **extra)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefilled = time.perf_counter()
    cache = out.past_key_values
    for _ in range(decode):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    done = time.perf_counter()
    return prefilled - start, done - prefilled, kv_cache_bytes(cache)


def measure(model: nn.Module, grid: Grid, seed: int = 0) -> list[Measurement]:
    """Every grid point's throughput and memory for ``model`` (in eval mode, on its device)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    weights = footprint(model)["bytes"]
    generator = torch.Generator().manual_seed(seed)
    measurements = []
    for batch, prompt_len, decode in grid.points():
        prompt = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
        for _ in range(grid.warmup):
            generate_timed(model, prompt, decode)
        prefill, dec, increments, exact = [], [], [], True
        for _ in range(grid.repeats):
            with _PeakMemory(device) as peak:
                p_s, d_s, kv = generate_timed(model, prompt, decode)
            prefill.append(p_s)
            dec.append(d_s)
            increments.append(peak.increment)
            exact &= peak.exact
        p_med, d_med = statistics.median(prefill), statistics.median(dec)
        point = {"batch_size": batch, "prompt_len": prompt_len, "decode_len": decode}
        how = {"repeats": grid.repeats, "warmup": grid.warmup, "device": str(device), "threads": torch.get_num_threads()}
        measurements += [
            Measurement("prefill_tok_s", batch * prompt_len / p_med, {**how, "seconds": prefill}, point),
            Measurement("decode_tok_s", batch * decode / d_med if decode else float("nan"), {**how, "seconds": dec},
                        point),
            Measurement("peak_mem_mb", (weights + max(increments)) / MIB,
                        {**how, "weights_mb": weights / MIB, "peak_increment_mb": max(increments) / MIB,
                         "peak_increment_exact": exact,
                         "source": "cuda max_memory_allocated" if device.type == "cuda" else "process VmHWM - VmRSS"},
                        point),
            Measurement("kv_cache_mb", kv / MIB, {**how, "bytes": kv}, point),
        ]
    return measurements


class Throughput(Task):
    """Prefill/decode tokens/s, peak memory and KV-cache size over a grid of shapes."""

    metrics = {"prefill_tok_s": Metric("throughput", True, "tokens/s"), "decode_tok_s": Metric("throughput", True, "tokens/s"),
               "peak_mem_mb": Metric("memory", False, "MiB"), "kv_cache_mb": Metric("memory", False, "MiB")}

    def __init__(self, name: str = "throughput", grid: Grid = CPU_GRID, description: str = ""):
        self.name, self.grid = name, grid
        self.description = description or (f"prefill/decode tokens/s and peak memory, batch {grid.batch_sizes} x "
                                           f"prompt {grid.prompt_lengths} x decode {grid.decode_lengths}")

    def settings_key(self, settings: EvalSettings) -> dict:
        return {"grid": dataclasses.asdict(self.grid), "device": settings.device}

    def evaluate(self, model, tokenizer, settings: EvalSettings) -> list[Measurement]:
        return measure(model, self.grid)


@hookimpl
def register_tasks(register):
    register(Throughput("throughput", CPU_GRID))
    register(Throughput("throughput_quick", QUICK_GRID, "one point (batch 1, prompt 128, decode 16): the main job's "
                        "speed-up check, a few seconds per model on two CPU cores"))
    register(Throughput("throughput_v2", V2_GRID, "SVD-LLM V2 setting: batch 4, prompt 1024, decode 256"))
