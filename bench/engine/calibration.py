"""The calibration engine: token windows, and statistics collected block by block and stored on disk.

Statistics are taken on the **original** model, accumulated in float64 per
layer; activations are never kept beyond one decoder block.

**Forward statistics** (gram, abs_mean, block inputs) stream through the
model one decoder block at a time: for every calibration window, the first
block's hidden states and the arguments the model gives *each* block (its
attention mask and position embeddings, which differ per layer type in
Gemma-2/3 and every config with ``layer_types``) are captured once, by the
model's own forward pass with every block passing its input through; then
each block in turn is brought to the device, runs every window's hidden
states with its own arguments and the statistics' hooks on its linears,
passes its outputs on as the next block's inputs, and is put back. The hooks
see exactly the tensors a whole-model pass would show them, in the same
order per layer, so the statistics equal it (tested per family in
``tests/test_families.py``). Linears that read the same input (q/k/v,
gate/up) share one statistic: the engine detects them on the first window.

**Gradient statistics** (fisher, grad_norm) need the LM loss's gradient. Per
window, the blocks run forward once (no graph) keeping each block's input;
the loss and its gradient with respect to the last block's output come from
the model's own head; then the blocks run backward from the last to the
first, each recomputed from its kept input (and its own arguments) with a graph. Memory: one block's
activations with their graph, plus one window's hidden states at every block
boundary (blocks x seqlen x hidden), instead of the whole model's graph.

Every statistic is stored as it is made, one file per block
(:mod:`bench.engine.stores`), under a key of the model identity, the
calibration data checksum and every calibration setting. ``collect_statistics``
calls ``on_block`` with each block's statistics as they become available -
from the pass, or read back from the store - so a caller can decompose the
block's matrices right away and never hold more than one block's statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.api.statistic import CalibrationStats, Statistic
from bench.corpora import calibration_checksum, calibration_text
from bench.engine.config import CalibrationConfig
from bench.engine.stores import Entry, EntryWriter, LazyTensors, block_file, open_entry, store_root
from bench.errors import NonFinite, UsageError
from bench.model.targets import Target, decoder_blocks, execution_device

log = logging.getLogger(__name__)

# on_block(index, the block's targets, {statistic: {key: tensor}} of that block, input groups)
BlockCallback = Callable[[int, list[Target], dict[str, dict[str, torch.Tensor]], dict[str, str]], None]


def calibration_batches(tokenizer, config: CalibrationConfig) -> torch.Tensor:
    """``samples x seqlen`` token windows at seeded random offsets."""
    ids = tokenizer(calibration_text(config.dataset), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= config.seqlen:
        raise UsageError(f"calibration text has {ids.numel()} tokens, fewer than --calib-seqlen {config.seqlen}")
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seqlen, (config.samples,), generator=generator)
    return torch.stack([ids[s:s + config.seqlen] for s in starts.tolist()])


# --------------------------------------------------------------------------- running blocks

class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured")
        self.args_, self.kwargs = args, kwargs


def _split_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A block call's hidden states and every other argument, as keywords (positional extras kept in order)."""
    kwargs = dict(kwargs)
    if args:
        hidden, extra = args[0], args[1:]
    else:
        hidden, extra = kwargs.pop("hidden_states"), ()
    if extra:
        kwargs[_POSITIONAL] = extra
    return hidden, kwargs


_POSITIONAL = "__svdbench_positional__"


def first_block_inputs(model: nn.Module, window: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states and keyword arguments the first decoder block receives for one window."""
    _, blocks = decoder_blocks(model)

    def capture(_module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(window[None].to(execution_device(model)), use_cache=False)
    except _Captured as captured:
        return _split_inputs(captured.args_, captured.kwargs)
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__} never called its first decoder block")


def block_inputs(model: nn.Module, window: torch.Tensor, tuple_output: bool) -> tuple[torch.Tensor, list[dict]]:
    """The first block's hidden states and, for *every* block, the other arguments the model gives it.

    Models give their blocks different arguments per layer type (Gemma-2/3's
    sliding-window and global masks, Gemma-3's local and global RoPE, any
    config with ``layer_types``), so each block's are captured from the
    model's own forward pass: every block passes its input through unchanged
    (nothing is computed) while a pre-hook records what it was called with,
    and the pass stops at the last block (no head, no logits).
    """
    _, blocks = decoder_blocks(model)
    captured: list[dict] = []
    first: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        hidden, rest = _split_inputs(args, kwargs)
        if not first:
            first.append(hidden)
        captured.append(rest)
        if len(captured) == len(blocks):
            raise _Captured((), {})

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        with torch.no_grad(), _passing_through(blocks, None, tuple_output):
            model(window[None].to(execution_device(model)), use_cache=False)
    except _Captured:
        return first[0], captured
    finally:
        for handle in handles:
            handle.remove()
    raise RuntimeError(f"{type(model).__name__} called {len(captured)} of its {len(blocks)} decoder blocks")


def returns_tuple(model: nn.Module, window: torch.Tensor) -> bool:
    """Whether the model's decoder blocks return a tuple (Bloom, Falcon) or the hidden states alone: block 0, run once."""
    _, blocks = decoder_blocks(model)
    hidden, kwargs = first_block_inputs(model, window)
    with torch.no_grad(), on_device(blocks[0], execution_device(model)):
        return isinstance(_call(blocks[0], hidden, kwargs), tuple)


def _call(block: nn.Module, hidden: torch.Tensor, kwargs: dict):
    if _POSITIONAL in kwargs:
        kwargs = dict(kwargs)
        return block(hidden, *kwargs.pop(_POSITIONAL), **kwargs)
    return block(hidden, **kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One block's output hidden states (decoder layers return a tensor or a tuple starting with it)."""
    out = _call(block, hidden, kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def on_device(module: nn.Module, device):
    """``module`` on ``device`` for the duration (put back where it was after); a no-op when it is there
    or when offload hooks move its weights themselves (they sit on the meta device then)."""
    param = next(module.parameters(), None)
    home = param.device if param is not None else torch.device(device)
    if home == torch.device(device) or home.type == "meta":
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextmanager
def _passing_through(blocks: nn.ModuleList, last: torch.Tensor | None, tuple_output: bool):
    """Every block returns without computing: the last one returns ``last`` (None: its input), the others their
    input."""
    for i, block in enumerate(blocks):
        result = last if i == len(blocks) - 1 else None

        def forward(hidden=None, *args, _result=result, **kwargs):
            hidden = kwargs.get("hidden_states") if hidden is None else hidden
            value = _result if _result is not None else hidden
            return (value,) if tuple_output else value

        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


# --------------------------------------------------------------------------- the passes

def window_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Every window's first-block hidden states, and ``kwargs[j][i]``: what block ``i`` receives for window ``j``."""
    tuple_output = returns_tuple(model, windows[0])
    hidden, kwargs = [], []
    for window in tqdm(windows, desc="calibration (inputs)", leave=False, unit="sample"):
        h, k = block_inputs(model, window, tuple_output)
        hidden.append(h)
        kwargs.append(k)
    return hidden, kwargs


def _by_block(targets: list[Target]) -> dict[int, list[Target]]:
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
    by_block = _by_block(targets)
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
    by_block = _by_block(targets)
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
            with torch.enable_grad(), _passing_through(blocks, last, tuple_output):
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


# --------------------------------------------------------------------------- collection with the store

class StatisticsStore:
    """Where statistics entries live (``SVDBENCH_STATS_CACHE``, else ``<cache>/stats``)."""

    def __init__(self, root=None):
        from pathlib import Path

        self.root = Path(root) if root else store_root("stats")

    def fields(self, statistic: Statistic, model_identity: str, config: CalibrationConfig,
               targets: list[Target]) -> dict:
        fields = {"statistic": statistic.name, "version": statistic.version, "scope": statistic.scope,
                  "model": model_identity, "calibration": asdict(config),
                  "data_sha256": calibration_checksum(config.dataset), "targets": [t.name for t in targets]}
        if statistic.windows is not None:  # only then: the keys of every other statistic stay as they were
            fields["windows"] = statistic.windows
        return fields


def stored_statistics(model_identity: str, targets: list[Target], config: CalibrationConfig,
                      statistics: list[Statistic], cache: StatisticsStore | None = None) -> CalibrationStats | None:
    """The statistics from the store alone (no model needed), or None when any of them is missing."""
    store = cache or StatisticsStore()
    entries = {}
    for statistic in statistics:
        entry = open_entry(store.root, store.fields(statistic, model_identity, config, targets), statistic.name)
        if entry is None:
            return None
        entries[statistic.name] = entry
    return CalibrationStats(values={name: LazyTensors(entry) for name, entry in entries.items()},
                            input_group=_stored_groups(entries))


def collect_statistics(model: nn.Module, model_identity: str, targets: list[Target], batches: torch.Tensor,
                       config: CalibrationConfig, statistics: list[Statistic], device="cpu",
                       cache: StatisticsStore | None = None, on_block: BlockCallback | None = None,
                       computed: list[str] | None = None) -> CalibrationStats:
    """Statistics for ``targets``: read from the store where present, computed (and stored) otherwise.

    With ``on_block``, it is called once per decoder block with that block's
    statistics, whether they were just computed or read back from the store.
    The names of the statistics computed (not read) are appended to
    ``computed``. The result reads every value from the store on use.
    """
    store = cache or StatisticsStore()
    fields = {s.name: store.fields(s, model_identity, config, targets) for s in statistics}
    entries: dict[str, Entry] = {}
    for statistic in statistics:
        entry = open_entry(store.root, fields[statistic.name], f"statistic '{statistic.name}'")
        if entry is not None:
            entries[statistic.name] = entry
    missing = [s for s in statistics if s.name not in entries]
    if computed is not None:
        computed += [s.name for s in missing]
    forward = [s for s in missing if not s.needs_backward]
    backward = [s for s in missing if s.needs_backward]
    by_block = _by_block(targets)
    prefix, blocks = decoder_blocks(model)
    block_of = {t.name: t.block for t in targets} | {f"{prefix}.{i}": i for i in range(len(blocks))}
    was_training = model.training
    model.eval()
    try:
        if backward:
            log.info("collecting %s (gradients) on %d x %d calibration tokens", ", ".join(s.name for s in backward),
                     *batches.shape)
            results = gradient_statistics(model, targets, batches, backward, device)
            for statistic in backward:
                writer = EntryWriter(store.root, fields[statistic.name])
                table = results[statistic.name]
                for index in sorted({block_of[key] for key in table}):
                    writer.write_block(index, {k: v for k, v in table.items() if block_of[k] == index})
                writer.finish()
                entries[statistic.name] = open_entry(store.root, fields[statistic.name], statistic.name)
        groups = _stored_groups(entries)

        def deliver(index: int, fresh: dict[str, dict[str, torch.Tensor]]) -> None:
            if on_block is None:
                return
            values = dict(fresh)
            for name, entry in entries.items():
                if name not in values:
                    file = block_file(index)
                    values[name] = entry.read_file(file) if file in entry.manifest["files"] else {}
            on_block(index, by_block.get(index, []), values, groups)

        if forward:
            log.info("collecting %s on %d x %d calibration tokens, block by block", ", ".join(s.name for s in forward),
                     *batches.shape)
            writers = {s.name: EntryWriter(store.root, fields[s.name]) for s in forward}
            try:
                def visit(index, results, found_groups):
                    groups.update(found_groups)
                    for name, writer in writers.items():
                        writer.write_block(index, results[name])
                    deliver(index, results)

                forward_statistics(model, targets, batches, forward, device, visit)
                for writer in writers.values():
                    writer.finish({"groups": groups})
            except BaseException:
                for writer in writers.values():
                    writer.abandon()
                raise
        elif on_block is not None:
            for index in range(len(blocks)):
                deliver(index, {})
    finally:
        model.train(was_training)
    for statistic in statistics:  # reopen what was just written: the result reads verified entries only
        entry = open_entry(store.root, fields[statistic.name], f"statistic '{statistic.name}'")
        if entry is None:
            raise RuntimeError(f"statistic '{statistic.name}' was written but cannot be read back from {store.root}")
        entries[statistic.name] = entry
    return CalibrationStats(values={name: LazyTensors(entry) for name, entry in entries.items()},
                            input_group=_stored_groups(entries))


def _stored_groups(entries: dict[str, Entry]) -> dict[str, str]:
    groups: dict[str, str] = {}
    for entry in entries.values():
        groups.update(entry.meta.get("groups", {}))
    return groups
