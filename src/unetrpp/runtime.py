"""Process-level runtime settings for CPU speed (opt-in; the CLI and benchmarks call them)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in the heap instead of returning them to the OS (glibc only).

    glibc serves every allocation above its mmap threshold with a fresh ``mmap``, so each new
    64 MB activation of a 3-D network is page-faulted in again: about 3x the cost of the
    arithmetic of an element-wise op. Turning that off made the Synapse forward pass about 10 %
    faster on 2 cores (docs/benchmarks.md). Trimming the top of the heap is off too: the end of
    each backward pass frees over a gigabyte at once, and giving it back only faults it in again
    in the next step (up to 0.6 GB of faults per training step with a 1 GB trim threshold). The
    process keeps its peak; it reaches it every step anyway. Process-wide, hence opt-in; returns
    whether applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1: never trim
    except (OSError, AttributeError):
        return False
    return bool(ok)

