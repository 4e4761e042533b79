"""How svdbench uses the C allocator: freed memory is reused within a phase and given back after it.

**Within a phase** (:func:`reuse_freed_memory`, set once at start). glibc
returns a freed block above its mmap threshold (dynamic, 128 KiB at first)
to the kernel at once, and shrinks the heap whenever its free top passes the
trim threshold; the next allocation of that size then faults its pages back
in, zeroed by the kernel. A forward pass allocates and frees its
activations hundreds of times, so ASVD's sensitivity search spent 187 s of
system time on 109 million page faults in 7 min. svdbench fixes the mmap
threshold at glibc's largest, 32 MiB, and stops automatic trimming: blocks
up to 32 MiB come from the heap and are reused (the whole search: 431.5
-> 356.2 s, system time 187 -> 62 s, 109 -> 35 million page faults).

**After a phase** (:func:`release_free_memory`). Once a phase that
allocated and freed a lot is over (an evaluation, one block's statistics
and factorizations), ``malloc_trim(0)`` hands the free memory back, so peak
memory reflects what is really held. Elsewhere (not glibc) both do nothing.
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: allocations up to this size come from the heap
TRIM_THRESHOLD = 2**31 - 1  # never trim on free; release_free_memory() trims after each phase
allocator_settings: dict = {}  # what reuse_freed_memory() set in this process (the run manifest records it)


def reuse_freed_memory() -> dict:
    """Keep freed blocks up to 32 MiB in the heap for reuse (glibc ``mallopt``); returns what was set."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        settings = {"allocator": "unchanged (no glibc mallopt)"}
    elif not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        settings = {"allocator": "unchanged (mallopt refused)"}
    else:
        settings = {"allocator": "glibc", "mmap_threshold": MMAP_THRESHOLD, "trim": "after each phase"}
    allocator_settings.update(settings)
    return settings


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free memory back to the OS (glibc only)."""
    gc.collect()
    check_interrupt()  # a Ctrl-C that arrived inside a finalizer was swallowed there
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
