"""The statistic contract: calibration statistics that methods ask for by name.

A statistic is collected once per (model, calibration settings) and shared by
every method that lists its name in ``requires``. Subclasses accumulate in
float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


class Statistic:
    """A calibration statistic.

    Forward statistics (``needs_backward = False``) observe the input of each
    distinct input group (``key`` = the first target reading it, ``tensor`` =
    tokens x in_features); with ``scope = "block"`` they observe instead the
    hidden states entering each decoder block (``key`` = the block's module
    path, e.g. ``model.layers.3``; ``tensor`` = tokens x hidden); with
    ``scope = "block_io"`` they observe each block's input and output
    together (same key; ``tensor`` = 2 x tokens x hidden, input first). Backward
    statistics observe each target's weight gradient of the LM loss, once per
    calibration sample (``key`` = target name, ``tensor`` = out x in).
    ``version`` is part of the cache key: bump it when the statistic's
    definition changes. ``windows`` (backward statistics): observe only the
    first that many of the run's calibration windows (``None``: all of them);
    statistics have no windows of their own, they read the run's
    (``--calib-samples`` x ``--calib-seqlen``). Part of the cache key when set.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_backward: ClassVar[bool] = False
    scope: ClassVar[str] = "input"  # "input": each linear's input; "block": each block's input; "block_io": both
    version: ClassVar[str] = "1"
    windows: ClassVar[int | None] = None

    def start(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def observe(self, key: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def add(self, key: str, value: torch.Tensor, count: int) -> None:
        """Accumulate ``value`` (already float64) observed over ``count`` tokens or samples."""
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()
        self.counts[key] = self.counts.get(key, 0) + count

    def result(self) -> dict[str, torch.Tensor]:
        return self.sums


@dataclass
class CalibrationStats:
    """Collected statistics, looked up by statistic and target name."""

    values: dict[str, dict[str, torch.Tensor]]
    input_group: dict[str, str]  # target name -> the target whose input it shares (forward statistics only)

    def get(self, statistic: str, target: str) -> torch.Tensor:
        if statistic not in self.values:
            raise KeyError(f"statistic '{statistic}' was not collected; list it in the method's `requires`")
        table = self.values[statistic]
        return table[target] if target in table else table[self.input_group.get(target, target)]
