"""Keep the coordinator's freed memory for reuse instead of handing it back to the kernel.

The coordinator holds each update's shard payloads until the update completes,
then frees them all at once; every round allocates model-sized float64 sums
and float32 vectors. With glibc's defaults those blocks are mmap'd (or trimmed
off the heap, or live in per-thread heaps that are unmapped when empty), so the
next round touches fresh pages again: 64 page faults per 256 KiB shard, which on
this VM cost more CPU than hashing the shard (benchmarks/ingest.py measured
~66,000 faults per 256 MiB round on paho's receive thread).

:func:`keep_freed_memory` asks glibc (``mallopt``) to serve every allocation
from the heap and never trim it, from one arena. Memory is then reused hot, as
in a long-running server it should be; the price is that the process's RSS
stays at its high-water mark (about two rounds' worth of updates in flight).
It is a no-op where there is no glibc ``mallopt`` (musl, macOS) and can be
turned off with ``FEDSYNC_MALLOC=default``. Call it before threads start:
glibc fixes the arena limit when the first extra arena is made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("fedsync")

# glibc malloc.h parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc for reuse (see the module docstring); True if it took effect."""
    global _done
    if _done:
        return True
    if os.environ.get("FEDSYNC_MALLOC", "").lower() == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 0),  # no mmap'd chunks: large blocks come from the heap and go back to it
        (M_TRIM_THRESHOLD, 2**31 - 1),  # never shrink the heap
        (M_ARENA_MAX, 1),  # one arena: a block freed by one thread is reused by another
    ))
    _done = ok
    log.debug("malloc_tuned ok=%s", ok)
    return ok
