"""What ``predict -m`` takes: a checkpoint, a run folder, several of them (an ensemble), or a model package.

A **model package** (``unetrpp export-model``, ``unetrpp import-official``) is a zip file or a
folder holding ``model.json`` and one safetensors file per member network; no pickle anywhere::

    model.json          {"format": "unetrpp-model", "version": 1, "labels": {...},
                         "channel_names": [...], "members": [{"name", "weights", "weights_sha256",
                         "model_config", "plans", "training"}, ...], "postprocessing": {...} | null,
                         "evaluation": {...} | null, "created": ..., "unetrpp_version": ...}
    fold0.safetensors   the first member's weights
    ...

Every member is a network with the plans it was trained with (target spacing, normalisation,
patch); members of one model share labels and channels, and their softmax outputs are averaged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..data.plans import Plans
from ..errors import UserError

FORMAT = "unetrpp-model"
VERSION = 1
MANIFEST = "model.json"
POSTPROCESSING = "postprocessing.json"
_MEMBER_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}\.safetensors$")
#: the most a package's model.json may hold (a hostile manifest is refused before it is parsed)
MAX_MANIFEST_BYTES = 64 << 20
#: the most networks one model may hold (nnU-Net ensembles hold 5 folds, or 10 with two configurations)
MAX_MEMBERS = 32


@dataclass
class Member:
    """One network of a model, with the plans it was trained with."""

    network: torch.nn.Module
    plans: Plans
    name: str
    source: str
    training: dict = field(default_factory=dict)  # how it was trained (recipe, epochs, time, validation)


@dataclass
class Model:
    """One or more member networks that predict together, and what to do with their labels."""

    members: list[Member]
    labels: dict[str, int]
    channel_names: list[str]
    source: str
    postprocessing: dict | None = None
    evaluation: dict | None = None  # cross-validation summary (find-best), when known

    @property
    def num_channels(self) -> int:
        return int(self.members[0].network.config.in_channels)

    @property
    def num_classes(self) -> int:
        return int(self.members[0].network.config.out_channels)


# ---------------------------------------------------------------------- reading
def training_summary(ckpt: Checkpoint) -> dict:
    """What a checkpoint says of its training, in plain JSON (for show-model and packages)."""
    out: dict = {}
    t = ckpt.training
    if t is None:
        return out
    if t.train_config is not None:
        out["train_config"] = {k: v for k, v in t.train_config.items()
                               if isinstance(v, (str, int, float, bool, list, type(None)))}
    if t.history:
        out["epochs"] = len(t.history)
        out["iterations"] = int(sum(int(h.get("iterations", 0) or 0) for h in t.history))
        last = t.history[-1]
        out["last_epoch"] = {k: v for k, v in last.items() if isinstance(v, (int, float, str)) and k != "epoch"}
    for key in ("elapsed", "best_ema"):
        if getattr(t, key) is not None:
            out[key] = float(getattr(t, key))
    return out


def _from_checkpoint(path: Path) -> tuple[Member, dict, list[str]]:
    from ..checkpoint import Checkpoint, build_model

    ckpt = Checkpoint.load(path)
    network = build_model(ckpt)
    plans = ckpt.read_plans()
    labels = ckpt.labels or plans.labels
    channels = ckpt.channel_names or plans.channel_names
    return Member(network, plans, path.stem, str(path), training_summary(ckpt)), dict(labels), list(channels)


def run_checkpoint(run: Path) -> Path:
    """The checkpoint a run folder predicts with: ``checkpoint_final.pt``."""
    ckpt = run / "checkpoint_final.pt"
    if not ckpt.is_file():
        partial = run / "checkpoint_latest.pt"
        hint = (f" (only {partial.name}: the run has not finished; `unetrpp train ... --resume`)"
                if partial.exists() else "")
        raise FileNotFoundError(f"{run}: no checkpoint_final.pt in this run folder{hint}")
    return ckpt


def _read_limited(zf: zipfile.ZipFile, name: str, limit: int, source: str) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise UserError(f"{source}: the package lacks {name}") from None
    if info.file_size > limit:
        raise UserError(f"{source}: {name} claims {info.file_size} bytes, more than the {limit} allowed")
    from ..checkpoint import inflates

    if inflates(info):
        raise UserError(f"{source}: {name} expands from {info.compress_size} to {info.file_size} bytes "
                         "(a zip bomb?); refused")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{source}: {name} unpacks to more than its declared size")
    return data


def read_package(path: str | os.PathLike) -> Model:
    """A model package (zip or folder); any problem is a one-line ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    from ..checkpoint import build_model, tensors_digest
    from ..runtime import available_memory

    path = Path(path)
    source = str(path)
    zf = None
    try:
        if path.is_dir():
            def read(name: str, limit: int) -> bytes:
                f = path / name
                if not f.is_file():
                    raise UserError(f"{source}: the package lacks {name}")
                if f.is_symlink() and path.resolve() not in f.resolve().parents:
                    raise UserError(f"{f}: a link out of the package; refused")
                if f.stat().st_size > limit:
                    raise UserError(f"{f}: {f.stat().st_size} bytes, more than the {limit} allowed")
                return f.read_bytes()
        else:
            try:
                zf = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise UserError(f"{source}: not a model package (neither a zip file nor a folder with "
                                 f"{MANIFEST})") from None

            def read(name: str, limit: int) -> bytes:
                return _read_limited(zf, name, limit, source)

        try:
            manifest = json.loads(read(MANIFEST, MAX_MANIFEST_BYTES))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
            raise UserError(f"{source}: {MANIFEST} is not valid JSON ({str(e).splitlines()[0][:160]})") from None
        except RecursionError:
            raise UserError(f"{source}: {MANIFEST} nested too deeply to read") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{source}: {MANIFEST} is not a unetrpp model manifest")
        version = manifest.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UserError(f"{source}: model version must be a positive integer, got {version!r}")
        if version > VERSION:
            raise UserError(f"{source}: model format {version} is newer than this unetrpp ({VERSION})")
        labels = _labels(manifest.get("labels"), source)
        channels = manifest.get("channel_names")
        if not (isinstance(channels, list) and channels and all(isinstance(c, str) for c in channels)):
            raise UserError(f"{source}: channel_names must be a non-empty list of names")
        entries = manifest.get("members")
        if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
            raise UserError(f"{source}: members must be a non-empty list")
        if len(entries) > MAX_MEMBERS:
            raise UserError(f"{source}: {len(entries)} member networks, more than the {MAX_MEMBERS} allowed")
        budget = available_memory() or (1 << 62)
        members = []
        for i, entry in enumerate(entries):
            where = f"{source}: member {i}"
            weights = entry.get("weights")
            if not (isinstance(weights, str) and _MEMBER_FILE.match(weights)):
                raise UserError(f"{where}: weights must name a .safetensors file inside the package, got {weights!r}")
            for key in ("model_config", "plans"):
                if not isinstance(entry.get(key), dict):
                    raise UserError(f"{where}: {key} must be an object")
            # the weights the config implies, known before a byte of them is read or a tensor made
            expected = expected_state(entry["model_config"], where)
            size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values())
            if size > budget:
                raise UserError(f"{where}: its network needs {size / 1e9:.1f} GB, more than the "
                                 f"{budget / 1e9:.1f} GB of memory left")
            try:
                state = load_bytes(read(weights, size + (1 << 20)))  # the data, and a header of its names
            except SafetensorError as e:
                raise UserError(f"{where}: {weights} is not a readable safetensors file ({e})") from None
            for key, t in state.items():
                want = expected.get(key)
                if want is not None and (tuple(t.shape) != want[0] or t.dtype.is_floating_point !=
                                         want[1].is_floating_point or t.dtype == torch.bool):
                    raise UserError(f"{where}: {weights}: {key!r} is {t.dtype} {tuple(t.shape)}, the network "
                                     f"takes {want[1]} {want[0]}")
            digest = entry.get("weights_sha256")
            if digest is not None and digest != tensors_digest(state):
                raise UserError(f"{where}: {weights} does not match its checksum (damaged or edited)")
            member = Checkpoint(entry["model_config"], state, entry["plans"], source=where)
            network = build_model(member)
            plans = member.read_plans()
            name = entry.get("name") if isinstance(entry.get("name"), str) else f"member{i}"
            training = entry.get("training") if isinstance(entry.get("training"), dict) else {}
            members.append(Member(network, plans, name, f"{source}[{weights}]", training))
        post = manifest.get("postprocessing")
        if post is not None:
            from .postprocess import check_postprocessing

            check_postprocessing(post, f"{source}: postprocessing", labels)
        evaluation = manifest.get("evaluation")
        if evaluation is not None:
            from .postprocess import check_cross_validation

            check_cross_validation(evaluation, f"{source}: evaluation")
        model = Model(members, labels, list(channels), source, post, evaluation)
        model.manifest = manifest
        _check_members(model)
        return model
    except zipfile.BadZipFile as e:
        raise UserError(f"{source}: damaged zip file ({e})") from None
    finally:
        if zf is not None:
            zf.close()


def is_package(path: Path) -> bool:
    """A folder with ``model.json``, or a zip file holding one (a torch checkpoint is a zip file too)."""
    if path.suffix == ".zip" and path.is_file():
        return True  # read_package says what is wrong with it
    return _holds_manifest(path)


def _holds_manifest(path: Path) -> bool:
    if path.is_dir():
        return (path / MANIFEST).is_file()
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def expected_state(config: dict, source: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the weights of a network of ``config``, worked out on the meta device
    (no memory for the tensors); a bad config is a one-line ``ValueError``."""

    from ..network.registry import build_checked

    net = build_checked(config, source, meta=True)
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


def _labels(labels, source: str) -> dict[str, int]:
    if not (isinstance(labels, dict) and labels and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 32768
            for k, v in labels.items())):
        raise UserError(f"{source}: labels must map names to integers 0..32767")
    values = sorted(labels.values())
    if len(set(values)) != len(values) or values[0] != 0:
        raise UserError(f"{source}: labels must give each class one value, background 0, got {values}")
    return dict(labels)


def _check_members(model: Model) -> None:
    first = model.members[0]
    for m in model.members:
        cfg = m.network.config
        if int(cfg.in_channels) != len(model.channel_names):
            raise UserError(f"{m.source}: takes {cfg.in_channels} channel(s), the model names "
                             f"{len(model.channel_names)}")
        if int(cfg.out_channels) != int(first.network.config.out_channels):
            raise UserError(f"{m.source}: predicts {cfg.out_channels} classes, {first.source} predicts "
                             f"{first.network.config.out_channels}; an ensemble needs one label set")
        if m.plans.channel_names != first.plans.channel_names:
            raise UserError(f"{m.source}: channels {m.plans.channel_names} differ from {first.source}'s "
                             f"{first.plans.channel_names}")
        if list(m.plans.channel_names) != list(model.channel_names):
            raise UserError(f"{m.source}: its plans name the channels {m.plans.channel_names}, the model "
                             f"{model.channel_names}")
    if max(model.labels.values()) + 1 != model.num_classes:
        raise UserError(f"{model.source}: {model.num_classes} output classes but labels up to "
                         f"{max(model.labels.values())}")


def load_model(sources: str | os.PathLike | Sequence[str | os.PathLike],
               postprocessing: str | os.PathLike | None = None) -> Model:
    """A :class:`Model` from checkpoints, run folders and packages (several: their members together).

    ``postprocessing``: a ``postprocessing.json`` to apply, ``"none"`` for none; by default a
    package's own, or for run folders the one ``find-best`` wrote beside them for exactly these runs.
    """
    from .postprocess import check_postprocessing, read_postprocessing

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [Path(s) for s in sources]
    if not sources:
        raise UserError("no model given")
    seen: dict[Path, Path] = {}
    for s in sources:
        key = s.resolve()
        if key in seen:
            raise UserError(f"{s}: given twice (also as {seen[key]}); an ensemble takes each model once")
        seen[key] = s
    members: list[Member] = []
    labels = channels = None
    post = evaluation = None
    runs: list[Path] = []
    for s in sources:
        if not s.exists():
            raise FileNotFoundError(f"{s}: no such checkpoint, run folder or model package")
        if is_package(s):
            pkg = read_package(s)
            got, lab, ch = pkg.members, pkg.labels, pkg.channel_names
            if len(sources) == 1:
                post, evaluation = pkg.postprocessing, pkg.evaluation
        elif s.is_dir():
            member, lab, ch = _from_checkpoint(run_checkpoint(s))
            member.name = s.name
            got = [member]
            runs.append(s)
        else:
            member, lab, ch = _from_checkpoint(s)
            got = [member]
        if labels is None:
            labels, channels = lab, ch
        elif lab != labels:
            raise UserError(f"{s}: labels {lab} differ from {sources[0]}'s {labels}; an ensemble needs one label set")
        members += got
        if len(members) > MAX_MEMBERS:
            raise UserError(f"{s}: more than {MAX_MEMBERS} member networks in all")
    name = str(sources[0]) if len(sources) == 1 else f"{len(members)} members ({', '.join(map(str, sources))})"
    if runs and len(runs) == len(sources):
        post, evaluation = _postprocessing_beside(runs, labels)
    if postprocessing is not None:
        post = None if str(postprocessing) == "none" else read_postprocessing(postprocessing, labels)
    elif post is not None:
        check_postprocessing(post, f"{sources[0]}: postprocessing", labels)
    model = Model(members, labels, channels, name, post, evaluation)
    _check_members(model)
    return model


def _postprocessing_beside(runs: list[Path], labels: dict[str, int]) -> tuple[dict | None, dict | None]:
    """The ``postprocessing.json`` find-best wrote in the runs' common folder, if chosen for exactly these runs."""
    from .postprocess import read_postprocessing

    parent = Path(os.path.commonpath([r.resolve() for r in runs]))
    if len(runs) == 1:
        parent = parent.parent
    f = parent / POSTPROCESSING
    if not f.is_file():
        return None, None
    post = read_postprocessing(f, labels)
    chosen_for = sorted(post.get("runs") or [])
    if chosen_for != sorted(r.resolve().name for r in runs) and chosen_for != sorted(str(r.resolve()) for r in runs):
        return None, None
    return post, post.get("cross_validation")


# ---------------------------------------------------------------------- writing
def check_package_target(target: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool) -> Path:
    """Where a package may be written: not over an input, not over an existing file unless ``overwrite``,
    and never over something that is not a model package (one-line ``ValueError``)."""
    target = Path(target)
    for s in inputs:
        if s is not None and Path(s).exists() and Path(s).resolve() == target.resolve():
            raise UserError(f"{target}: the package to write is one of the inputs")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise UserError(f"{target}: exists; --overwrite to replace it")
        if not _holds_manifest(target) and not (target.is_dir() and not any(target.iterdir())):
            raise UserError(f"{target}: exists and is not a model package; give a new name")
    return target


def write_package(path: str | os.PathLike, members: Sequence[tuple[str, dict, dict, dict, dict]],
                  labels: dict[str, int], channel_names: Sequence[str], postprocessing: dict | None = None,
                  evaluation: dict | None = None, extra: dict | None = None) -> Path:
    """Write a model package: a zip file if ``path`` ends in ``.zip``, else a folder.

    ``members``: ``(name, model_config, plans_dict, state_dict, training)`` per network. The package
    is built beside ``path`` under a temporary name, read back and checked (every member's weights
    against their digest), then renamed into place: a failure leaves no package or the old one.
    """
    from safetensors.torch import save as save_bytes

    from .. import __version__
    from ..checkpoint import tensors_digest
    from ..io.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries, blobs = [], {}
    used: set[str] = set()
    for i, (name, config, plans, state, training) in enumerate(members):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:80] or f"member{i}"
        stem = stem.lstrip(".-_") or f"member{i}"
        if stem in used:
            stem = f"{stem}_{i}"
        used.add(stem)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        blobs[f"{stem}.safetensors"] = save_bytes(tensors, metadata={"format": "pt"})
        entries.append({"name": str(name), "weights": f"{stem}.safetensors", "weights_sha256": tensors_digest(tensors),
                        "model_config": config, "plans": plans, "training": training or {}})
    manifest = {"format": FORMAT, "version": VERSION, "unetrpp_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "labels": dict(labels),
                "channel_names": list(channel_names), "members": entries,
                "postprocessing": postprocessing, "evaluation": evaluation, **(extra or {})}
    from ..io.jsonio import _default, finite

    text = (json.dumps(finite(manifest), indent=2, allow_nan=False, default=_default) + "\n").encode()
    if path.suffix == ".zip":
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(MANIFEST, text)
                for name, blob in blobs.items():
                    zf.writestr(name, blob)
            read_package(tmp)  # verified before it takes the final name
        return path
    with atomic_path(path, directory=True) as tmpdir:
        for name, blob in {MANIFEST: text, **blobs}.items():
            (tmpdir / name).write_bytes(blob)
        read_package(tmpdir)  # verified before it takes the final name
        if path.exists() and not (path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))):
            raise UserError(f"{path}: exists and is not a model package; give a new name")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (to record where imported weights came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
