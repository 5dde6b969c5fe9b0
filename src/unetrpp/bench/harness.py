"""Timing, the machine a figure was measured on, and measurements in processes of their own.

A child process reports its result as one line ``RESULT {json}`` on stdout (:func:`emit_result`);
the parent runs it and reads that line back (:func:`run_child`). A child that fails (non-zero exit
or no result line) becomes one :class:`ChildError` line naming it and its error, whatever it printed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

RESULT_PREFIX = "RESULT "


class ChildError(RuntimeError):
    """A measurement process failed; the message is one line, ``stderr`` holds all it wrote there."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def emit_result(result: Mapping) -> None:
    """In a child process: print ``result`` as the ``RESULT {json}`` line the parent reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(cmd: Sequence[str], name: str, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> dict:
    """Run ``cmd`` to the end and return the result its last ``RESULT`` line holds.

    A non-zero exit or a missing result line raises :class:`ChildError` ``"NAME failed: LINE"``, where
    LINE is the last line of its stderr that names an error (else its last line): the error, not a
    hint printed after it.
    """
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=None if env is None else dict(env), cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        err_lines = proc.stderr.strip().splitlines() or [
            f"exit status {proc.returncode}" if proc.returncode else "(no output)"]
        err = next((ln for ln in reversed(err_lines) if "Error" in ln), err_lines[-1]).strip()
        raise ChildError(f"{name} failed: {err}", proc.stderr)
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_worker(spec: dict) -> dict:
    """Run one measurement (:func:`unetrpp.bench.measure.run_measurement`) in a fresh process; returns
    its result dict (raises :class:`ChildError` with its error line)."""
    return run_child([sys.executable, "-m", "unetrpp.bench", "--worker", json.dumps(spec)],
                     f"benchmark {spec['kind']}")


def machine_info(device: str = "cpu") -> dict:
    """What a figure was measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
                ) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times
