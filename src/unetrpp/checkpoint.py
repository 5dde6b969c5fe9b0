"""Training checkpoints: one file, plain data only, written atomically, read without pickled code.

A checkpoint is a ``torch.save`` of a dict of tensors, numbers, strings, lists and dicts, read
back with ``torch.load(weights_only=True)``: no class is constructed and no code runs. It holds
everything prediction needs (``model_config``, ``plans``, ``labels``, ``state_dict``) and, for
training checkpoints, everything ``--resume`` needs (optimizer, scaler, epoch, RNG states,
history).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import UserError
from .io.jsonio import atomic_write

FORMAT = "unetrpp-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model_config", "plans", "state_dict")


def tensors_digest(state: dict) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (a flipped bit changes it)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def inflates(info: zipfile.ZipInfo) -> bool:
    """A compressed zip member that expands suspiciously (more than 50x and past 1 MiB): a zip bomb."""
    return info.compress_type != zipfile.ZIP_STORED and info.file_size > 50 * info.compress_size + (1 << 20)


def check_archive(path: Path) -> None:
    """Refuse, before reading, a zip file (torch checkpoints are zips) that would unpack to more than
    the memory left or whose compressed members expand suspiciously (torch stores members
    uncompressed; a few kilobytes growing to gigabytes is a zip bomb)."""
    from .runtime import available_memory

    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip file (legacy torch format, or damaged): the reader says what it is
    total = sum(i.file_size for i in infos)
    left = available_memory()
    if left and total > left:
        raise UserError(f"{path}: unpacks to {total / 1e9:.1f} GB, more than the {left / 1e9:.1f} GB of memory left")
    for i in infos:
        if inflates(i):
            raise UserError(f"{path}: member {i.filename!r} expands from {i.compress_size} to {i.file_size} bytes "
                             "(a zip bomb?); refused")


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` via a temporary file and a rename: an interrupted write leaves the old file.

    The weights' digest goes with them (``state_dict_sha256``), so damage on disk is found on load.
    """
    payload = {"format": FORMAT, "version": VERSION, **payload}
    if isinstance(payload.get("state_dict"), dict):
        payload["state_dict_sha256"] = tensors_digest(payload["state_dict"])
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; any problem is a one-line ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give the checkpoint file (e.g. checkpoint_final.pt)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    check_archive(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # torch's message suggests weights_only=False, which would run whatever code the file holds: not that
        kind = "refused: it holds objects other than plain data" if "Unsupported global" in str(e) else \
            "damaged or another kind of file"
        raise UserError(f"{path}: not a loadable unetrpp checkpoint ({kind})") from None
    except OSError:
        raise
    except Exception as e:  # whatever torch's reader raises on arbitrary bytes
        raise UserError(f"{path}: not a loadable unetrpp checkpoint (damaged or another kind of file: "
                         f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a unetrpp checkpoint (official .model files: `unetrpp convert-weights`)")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
    version = ckpt["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path}: checkpoint version must be an integer, got {version!r}")
    if version > VERSION:
        raise UserError(f"{path}: checkpoint format {version} is newer than this unetrpp ({VERSION})")
    for key, kind in (("model_config", dict), ("plans", dict), ("state_dict", dict)):
        if not isinstance(ckpt[key], kind):
            raise UserError(f"{path}: checkpoint {key} must be a {kind.__name__}, got {type(ckpt[key]).__name__}")
    if not all(isinstance(k, str) for k in ckpt["model_config"]):
        raise UserError(f"{path}: checkpoint model_config keys must be names")
    bad = [k for k, v in ckpt["state_dict"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: checkpoint state_dict must map names to tensors ({bad[0]!r} does not)")
    labels = ckpt.get("labels")
    if labels is not None and not (isinstance(labels, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in labels.items())):
        raise UserError(f"{path}: checkpoint labels must map names to integers, got {type(labels).__name__}")
    digest = ckpt.get("state_dict_sha256")
    if digest is not None and digest != tensors_digest(ckpt["state_dict"]):
        raise UserError(f"{path}: the weights do not match their checksum (the file was damaged or edited)")
    return ckpt


def build_model(ckpt: dict, source: str = "checkpoint", allow_nonfinite: bool = False):
    """The network of a checkpoint, weights loaded, in eval mode; NaN/inf weights refused unless allowed."""
    import dataclasses

    from .network.unetrpp import UNETRPP, UNETRPPConfig, load_state_dict_checked

    config = ckpt["model_config"]
    if not isinstance(config, dict):
        raise UserError(f"{source}: model_config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(UNETRPPConfig)})
    if unknown:
        raise UserError(f"{source}: model_config has unknown keys {', '.join(map(str, unknown))} "
                         "(written by a newer unetrpp, or edited?)")
    try:
        model = UNETRPP(**config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: model_config: {str(e).splitlines()[0]}") from None
    if not allow_nonfinite:
        for key, t in ckpt["state_dict"].items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"{source}: weight {key!r} holds NaN/inf values; the model would predict nothing "
                                 "(a diverged run?)")
    load_state_dict_checked(model, ckpt["state_dict"], source=source)
    return model.eval()
