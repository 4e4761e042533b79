"""Giving freed memory back to the operating system, so peak memory reflects what is really held.

glibc keeps the memory of freed allocations below its mmap threshold for
reuse; after a phase that allocated and freed a lot (an evaluation, one
block's statistics and factorizations) the process would otherwise keep it
resident. ``malloc_trim(0)`` returns it. Elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

from bench.interrupts import check as check_interrupt


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free memory back to the OS (glibc only)."""
    gc.collect()
    check_interrupt()  # a Ctrl-C that arrived inside a finalizer was swallowed there
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
