"""``Plans``: the typed contract between ``plan``, ``preprocess``, ``train`` and ``predict``.

``unetrpp plan`` writes one ``plans.json``; every later stage reads it through :class:`Plans`,
never as a loose dict. The plans fix how cases are preprocessed (target spacing, normalisation,
resampling) and which network trains on them (``network``: every :class:`UNETRPPConfig` field,
the patch size included, or a baseline's fields with its ``arch``: ``network.registry``), so
``train`` builds exactly that network unless told otherwise.

All shapes, spacings and patch sizes are in array order ``(z, y, x)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..io import read_json, write_json

PLANS_VERSION = 2
#: What changes the preprocessed arrays: a cache made with other values of these is stale.
_PREPROCESSING_KEYS = ("target_spacing", "normalization", "resampling", "channel_names", "labels")


def _numbers(v) -> bool:
    """A list of JSON numbers (not booleans or strings)."""
    return isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _floats(v, name: str, path: str, n: int = 3) -> list[float]:
    try:
        if not _numbers(v):
            raise TypeError
        out = [float(x) for x in v]
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: {name} must be {n} numbers, got {v!r}") from None
    if len(out) != n or not all(math.isfinite(x) and x > 0 for x in out):
        raise UserError(f"{path}: {name} must be {n} positive finite numbers, got {v!r}")
    return out


def _ints(v, name: str, path: str, n: int = 3) -> list[int]:
    try:
        if not _numbers(v):
            raise TypeError
        out = [int(x) for x in v]
        whole = all(float(a) == b for a, b in zip(v, out, strict=False))  # 2.5 is not an integer
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: {name} must be {n} integers, got {v!r}") from None
    if len(out) != n or any(x < 1 for x in out) or not whole:
        raise UserError(f"{path}: {name} must be {n} positive integers, got {v!r}")
    return out


@dataclass
class Plans:
    """Everything ``plan`` decided for a dataset (see ``docs`` in :mod:`unetrpp.data.plan`)."""

    dataset: str
    channel_names: list[str]
    labels: dict[str, int]
    target_spacing: list[float]
    normalization: list[dict]
    patch_size: list[int]
    network: dict  # UNETRPPConfig fields (or a baseline's, with "arch"); network["img_size"] == patch_size
    batch_size: int = 2
    batch_dice: bool = False
    preset: str | None = None  # the preset whose blocks the network uses, if one was asked for
    median_spacing: list[float] = field(default_factory=list)
    median_shape_after_resampling: list[float] = field(default_factory=list)
    resampling: dict = field(default_factory=lambda: {"image_order": 3, "label_order": 1,
                                                      "anisotropy_threshold": 3.0, "low_resolution_axis_order": 0})
    eval_classes: list[int] | None = None  # the labels the online pseudo-Dice averages (None: all foreground)
    decisions: list[str] = field(default_factory=list)  # why: one line per planning decision
    # nnU-Net v1 plans (import-official): the network sees the arrays' axes in this order; target_spacing and
    # patch_size are then in that order too. None: as stored (z, y, x).
    transpose_forward: list[int] | None = None
    version: int = PLANS_VERSION
    axes: str = "zyx"

    # ------------------------------------------------------------------ derived
    @property
    def num_classes(self) -> int:
        return max(int(v) for v in self.labels.values()) + 1

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def arch(self) -> str:
        """The architecture of the planned network (``unetrpp``, or a baseline of ``network.registry``)."""
        from ..network.registry import arch_of

        return arch_of(self.network)

    @property
    def patch_divisor(self) -> list[int]:
        """Each axis of a patch must be a multiple of this (the network's downsamplings)."""
        return [int(m) for m in self.network_config().size_multiple]

    @property
    def id(self) -> str:
        """A short hash of everything that changes preprocessed data."""
        d = self.to_dict()
        keys = _PREPROCESSING_KEYS + (("transpose_forward",) if self.transpose_forward else ())
        blob = json.dumps({k: d.get(k) for k in keys}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def network_config(self, **overrides):
        """The planned network's config (:class:`UNETRPPConfig`, or a baseline's :class:`BaselineConfig`),
        with ``overrides`` (e.g. a smaller width for a short run)."""
        from ..network.registry import network_config

        return network_config(self.network, **overrides)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes
        d["patch_divisor"] = self.patch_divisor
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "plans") -> Plans:
        """Validate and build; reads version-1 plans (no ``network``) by planning their network from the preset."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: plans must be a JSON object, got {type(d).__name__}")
        version = d.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise UserError(f"{source}: plans version must be an integer, got {version!r}")
        if version > PLANS_VERSION:
            raise UserError(f"{source}: plans version {version} is newer than this unetrpp ({PLANS_VERSION})")
        required = ("target_spacing", "normalization", "patch_size", "channel_names", "labels")
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source}: not a unetrpp plans file (missing {', '.join(missing)})")
        labels = d["labels"]
        if not isinstance(labels, dict) or not labels or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels.values()):
            raise UserError(f"{source}: labels must map names to non-negative integers, got {labels!r}")
        channels = d["channel_names"]
        if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
            raise UserError(f"{source}: channel_names must be a non-empty list of names, got {channels!r}")
        norm = d["normalization"]
        if not isinstance(norm, list) or len(norm) != len(channels) or not all(isinstance(n, dict) for n in norm):
            raise UserError(f"{source}: normalization must hold one scheme per channel ({len(channels)})")
        for c, scheme in enumerate(norm):
            if problem := _scheme_problem(scheme):
                raise UserError(f"{source}: normalization of channel {c}: {problem}")
        resampling = d.get("resampling", {"image_order": 3, "label_order": 1})
        if not isinstance(resampling, dict) or not all(
                isinstance(resampling.get(k), int) and not isinstance(resampling.get(k), bool)
                and 0 <= resampling[k] <= 5 for k in ("image_order", "label_order")):
            raise UserError(f"{source}: resampling must give image_order and label_order as integers 0-5, "
                             f"got {resampling!r}")
        patch = _ints(d["patch_size"], "patch_size", source)
        network = d.get("network")
        preset = d.get("preset")
        if preset is not None:
            from ..network.presets import PRESETS

            if not isinstance(preset, str) or preset not in PRESETS:
                raise UserError(f"{source}: unknown preset {preset!r}; one of: {', '.join(PRESETS)} (or null)")
        if network is None:  # version 1: the network came from --preset at train time (synapse if none)
            from ..network.presets import get_preset

            network = get_preset(preset or "synapse").config(
                img_size=patch, in_channels=len(channels), out_channels=max(labels.values()) + 1).to_dict()
        if not isinstance(network, dict):
            raise UserError(f"{source}: network must be a JSON object, got {network!r}")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw.setdefault("dataset", "")
        kw.update(target_spacing=_floats(d["target_spacing"], "target_spacing", source), patch_size=patch,
                  network=network, version=PLANS_VERSION)
        order = d.get("transpose_forward")
        if order is not None and not (isinstance(order, list) and all(
                isinstance(a, int) and not isinstance(a, bool) for a in order) and sorted(order) == [0, 1, 2]):
            raise UserError(f"{source}: transpose_forward must be a permutation of [0, 1, 2] or null, got {order!r}")
        kw["transpose_forward"] = None if order == [0, 1, 2] else order
        batch = d.get("batch_size", 2)
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise UserError(f"{source}: batch_size must be a positive integer, got {batch!r}")
        plans = cls(**kw)
        try:
            cfg = plans.network_config()
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: network: {str(e).splitlines()[0]}") from None
        if preset is not None and plans.arch != "unetrpp":
            raise UserError(f"{source}: preset {preset!r} is a UNETR++ preset, the network is {plans.arch}")
        if list(cfg.img_size) != patch:
            raise UserError(f"{source}: network img_size {list(cfg.img_size)} differs from patch_size {patch}")
        if "network" in d and (cfg.in_channels != len(channels) or cfg.out_channels != plans.num_classes):
            raise UserError(f"{source}: the network takes {cfg.in_channels} channel(s) / {cfg.out_channels} classes, "
                             f"the dataset has {len(channels)} / {plans.num_classes}")
        plans.network = json.loads(json.dumps(cfg.to_dict()))
        return plans

    @classmethod
    def coerce(cls, plans: Plans | dict, source: str = "plans") -> Plans:
        return plans if isinstance(plans, Plans) else cls.from_dict(plans, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plans:
        path = Path(path)
        if path.is_dir():
            path = path / "plans.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no plans; run `unetrpp plan {path.parent}` first")
        return cls.from_dict(read_json(path), str(path))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(self.to_dict(), path)


def _scheme_problem(scheme: dict) -> str | None:
    """What is wrong with one channel's normalisation scheme (None: nothing)."""
    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    kind = scheme.get("scheme")
    if kind not in ("ct", "zscore", "none"):
        return f"scheme must be ct, zscore or none, got {kind!r}"
    if kind == "ct":
        clip = scheme.get("clip")
        if not (isinstance(clip, list) and len(clip) == 2 and all(finite(v) for v in clip) and clip[0] <= clip[1]):
            return f"clip must be two finite numbers, low <= high, got {clip!r}"
        if not (finite(scheme.get("mean")) and finite(scheme.get("std")) and scheme["std"] >= 0):
            return f"mean and std must be finite numbers (std >= 0), got {scheme.get('mean')!r}, {scheme.get('std')!r}"
    return None
