"""Where and how the network runs: device, mixed precision and autocast resolved in one place, and
process-level settings for CPU speed (opt-in; the CLI and benchmarks call them).

Cheap to import: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

#: Mixed-precision modes: none, bfloat16 autocast, float16 autocast (CUDA only, with a grad scaler).
AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(spec: str | torch.device | None = "auto", kinds: Sequence[str] = ("cpu", "cuda")) -> torch.device:
    """The device ``spec`` names; ``auto`` (or None) is CUDA where available, else the CPU.

    A name torch does not know, a device type outside ``kinds`` (the package runs on the CPU and on
    CUDA), CUDA on a machine without it, or a GPU number the machine lacks is a :class:`UserError`.
    """
    import torch

    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in kinds:
        allowed = ", ".join(kinds) + (", cuda:N" if "cuda" in kinds else "")
        raise UserError(f"device must be {allowed} or auto, got {str(spec)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: no CUDA device is available (this torch build or machine has none)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_amp(amp: str | None, device: str | torch.device) -> str:
    """The mixed-precision mode to use on ``device``: ``auto`` (or None) is bf16 on CUDA where supported,
    else fp16 there, and off elsewhere; ``off``, ``bf16`` and ``fp16`` are checked (fp16 needs CUDA)."""
    import torch

    device = torch.device(device)
    if amp in (None, "auto"):
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in AMP_MODES:
        raise UserError(f"amp must be one of {', '.join(AMP_MODES)} or auto, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use bf16 or off on CPU")
    return amp


def autocast(device: str | torch.device, amp: str) -> contextlib.AbstractContextManager:
    """An autocast context for ``amp`` in ``off | bf16 | fp16`` on ``device``; a null context when off."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise UserError(f"amp must be off, bf16 or fp16, got {amp!r}")
    import torch

    device = torch.device(device)
    if amp == "fp16" and device.type != "cuda":
        raise UserError("fp16 autocast needs a CUDA device; use --amp bf16 or off on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def synchronizer(device: str | torch.device) -> Callable[[], None] | None:
    """A function that waits for ``device``'s queued work (CUDA); None where work is synchronous."""
    import torch

    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak memory in MiB: CUDA's allocated peak on a CUDA device, else this process's peak resident set."""
    import resource

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def available_memory() -> int | None:
    """Bytes of memory this process can still take: Linux ``MemAvailable``, capped by the cgroup's
    limit (a container's ``memory.max``) when one is set; None where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    # a container's limit; its usage counts page cache, of which the inactive part can be reclaimed
    for folder, limit_name, usage_name, cache_name in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        try:
            limit = (Path(folder) / limit_name).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                break
            used = int((Path(folder) / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            for line in (Path(folder) / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_name:
                    used -= int(value)
        except (OSError, ValueError):
            pass
        left = max(0, int(limit) - max(used, 0))
        avail = left if avail is None else min(avail, left)
        break
    return avail


def idle_cores(sample_s: float = 0.5) -> float | None:
    """Cores left idle by every other process over ``sample_s`` seconds (Linux ``/proc/stat``; None elsewhere)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields[:8])

    try:
        i0, t0 = read()
        time.sleep(sample_s)
        i1, t1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores * (i1 - i0) / (t1 - t0)


def fit_cpu_threads() -> tuple[int, str]:
    """Use only the cores other processes leave free: on a busy machine a thread waiting for a core
    holds every parallel op back to its pace. Returns the thread count and why."""
    import torch

    have = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return have, f"{have} thread(s) (OMP_NUM_THREADS)"
    idle = idle_cores()
    if idle is None:
        return have, f"{have} thread(s)"
    use = max(1, min(have, int(idle + 0.35)))
    if use < have:
        torch.set_num_threads(use)
        return use, f"{use} thread(s): {have - use} of {have} core(s) are busy with other work"
    return have, f"{have} thread(s)"
