"""Worker pools that die with their parent, and :func:`parallel_map`, the package's one pool-or-loop.

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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")

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


def _call(fn, job: tuple):
    return fn(*job)


def parallel_map(fn: Callable[..., T], jobs: Sequence[tuple], workers: int = 1, progress: bool = False,
                 desc: str = "", done: int = 0, chunksize: int = 1) -> list[T]:
    """``[fn(*job) for job in jobs]``, in a :func:`worker_pool` of ``workers`` processes when more than one
    (and more than one job), else in this process.

    Results keep the order of ``jobs``; the first job (in that order) that raises ends the call with its
    error. ``progress`` shows a tqdm bar of cases over ``done`` already finished plus ``jobs``.
    ``fn`` must be picklable (a module-level function) when ``workers > 1``.
    """
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=done + len(jobs), initial=done, desc=desc, unit="case")
    results: list[T] = []
    try:
        if workers > 1 and len(jobs) > 1:
            with worker_pool(workers) as pool:
                for r in pool.map(_call, [fn] * len(jobs), jobs, chunksize=chunksize):
                    results.append(r)
                    if bar is not None:
                        bar.update()
        else:
            for job in jobs:
                results.append(fn(*job))
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results
