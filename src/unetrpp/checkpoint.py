"""Training checkpoints: one file, plain data only, written atomically, read without pickled code.

A checkpoint is a ``torch.save`` of a dict of tensors, numbers, strings, lists and dicts, read
back with ``torch.load(weights_only=True)``: no class is constructed and no code runs. It holds
everything prediction needs (``model_config``, ``plans``, ``labels``, ``state_dict``) and, for
training checkpoints, everything ``--resume`` needs (optimizer, scaler, epoch, RNG states,
history).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from .io.jsonio import atomic_write

FORMAT = "unetrpp-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model_config", "plans", "state_dict")


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` via a temporary file and a rename: an interrupted write leaves the old file."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; any problem is a one-line ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give the checkpoint file (e.g. checkpoint_final.pt)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable unetrpp checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a unetrpp checkpoint (official .model files: `unetrpp convert_weights`)")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if ckpt["version"] > VERSION:
        raise ValueError(f"{path}: checkpoint format {ckpt['version']} is newer than this unetrpp ({VERSION})")
    return ckpt


def build_model(ckpt: dict, source: str = "checkpoint"):
    """The network of a checkpoint, weights loaded, in eval mode."""
    from .network.unetrpp import UNETRPP, load_state_dict_checked

    model = UNETRPP(**ckpt["model_config"])
    load_state_dict_checked(model, ckpt["state_dict"], source=source)
    return model.eval()
