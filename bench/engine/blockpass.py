"""A calibration pass over any model, block by block: what refiners use on the *compressed* model.

The statistics pass (:mod:`bench.engine.calibration`) streams the windows
through the original model; :func:`stream_blocks` is the same stream made
available step by step, so that a refiner can look at one block's inputs,
change the block, and only then pass its outputs on to the next block. It
reuses the statistics pass's machinery (the per-block arguments captured from
the model's own forward, ``run_block``, ``on_device``): the hidden states a
block sees are exactly those a whole-model pass of the model *as it is at
that point* would give it. Memory: one window's hidden states per window
(``samples x seqlen x hidden``), one block on the device at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bench.engine.calibration import on_device, run_block, window_inputs
from bench.model.targets import decoder_blocks


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
