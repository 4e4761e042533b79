"""Throughput and memory: prefill and decode tokens/s over a grid of shapes.

For every (batch size, prompt length, decode length) of the grid, random
prompt tokens (fixed seed) go through one prefill pass (``use_cache``, logits
of the last position only, as ``generate`` does) and then ``decode`` greedy
single-token steps. Two decoding paths are measured side by side (the grid's
``paths``; the record's ``point`` says which):

- ``eager``: the model's forward pass step by step on the Hugging Face
  dynamic KV cache - what eager ``generate`` does (svdbench's figures before
  the compiled path existed);
- ``compiled``: Hugging Face's static KV cache (preallocated for the grid's
  longest prompt + decode) and a ``torch.compile``-d one-token step
  (``fullgraph``, static shapes), as a deployment would decode. Its prefill is
  eager, so it reports ``decode_tok_s`` and ``kv_cache_mb`` only. The step is
  compiled once per model and batch size; the compile time is excluded from
  the figures and kept in ``extra["compile_seconds"]``. On a CPU it is
  compiled with ``CPU_COMPILE_OPTIONS``: frozen weights, inductor's C++ GEMM
  template autotuned against ATen for each shape, linears that read the same
  input merged into one GEMM, and a C++ wrapper calling the kernels; after the
  first step the compiled step runs without re-checking dynamo's guards (its
  inputs never change shape). On SmolLM2 at batch 1 this decodes about 2.5x
  faster than ``torch.compile``'s defaults. The compile takes one to two
  minutes per model on two cores, which is why the main job's
  ``throughput_quick`` measures the eager path only.

Warm-up passes are run first and excluded; each figure is the median over
``repeats``, with the interquartile range of the per-repeat figures in
``extra["tok_s"]``; on CUDA the device is synchronized before the clock is
read. The engine measures each distinct architecture of a run once
(``per_architecture``, ``bench/engine/shared.py``) and hands them all to
:func:`measure_many`: eager repeats go round the models (dense, A, B, dense,
A, B, ...), so a drift of the machine hits every model alike, and the reports
pair repeat ``i`` of a model with repeat ``i`` of the dense model (same
``extra["session"]``) for each speed-up's interval.

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
cores; ``throughput_quick`` (batch 1, prompt 128, decode 16, eager only, 5 repeats) is
the main job's; ``throughput_v2`` is SVD-LLM V2's setting (batch 4, prompt
1024, decode 256). ``limit`` and ``batch_size`` of the run do not apply.
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import EvalSettings, Measurement, Metric, Task, execution_device, footprint, hookimpl

MIB = 2**20
PATHS = ("eager", "compiled")

# Inductor settings of the compiled path on a CPU. At batch 1 every step streams all weights
# from memory through hundreds of small matrix-vector products: on two cores here ATen's
# default kernel read SmolLM2's matrices at 16-17 GB/s, oneDNN's on packed weights at 27-49.
CPU_COMPILE_OPTIONS = {
    "freezing": True,  # weights become constants of the graph, packed once for the GEMM kernels
    "max_autotune": True,  # inductor's C++ GEMM template, benchmarked against ATen per shape
    "max_autotune_gemm_backends": "CPP,ATEN",
    # linears with the same input (q/k/v, gate/up, and low-rank layers' first factors) as one GEMM
    "cpp.enable_concat_linear": True,
    "cpp_wrapper": True,  # the step's kernels called from C++, not one by one from Python
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """The shapes measured and how often."""

    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_lengths: tuple[int, ...] = (32,)
    repeats: int = 3
    warmup: int = 1
    paths: tuple[str, ...] = PATHS

    def __post_init__(self):
        unknown = sorted(set(self.paths) - set(PATHS))
        if unknown or not self.paths:
            raise ValueError(f"throughput paths {self.paths!r}: each must be one of {PATHS}")

    def points(self) -> list[tuple[int, int, int]]:
        return [(b, p, g) for b in self.batch_sizes for p in self.prompt_lengths for g in self.decode_lengths]


CPU_GRID = Grid(prompt_lengths=(128, 512, 1024))  # 1024: where a KV-cache method's cache shows
QUICK_GRID = Grid(batch_sizes=(1,), prompt_lengths=(128,), decode_lengths=(16,), repeats=5, warmup=1, paths=("eager",))
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


def cache_argument(model: nn.Module) -> str:
    """The forward pass's name for the KV cache: ``cache`` (transformers >= 5.x renamed it), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def generate_timed(model: nn.Module, prompt: torch.Tensor, decode: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, KV-cache bytes) of one greedy generation, without autograd (as deployed,
    and as ``generate`` runs): with it, every decode step's graph stayed alive through the cache - a layer that
    builds its weight in ``forward`` (HQQ's dequantization) then held one copy of the weights per step, 13.9 GB in
    the main job, and every figure carried autograd's bookkeeping."""
    device = prompt.device
    name = cache_argument(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **extra)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefilled = time.perf_counter()
    cache = _returned_cache(out)
    for _ in range(decode):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache = _returned_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    done = time.perf_counter()
    return prefilled - start, done - prefilled, kv_cache_bytes(cache)


class CompiledDecoder:
    """Greedy decoding on Hugging Face's static KV cache with a ``torch.compile``-d one-token step.

    One instance per model and batch size: the cache holds ``max_len``
    positions and the step is compiled for exactly these shapes
    (``fullgraph``: a graph break is an error, never a silent eager fall-back).
    On a CPU with ``CPU_COMPILE_OPTIONS``; the weights are frozen (packed
    copies) into the compiled step, so the model must not change while this
    decoder is used, and the decoder holds about a second copy of them.
    Once the first step has compiled, the others skip dynamo's guard checks
    (about 1.5 ms a step on SmolLM2): every later call has the same shapes,
    so there is nothing the guards could choose between.
    ``compile=False`` runs the same static-cache step eagerly (for tests).
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = True):
        from transformers import StaticCache

        self.model, self.name = model, cache_argument(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.compiled = None
        if compile:
            import torch._inductor.config  # noqa: F401 - patched around the compiling call

            torch._dynamo.reset()  # a fresh model: drop graphs (and guards) compiled for the previous one
            self.compiled = torch.compile(self._step, fullgraph=True, dynamic=False)
        # set around the compiling call, not as torch.compile's options: dynamo itself reads
        # ``freezing`` when it decides whether parameters are graph inputs or constants
        self.options = CPU_COMPILE_OPTIONS if execution_device(model).type == "cpu" else {}
        self.warm = False

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The logits of one decoding step: compiled on the first call, then run without guard checks."""
        if self.compiled is None:
            return self._step(token, position)
        if not self.warm:
            with torch._inductor.config.patch(self.options):
                logits = self.compiled(token, position)
            self.warm = True
            return logits
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self.compiled(token, position)

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=token, position_ids=position, use_cache=True, **{self.name: self.cache}).logits

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, decode: int) -> tuple[float, float, int, list[torch.Tensor]]:
        """(prefill seconds, decode seconds, KV-cache bytes, the greedy tokens) of one generation."""
        device = prompt.device
        self.cache.reset()
        length = prompt.shape[1]
        _sync(device)
        start = time.perf_counter()
        out = self.model(input_ids=prompt, position_ids=torch.arange(length, device=device)[None], use_cache=True,
                         logits_to_keep=1, **{self.name: self.cache})
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        prefilled = time.perf_counter()
        tokens = [token]
        for i in range(decode):
            position = torch.full((1, 1), length + i, dtype=torch.long, device=device)
            token = self.step(token, position)[:, -1:].argmax(-1)
            tokens.append(token)
        _sync(device)
        done = time.perf_counter()
        return prefilled - start, done - prefilled, kv_cache_bytes(self.cache), tokens


def measure_compiled(model: nn.Module, grid: Grid, prompts: dict, weights: int) -> list[Measurement]:
    """Decode tokens/s and static KV-cache size of the compiled path at every grid point."""
    device = execution_device(model)  # the offload hooks' device when blocks are offloaded
    max_len = max(p + g for _, p, g in grid.points())
    measurements = []
    for batch in grid.batch_sizes:
        start = time.perf_counter()
        try:
            decoder = CompiledDecoder(model, max_len)
            first = min(p for _, p, _ in grid.points())
            decoder.generate(prompts[(batch, first, grid.decode_lengths[0])], 1)  # compiles
        except Exception as error:  # no C++ compiler, an unsupported model: say so in the records, keep the rest
            log.warning("throughput: the compiled path failed for batch %d: %s: %s", batch, type(error).__name__, error)
            for b, p, g in (pt for pt in grid.points() if pt[0] == batch):
                point = {"batch_size": b, "prompt_len": p, "decode_len": g, "path": "compiled"}
                measurements.append(Measurement("decode_tok_s", math.nan, {"error": f"{type(error).__name__}: {error}"},
                                                point))
            continue
        compile_seconds = time.perf_counter() - start
        for b, prompt_len, decode in (pt for pt in grid.points() if pt[0] == batch):
            prompt = prompts[(b, prompt_len, decode)]
            for _ in range(grid.warmup):
                decoder.generate(prompt, decode)
            seconds, kv = [], 0
            for _ in range(grid.repeats):
                _, d_s, kv, _ = decoder.generate(prompt, decode)
                seconds.append(d_s)
            point = {"batch_size": b, "prompt_len": prompt_len, "decode_len": decode, "path": "compiled"}
            how = {"repeats": grid.repeats, "warmup": grid.warmup, "device": str(device),
                   "threads": torch.get_num_threads(), "compile_seconds": round(compile_seconds, 2),
                   "cache": f"static, {max_len} positions", "weights_mb": weights / MIB}
            med = statistics.median(seconds)
            measurements += [
                Measurement("decode_tok_s", b * decode / med if decode else float("nan"), {**how, "seconds": seconds},
                            point),
                Measurement("kv_cache_mb", kv / MIB, {**how, "bytes": kv}, point),
            ]
    return measurements


def measure(model: nn.Module, grid: Grid, seed: int = 0) -> list[Measurement]:
    """Every grid point's throughput and memory for ``model`` (in eval mode, on its device), on each path."""
    return measure_many([model], grid, seed)[0]


def measure_many(models: list[nn.Module], grid: Grid, seed: int = 0) -> list[list[Measurement]]:
    """:func:`measure` for several models: the eager path's repeats interleaved across them (round ``i`` of every
    model, then round ``i + 1``), the compiled path model by model (each compile resets dynamo's state)."""
    prompts, weights = [], []
    for model in models:
        device = execution_device(model)  # the offload hooks' device when blocks are offloaded
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.get_text_config().vocab_size
        prompts.append({(b, p, g): torch.randint(0, vocab, (b, p), generator=generator).to(device)
                        for b, p, g in grid.points()})
        weights.append(footprint(model)["bytes"])
    measured = measure_eager(models, grid, prompts, weights) if "eager" in grid.paths else [[] for _ in models]
    if "compiled" in grid.paths:
        for i, model in enumerate(models):
            measured[i] += measure_compiled(model, grid, prompts[i], weights[i])
    return measured


def spread(values: list[float]) -> dict:
    """Median and interquartile range of repeated figures."""
    q1, med, q3 = (float(v) for v in torch.tensor(values, dtype=torch.float64).quantile(
        torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
    return {"median": med, "q1": q1, "q3": q3}


def measure_eager(models: list[nn.Module], grid: Grid, prompts: list[dict], weights: list[int]) -> list[list[Measurement]]:
    """Prefill/decode tokens/s, peak memory and KV-cache size of eager decoding on the dynamic cache, per model;
    warm-up and repeats go round the models (dense, A, B, dense, A, B, ...), so drift hits all alike."""
    devices = [execution_device(model) for model in models]  # the offload hooks' device when blocks are offloaded
    session = f"{time.time_ns():x}"  # models measured in one interleaved session: their repeats pair by round
    out: list[list[Measurement]] = [[] for _ in models]
    for batch, prompt_len, decode in grid.points():
        point_key = (batch, prompt_len, decode)
        for _ in range(grid.warmup):
            for model, prompt in zip(models, prompts):
                generate_timed(model, prompt[point_key], decode)
        runs = [{"prefill": [], "decode": [], "increments": [], "exact": True, "kv": 0} for _ in models]
        for _ in range(grid.repeats):
            for model, prompt, device, run in zip(models, prompts, devices, runs):
                with _PeakMemory(device) as peak:
                    p_s, d_s, run["kv"] = generate_timed(model, prompt[point_key], decode)
                run["prefill"].append(p_s)
                run["decode"].append(d_s)
                run["increments"].append(peak.increment)
                run["exact"] &= peak.exact
        for i, run in enumerate(runs):
            device, prefill, dec, increments = devices[i], run["prefill"], run["decode"], run["increments"]
            point = {"batch_size": batch, "prompt_len": prompt_len, "decode_len": decode, "path": "eager"}
            how = {"repeats": grid.repeats, "warmup": grid.warmup, "device": str(device),
                   "threads": torch.get_num_threads(), "session": session, "interleaved_models": len(models),
                   "round_position": i}
            prefill_rates = [batch * prompt_len / s for s in prefill]
            decode_rates = [batch * decode / s for s in dec] if decode else []
            out[i] += [
                Measurement("prefill_tok_s", batch * prompt_len / statistics.median(prefill),
                            {**how, "seconds": prefill, "tok_s": spread(prefill_rates)}, point),
                Measurement("decode_tok_s", batch * decode / statistics.median(dec) if decode else float("nan"),
                            {**how, "seconds": dec, **({"tok_s": spread(decode_rates)} if decode_rates else {})},
                            point),
                Measurement("peak_mem_mb", (weights[i] + max(increments)) / MIB,
                            {**how, "weights_mb": weights[i] / MIB, "peak_increment_mb": max(increments) / MIB,
                             "peak_increment_exact": run["exact"],
                             "source": "cuda max_memory_allocated" if device.type == "cuda" else "process VmHWM - VmRSS"},
                            point),
                Measurement("kv_cache_mb", run["kv"] / MIB, {**how, "bytes": run["kv"]}, point),
            ]
    return out


class Throughput(Task):
    """Prefill/decode tokens/s, peak memory and KV-cache size over a grid of shapes.

    ``per_architecture``: the engine measures each distinct architecture of a run once, all of them interleaved
    (:meth:`evaluate_many`); models of one architecture share that measurement.
    """

    per_architecture = True

    metrics = {"prefill_tok_s": Metric("throughput", True, "tokens/s"), "decode_tok_s": Metric("throughput", True, "tokens/s"),
               "peak_mem_mb": Metric("memory", False, "MiB"), "kv_cache_mb": Metric("memory", False, "MiB")}

    def __init__(self, name: str = "throughput", grid: Grid = CPU_GRID, description: str = ""):
        self.name, self.grid = name, grid
        self.description = description or (f"prefill/decode tokens/s and peak memory, batch {grid.batch_sizes} x "
                                           f"prompt {grid.prompt_lengths} x decode {grid.decode_lengths}, "
                                           f"{' and '.join(grid.paths)} decoding")

    def settings_key(self, settings: EvalSettings) -> dict:
        # "autograd": figures measured before decoding ran without autograd are not these figures
        return {"grid": dataclasses.asdict(self.grid), "device": settings.device, "autograd": False}

    def evaluate(self, model, tokenizer, settings: EvalSettings) -> list[Measurement]:
        return measure(model, self.grid)

    def evaluate_many(self, models, tokenizer, settings: EvalSettings) -> list[list[Measurement]]:
        return measure_many(models, self.grid)


@hookimpl
def register_tasks(register):
    register(Throughput("throughput", CPU_GRID))
    register(Throughput("throughput_quick", QUICK_GRID, "one point (batch 1, prompt 128, decode 16), eager decoding: "
                        "the main job's speed-up check, a few seconds per model on two CPU cores"))
    register(Throughput("throughput_v2", V2_GRID, "SVD-LLM V2 setting: batch 4, prompt 1024, decode 256"))
