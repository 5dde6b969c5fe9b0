"""Atomic JSON files and atomic numpy arrays."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from .atomic import atomic_path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a temporary file (binary) beside ``path``; :func:`atomic_path` syncs it and
    renames it into place. A short write raises before the rename, naming ``path``: the final name keeps
    its previous content, and no temporary file is left."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def check_writable(folder: str | os.PathLike, what: str = "outputs") -> None:
    """Create ``folder`` and write, sync and remove a 64 KiB probe in it, so a read-only, missing or
    full location fails before any work is done (one line naming it)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".unetrpp-probe-") as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{folder}: cannot write {what} there ({e.strerror or e})") from None


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` via a temporary file and a rename (NaN and inf become null)."""
    text = json.dumps(finite(obj), indent=2, default=_default, allow_nan=False) + "\n"
    return atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_npy(array: np.ndarray, path: str | os.PathLike) -> Path:
    """``np.save`` to ``path`` atomically (the file can later be memory-mapped)."""
    return atomic_write(Path(path), lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file; a missing or malformed file is a one-line ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0][:160]})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read") from None


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (standard JSON has neither)."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
