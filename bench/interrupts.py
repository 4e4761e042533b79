"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT
arrives - also inside a finalizer (``__del__``, a weakref callback) run by
the garbage collector, where the exception is printed as "Exception
ignored" and dropped, and the run would go on. :func:`install` (the CLI
calls it) makes SIGINT also set a flag, and keeps the dropped interrupt's
traceback off the terminal; :func:`check`, called after every garbage
collection and every finished cell, raises KeyboardInterrupt when an
interrupt arrived and was swallowed.
"""

from __future__ import annotations

import signal
import sys
import threading

_interrupted = threading.Event()


def _on_sigint(signum, frame):
    _interrupted.set()
    raise KeyboardInterrupt


def _quiet_about_interrupts(unraisable, _default=sys.unraisablehook):
    if unraisable.exc_type is KeyboardInterrupt and _interrupted.is_set():
        return  # raised again by the next check(); no traceback for a Ctrl-C
    _default(unraisable)


def install() -> None:
    """Route SIGINT through the flag (main thread only; where SIGINT is ignored it stays ignored)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        _interrupted.clear()
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _quiet_about_interrupts


def check() -> None:
    """Raise KeyboardInterrupt when SIGINT arrived since :func:`install` (once: the flag is cleared)."""
    if _interrupted.is_set():
        _interrupted.clear()
        raise KeyboardInterrupt
