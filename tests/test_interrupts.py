"""A Ctrl-C that lands inside a finalizer (where Python drops it) still stops the run."""

from __future__ import annotations

import signal
import sys

import pytest

from bench import interrupts
from bench.memory import release_free_memory


class _Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs here; Python drops its KeyboardInterrupt


@pytest.fixture
def handler():
    before, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    interrupts.install()
    yield
    signal.signal(signal.SIGINT, before)
    sys.unraisablehook = hook


def test_an_interrupt_swallowed_by_a_finalizer_is_raised_at_the_next_check(handler):
    obj = _Finalized()
    del obj  # "Exception ignored in ... KeyboardInterrupt": without the flag the run would go on
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
    interrupts.check()  # once: the flag is cleared


def test_releasing_memory_raises_an_interrupt_swallowed_during_garbage_collection(handler):
    cycle = _Finalized()
    cycle.self = cycle  # freed only by the collector, inside gc.collect()
    del cycle
    with pytest.raises(KeyboardInterrupt):
        release_free_memory()


def test_without_the_handler_nothing_is_raised():
    interrupts.check()
