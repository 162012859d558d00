"""Giving freed memory back to the operating system between the phases of a training step.

glibc's allocator keeps freed heap memory for reuse and raises its mmap threshold after large frees, so the
buffers a phase frees (sampling's KV cache, an update's activations) stay resident: measured on the embedded
online-DPO run, resident memory after a step's update rose by about 25 MB per micro-batch of pairs and did
not come back, while a loop that called ``malloc_trim(0)`` after each update stayed flat at the same numbers
(``leaderboards/perf/README.md``). :func:`trim` asks glibc to return what is free; it changes no value. The
rule (:func:`allocator`): glibc -> trim after each phase; any other C library -> nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def allocator() -> str:
    """What :func:`trim` does on this machine, for a run's recorded config."""
    return "glibc: malloc_trim after each phase" if _malloc_trim() is not None else "no trimming (not glibc)"


def trim() -> None:
    """Return freed heap memory to the operating system (glibc ``malloc_trim(0)``); a no-op elsewhere."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def resident_mb() -> float:
    """Resident memory of this process now, in MB (Linux ``/proc``; 0.0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
