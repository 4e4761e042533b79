"""The statistics passes over the original model, accumulated in float64 per layer.

**Forward statistics** (gram, abs_mean, block inputs and outputs) stream the
windows through the model one decoder block at a time
(:mod:`bench.engine.blocks`) with the statistics' hooks on each block's
linears: the hooks see exactly the tensors a whole-model pass would show
them, in the same order per layer, so the statistics equal it (tested per
family in ``tests/test_families.py``). Linears that read the same input
(q/k/v, gate/up) share one statistic: the engine detects them on the first
window.

**Gradient statistics** (fisher, grad_norm) need the LM loss's gradient. Per
window, the blocks run forward once (no graph) keeping each block's input;
the loss and its gradient with respect to the last block's output come from
the model's own head; then the blocks run backward from the last to the
first, each recomputed from its kept input (and its own arguments) with a
graph. Memory: one block's activations with their graph, plus one window's
hidden states at every block boundary (blocks x seqlen x hidden), instead of
the whole model's graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.api.statistic import Statistic
from bench.engine.blocks import block_inputs, on_device, passing_through, returns_tuple, run_block, window_inputs
from bench.errors import NonFinite
from bench.model.targets import Target, decoder_blocks, execution_device

# on_block(index, the block's targets, {statistic: {key: tensor}} of that block, input groups)
BlockCallback = Callable[[int, list[Target], dict[str, dict[str, torch.Tensor]], dict[str, str]], None]


def targets_by_block(targets: list[Target]) -> dict[int, list[Target]]:
    out: dict[int, list[Target]] = {}
    for target in targets:
        out.setdefault(target.block, []).append(target)
    return out


def forward_statistics(model: nn.Module, targets: list[Target], windows: torch.Tensor, statistics: list[Statistic],
                       device, on_block: Callable[[int, dict[str, dict[str, torch.Tensor]], dict[str, str]], None],
                       ) -> dict[str, str]:
    """Stream ``windows`` through the blocks, calling ``on_block(index, results, groups)`` after each; returns the groups.

    ``results`` holds this block's value of every statistic (keys: the
    block's input-group leaders, or the block's name for block and block_io
    scope ones).
    """
    prefix, blocks = decoder_blocks(model)
    by_block = targets_by_block(targets)
    per_input = [s for s in statistics if s.scope == "input"]
    per_block = [s for s in statistics if s.scope in ("block", "block_io")]
    hidden, kwargs = window_inputs(model, windows)
    groups: dict[str, str] = {}
    for index, block in enumerate(tqdm(blocks, desc="calibration (blocks)", leave=False, unit="block")):
        for statistic in statistics:
            statistic.start()
        with on_device(block, device):
            first = {"window": True}
            handles = _observe(model, block, f"{prefix}.{index}", by_block.get(index, []), per_input, per_block,
                               groups, first)
            try:
                with torch.no_grad():
                    for j in range(len(hidden)):
                        hidden[j] = run_block(block, hidden[j], kwargs[j][index])
                        first["window"] = False
            finally:
                for handle in handles:
                    handle.remove()
        results = {s.name: s.result() for s in statistics}
        _check_finite(results, f"block {index}")
        on_block(index, results, groups)
        del results  # not held through the next block's pass
    return groups


def _observe(model: nn.Module, block: nn.Module, block_name: str, targets: list[Target], per_input: list[Statistic],
             per_block: list[Statistic], groups: dict[str, str], first: dict) -> list:
    """Hooks feeding one block's statistics: its linears' inputs (one per input group) and its own input."""
    last: dict = {"tensor": None, "target": None}

    def hook(target: Target):
        def observe(_module, inputs, _output):
            x = inputs[0]  # the very object: q/k/v (gate/up) receive the same one
            if first["window"]:
                same = last["tensor"] is x
                groups[target.name] = groups[last["target"]] if same else target.name
                last["tensor"], last["target"] = x, target.name
            if groups[target.name] != target.name:
                return
            flat = x.detach().reshape(-1, x.shape[-1])
            for statistic in per_input:
                statistic.observe(target.name, flat)
        return observe

    def flat(h: torch.Tensor) -> torch.Tensor:
        return h.detach().reshape(-1, h.shape[-1])

    def block_hook(_module, args, kwargs):
        for statistic in per_block:
            if statistic.scope == "block":
                statistic.observe(block_name, flat(args[0] if args else kwargs["hidden_states"]))

    def block_io_hook(_module, args, kwargs, output):
        x = flat(args[0] if args else kwargs["hidden_states"])
        y = flat(output[0] if isinstance(output, tuple) else output)
        for statistic in per_block:
            if statistic.scope == "block_io":
                statistic.observe(block_name, torch.stack([x, y]))

    handles = [model.get_submodule(t.name).register_forward_hook(hook(t)) for t in targets] if per_input else []
    if any(s.scope == "block" for s in per_block):
        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
    if any(s.scope == "block_io" for s in per_block):
        handles.append(block.register_forward_hook(block_io_hook, with_kwargs=True))
    return handles


def gradient_statistics(model: nn.Module, targets: list[Target], windows: torch.Tensor, statistics: list[Statistic],
                        device) -> dict[str, dict[str, torch.Tensor]]:
    """Every gradient statistic, one window at a time, blocks recomputed backward one at a time (see module)."""
    _, blocks = decoder_blocks(model)
    by_block = targets_by_block(targets)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for target in targets:
        model.get_submodule(target.name).weight.requires_grad_(True)
    for statistic in statistics:
        statistic.start()
    try:
        tuple_output = returns_tuple(model, windows[0])
        limits = [s.windows or len(windows) for s in statistics]
        windows = windows[:max(limits)]  # no backward pass that no statistic observes
        for number, window in enumerate(tqdm(windows, desc="calibration (gradients)", leave=False, unit="sample")):
            hidden, kwargs = block_inputs(model, window, tuple_output)
            inputs = []
            with torch.no_grad():
                for index, block in enumerate(blocks):
                    inputs.append(hidden)
                    with on_device(block, device):
                        hidden = run_block(block, hidden, kwargs[index])
            last = hidden.detach().requires_grad_(True)
            ids = window[None].to(execution_device(model))
            with torch.enable_grad(), passing_through(blocks, last, tuple_output):
                loss = model(ids, labels=ids, use_cache=False).loss  # HF shifts the labels itself
            if not torch.isfinite(loss):
                raise NonFinite(None, "statistics", f"calibration loss ({float(loss)}) on the original model")
            (grad,) = torch.autograd.grad(loss, last)
            for index in reversed(range(len(blocks))):
                block = blocks[index]
                with on_device(block, device), torch.enable_grad():
                    h = inputs[index].detach().requires_grad_(index > 0)
                    run_block(block, h, kwargs[index]).backward(grad)
                    for target in by_block.get(index, []):
                        weight = model.get_submodule(target.name).weight
                        for statistic, limit in zip(statistics, limits):
                            if number < limit:
                                statistic.observe(target.name, weight.grad)
                        weight.grad = None
                grad = h.grad if index > 0 else None
                inputs[index] = None
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
    results = {s.name: s.result() for s in statistics}
    _check_finite(results, "gradients")
    return results


def _check_finite(results: dict[str, dict[str, torch.Tensor]], where: str) -> None:
    for name, table in results.items():
        for key, tensor in table.items():
            if not torch.isfinite(tensor).all():
                raise NonFinite(key, "statistics", f"statistic '{name}' ({where}; the original model produces NaN/inf "
                                                   "on the calibration text)")

