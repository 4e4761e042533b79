"""Running a model one decoder block at a time, with the arguments the model itself gives each block.

For every calibration window, the first block's hidden states and the
arguments the model gives *each* block (its attention mask and position
embeddings, which differ per layer type in Gemma-2/3 and every config with
``layer_types``) are captured once, by the model's own forward pass with
every block passing its input through. Then each block in turn is brought
to the device, runs every window's hidden states with its own arguments and
passes its outputs on as the next block's inputs. The statistics pass
(:mod:`bench.engine.passes`) hooks the blocks' linears on the way;
:func:`stream_blocks` offers the same stream step by step to a refiner,
which may change a block before its outputs move on (AdaSVD on the
compressed model). Memory: one window's hidden states per window, one block
on the device at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.model.targets import decoder_blocks, execution_device

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
        with torch.no_grad(), passing_through(blocks, None, tuple_output):
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
def passing_through(blocks: nn.ModuleList, last: torch.Tensor | None, tuple_output: bool):
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


@dataclass
class BlockStep:
    """One decoder block of a pass: ``run()`` feeds it every window's current input (its outputs are dropped;
    hooks on its modules see what it computes). The pass passes the block's outputs on when the step ends."""

    index: int
    name: str
    block: nn.Module
    _hidden: list[torch.Tensor]
    _kwargs: list[list[dict]]

    @torch.no_grad()
    def run(self) -> None:
        for j, hidden in enumerate(self._hidden):
            run_block(self.block, hidden, self._kwargs[j][self.index])

    @torch.no_grad()
    def advance(self) -> None:
        for j, hidden in enumerate(self._hidden):
            self._hidden[j] = run_block(self.block, hidden, self._kwargs[j][self.index])


def stream_blocks(model: nn.Module, windows: torch.Tensor, device) -> Iterator[BlockStep]:
    """Yield every decoder block of ``model`` in order, on ``device``, with the calibration ``windows``' inputs.

    After the consumer's turn the block (as the consumer left it) runs every
    window and its outputs become the next block's inputs.
    """
    prefix, blocks = decoder_blocks(model)
    was_training = model.training
    model.eval()
    try:
        hidden, kwargs = window_inputs(model, windows)
        for index, block in enumerate(blocks):
            with on_device(block, device):
                step = BlockStep(index, f"{prefix}.{index}", block, hidden, kwargs)
                yield step
                step.advance()
    finally:
        model.train(was_training)
