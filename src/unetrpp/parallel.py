"""Worker pools that die with their parent.

A ``ProcessPoolExecutor`` worker whose parent is killed (``kill -9``, the OOM killer) waits on its
task queue forever. Every pool of the package is made here: on Linux each worker asks the kernel
to send it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and checks once that the
parent is still the one that started it (the parent may have died before the request).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request: nobody will collect our results
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of ``workers`` processes that end when this process ends, however it ends."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))
