"""Training checkpoints: one file, plain data only, written atomically, read without pickled code.

In memory a checkpoint is a :class:`Checkpoint` (the network, its weights, the plans, the labels
and, for training checkpoints, a :class:`TrainingState`). On disk it is a ``torch.save`` of its
payload (:meth:`Checkpoint.to_payload`), a flat dict of tensors, numbers, strings, lists and
dicts, read back with ``torch.load(weights_only=True)``: no class is constructed and no code
runs::

    format, version                 "unetrpp-checkpoint", 1
    model_config                    the network (UNETRPPConfig fields; img_size is the patch size)
    state_dict, state_dict_sha256   the weights and their digest
    plans, labels, channel_names, file_ending
    train_config, epoch, iteration, epoch_loss, ema, best_ema, history, elapsed
    optimizer, scaler, rng, weight_grad_choices      checkpoint_latest.pt only: what --resume needs
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .io.atomic import atomic_path

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


@dataclass
class TrainingState:
    """Where a training run stands: what ``--resume`` continues from and what ``show-model`` reports.

    ``optimizer``, ``scaler``, ``rng`` and ``weight_grad_choices`` are held by resumable checkpoints
    (``checkpoint_latest.pt``) only; ``checkpoint_best.pt`` and ``checkpoint_final.pt`` leave them out.
    """

    train_config: dict | None = None  # TrainConfig.to_json() (None: not recorded, as None below)
    epoch: int | None = None  # epochs done (with ``iteration`` > 0: the epoch under way)
    iteration: int = 0  # > 0: saved inside epoch ``epoch`` after this many iterations
    epoch_loss: float = 0.0  # the loss summed over those iterations
    ema: float | None = None  # EMA of the pseudo-Dice (None: no epoch scored yet)
    best_ema: float | None = None
    history: list[dict] | None = None  # one row per epoch (progress.csv)
    elapsed: float | None = None  # seconds of training, earlier runs included
    optimizer: dict | None = None
    scaler: dict | None = None  # {} when no gradient scaler runs
    rng: dict | None = None  # {"torch": ByteTensor, "cuda": [ByteTensor, ...]}
    #: the 3x3x3 convolution's weight-gradient method per shape (``kernels.WEIGHT_GRAD_CHOICES``)
    weight_grad_choices: dict[tuple[int, ...], str] = field(default_factory=dict)

    @property
    def resumable(self) -> bool:
        return self.optimizer is not None and self.rng is not None


_MAX_COUNT = 1 << 53  # epochs, iterations, tensor sizes: beyond this a number is not one the trainer wrote
#: payload keys of the training state, as the trainer has always written them
_TRAINING_KEYS = ("train_config", "epoch", "iteration", "epoch_loss", "ema", "best_ema", "history", "elapsed")
_RESUME_KEYS = ("optimizer", "scaler", "rng")
#: what ``--resume`` needs of a checkpoint, in the order a refusal names them
RESUME_NEEDS = ("train_config", "optimizer", "rng", "epoch", "ema", "best_ema", "history", "elapsed")


@dataclass
class Checkpoint:
    """A network, its weights, the plans and labels it was trained with and, if trained here, the run's state."""

    network: dict  # UNETRPPConfig fields (payload: model_config); img_size is the patch size
    state_dict: dict[str, torch.Tensor]
    plans: dict  # the plans as trained (Plans.to_dict()); its patch and network follow ``network``
    labels: dict[str, int] | None = None
    channel_names: list[str] | None = None
    file_ending: str | None = None
    training: TrainingState | None = None
    source: str = field(default="checkpoint", compare=False, repr=False)  # the file, for messages

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.network["img_size"])

    def resume_lacks(self) -> list[str]:
        """What ``--resume`` needs that this checkpoint lacks (:data:`RESUME_NEEDS`; empty: it can resume)."""
        t = self.training
        if t is None:
            return list(RESUME_NEEDS)
        return [k for k in RESUME_NEEDS if k not in ("ema", "best_ema") and getattr(t, k) is None]

    def read_plans(self):
        """The plans as a validated :class:`~unetrpp.data.plans.Plans`."""
        from .data.plans import Plans

        return Plans.coerce(self.plans, f"{self.source}: plans")

    # ------------------------------------------------------------------ payload
    def to_payload(self) -> dict:
        """The dict ``torch.save`` writes (module docstring); the plans' patch and network are the network's."""
        plans = dict(self.plans)
        if plans and "img_size" in self.network:
            plans.update(patch_size=list(self.patch_size), network=self.network)
        payload: dict = {"format": FORMAT, "version": VERSION, "model_config": self.network, "plans": plans}
        for key in ("labels", "channel_names", "file_ending"):
            if getattr(self, key) is not None:
                payload[key] = getattr(self, key)
        payload["state_dict"] = self.state_dict
        payload["state_dict_sha256"] = tensors_digest(self.state_dict)
        t = self.training
        if t is not None:
            payload.update({k: getattr(t, k) for k in _TRAINING_KEYS
                            if getattr(t, k) is not None or k in ("ema", "best_ema")})
            if t.resumable:
                payload.update({k: getattr(t, k) if getattr(t, k) is not None else {} for k in _RESUME_KEYS})
                payload["weight_grad_choices"] = [[list(k), v] for k, v in t.weight_grad_choices.items()]
        return payload

    @classmethod
    def from_payload(cls, payload: dict, source: str = "checkpoint") -> Checkpoint:
        """Validate a payload (as :func:`load_checkpoint` reads it) and build; any problem is a one-line
        error naming ``source``. Payloads written by every earlier unetrpp load."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise UserError(f"{source}: not a unetrpp checkpoint (official .model files: `unetrpp convert-weights`)")
        missing = [k for k in REQUIRED if k not in payload]
        if missing:
            raise UserError(f"{source}: checkpoint lacks {', '.join(missing)}")
        version = payload["version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise UserError(f"{source}: checkpoint version must be an integer, got {version!r}")
        if version > VERSION:
            raise UserError(f"{source}: checkpoint format {version} is newer than this unetrpp ({VERSION})")
        for key, kind in (("model_config", dict), ("plans", dict), ("state_dict", dict)):
            if not isinstance(payload[key], kind):
                raise UserError(f"{source}: checkpoint {key} must be a {kind.__name__}, got "
                                 f"{type(payload[key]).__name__}")
        if not all(isinstance(k, str) for k in payload["model_config"]):
            raise UserError(f"{source}: checkpoint model_config keys must be names")
        state = payload["state_dict"]
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise UserError(f"{source}: checkpoint state_dict must map names to tensors ({bad[0]!r} does not)")
        labels = payload.get("labels")
        if labels is not None and not (isinstance(labels, dict) and all(
                isinstance(k, str) and _count(v) for k, v in labels.items())):
            raise UserError(f"{source}: checkpoint labels must map names to integers >= 0, got {type(labels).__name__}")
        channels = payload.get("channel_names")
        if channels is not None and not (isinstance(channels, list) and all(isinstance(c, str) for c in channels)):
            raise UserError(f"{source}: checkpoint channel_names must be a list of names")
        ending = payload.get("file_ending")
        if ending is not None and not isinstance(ending, str):
            raise UserError(f"{source}: checkpoint file_ending must be a string, got {type(ending).__name__}")
        digest = payload.get("state_dict_sha256")
        if digest is not None and digest != tensors_digest(state):
            raise UserError(f"{source}: the weights do not match their checksum (the file was damaged or edited)")
        return cls(payload["model_config"], state, payload["plans"], labels, channels, ending,
                   _training_state(payload, source), source=source)

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read a checkpoint file; any problem is a one-line error naming it."""
        return cls.from_payload(_read(Path(path), map_location), str(path))

    def save(self, path: str | os.PathLike) -> Path:
        return save_checkpoint(self, path)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_COUNT


def _history(v) -> bool:
    """Rows of numbers per epoch, as the trainer writes them (NaN where an epoch had nothing to score)."""
    return isinstance(v, list) and all(
        isinstance(row, dict) and all(
            isinstance(k, str) and (_count(abs(x)) if isinstance(x, int) and not isinstance(x, bool)
                                    else isinstance(x, float) and not math.isinf(x))
            for k, x in row.items()) and all(_count(row.get(k, 0)) for k in ("epoch", "iterations")) for row in v)


def _rng_state(v) -> bool:
    def byte_state(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1

    return isinstance(v, dict) and byte_state(v.get("torch")) and isinstance(v.get("cuda", []), list) and all(
        byte_state(t) for t in v.get("cuda", []))


def _choice(c) -> bool:
    """``[(B, C_in, C_out, Z, Y, X), method]`` as ``kernels.WEIGHT_GRAD_CHOICES`` keys them."""
    return (isinstance(c, list) and len(c) == 2 and isinstance(c[0], list) and len(c[0]) == 6
            and all(_count(n) for n in c[0]) and c[1] in ("slabs", "onednn"))


def _training_state(payload: dict, source: str) -> TrainingState | None:
    """The training state of a payload (None: it holds none); wrong types are refused in one line."""
    if not any(k in payload for k in (*_TRAINING_KEYS, *_RESUME_KEYS)):
        return None

    def bad(key: str, what: str):
        return UserError(f"{source}: checkpoint {key} must be {what}, got {payload[key]!r:.80}")

    t = TrainingState()
    for key, ok, what in (
            ("train_config", lambda v: isinstance(v, dict), "a dict"),
            ("epoch", _count, "an integer >= 0"),
            ("iteration", _count, "an integer >= 0"),
            ("epoch_loss", _number, "a number"),
            ("ema", lambda v: v is None or _number(v), "a number or None"),
            ("best_ema", lambda v: v is None or _number(v), "a number or None"),
            ("history", _history, "rows of numbers (epoch and iterations counts)"),
            ("elapsed", _number, "a number"),
            ("optimizer", lambda v: isinstance(v, dict), "a dict"),
            ("scaler", lambda v: isinstance(v, dict), "a dict"),
            ("rng", _rng_state, "a dict of torch and cuda RNG states (byte tensors)")):
        if key in payload:
            if not ok(payload[key]):
                raise bad(key, what)
            setattr(t, key, payload[key])
    choices = payload.get("weight_grad_choices", [])
    if not (isinstance(choices, list) and all(_choice(c) for c in choices)):
        raise bad("weight_grad_choices", "[shape, 'slabs' | 'onednn'] pairs")
    t.weight_grad_choices = {tuple(shape): how for shape, how in choices}
    return t


def _read(path: Path, map_location) -> dict:
    """``torch.load(weights_only=True)`` of a checkpoint file, its failures told in one line."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give the checkpoint file (e.g. checkpoint_final.pt)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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


def save_checkpoint(checkpoint: Checkpoint | dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint (or a payload dict) to ``path`` atomically: an interrupted write leaves the old file.

    The weights' digest goes with them (``state_dict_sha256``), so damage on disk is found on load.
    """
    if isinstance(checkpoint, Checkpoint):
        payload = checkpoint.to_payload()
    else:
        payload = {"format": FORMAT, "version": VERSION, **checkpoint}
        if isinstance(payload.get("state_dict"), dict):
            payload["state_dict_sha256"] = tensors_digest(payload["state_dict"])
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The payload of a checkpoint file, validated as :meth:`Checkpoint.from_payload` does; any problem is a
    one-line ``ValueError`` (:meth:`Checkpoint.load` gives the typed form)."""
    payload = _read(Path(path), map_location)
    Checkpoint.from_payload(payload, str(path))
    return payload


def build_model(ckpt: Checkpoint | dict, source: str | None = None, allow_nonfinite: bool = False):
    """The network of a checkpoint (or of a payload's ``model_config`` and ``state_dict``), weights loaded, in
    eval mode; NaN/inf weights refused unless allowed."""

    from .network.registry import build_checked
    from .network.weights import load_state_dict_checked

    if isinstance(ckpt, Checkpoint):
        config, state, source = ckpt.network, ckpt.state_dict, source or ckpt.source
    else:
        config, state, source = ckpt["model_config"], ckpt["state_dict"], source or "checkpoint"
    model = build_checked(config, source)
    if not allow_nonfinite:
        for key, t in state.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"{source}: weight {key!r} holds NaN/inf values; the model would predict nothing "
                                 "(a diverged run?)")
    load_state_dict_checked(model, state, source=source)
    return model.eval()
