"""``unetrpp preprocess``: crop, normalise, resample, and store each case memory-mappable.

Per case ``CASE``, in the output folder (default ``DATASET/preprocessed``):

* ``CASE.npy``           float32 ``(c, z, y, x)``, the normalised, resampled image;
* ``CASE_seg.npy``       uint8 (int16 beyond 255 classes) ``(z, y, x)`` label map;
* ``CASE_locations.npy`` int32 ``(m, 4)`` rows ``(class, z, y, x)``: a seeded sample of up to
  10,000 voxels of each foreground class, for foreground oversampling;
* ``CASE.json``          everything needed to undo the preprocessing (original geometry and shape,
  crop box, spacings, shapes): a :class:`~unetrpp.data.restore.CaseProperties`, written last: a
  case counts as done only when its JSON is there and names the current plans, so an interrupted
  run leaves no half case behind.

The order is nnU-Net's: crop to the nonzero box, normalise, resample. The restore methods of
:class:`~unetrpp.data.restore.CaseProperties` take a result on the preprocessed grid back to the
original one.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import Geometry, read_case, read_image, read_json, write_json, write_npy
from ..parallel import parallel_map
from .layout import Case, Dataset, safe_case_name
from .plan import load_plans
from .plans import Plans
from .resample import fill_holes, new_shape_for, nonzero_bbox, resample_image, resample_label
from .restore import CaseProperties, resampling_axis
from .validate import require_declared_labels

LOCATIONS_PER_CLASS = 10_000


def normalize(data: np.ndarray, plans: Plans | dict) -> np.ndarray:
    """Normalise ``(c, z, y, x)`` data in place per the plans' per-channel schemes; returns it."""
    schemes = Plans.coerce(plans).normalization
    if len(schemes) != data.shape[0]:
        raise UserError(f"image has {data.shape[0]} channel(s), the plans expect {len(schemes)}")
    mask = None  # the nonzero region of the raw data, taken before any channel is changed
    if any(s.get("use_nonzero_mask") for s in schemes):
        mask = fill_holes(np.any(data != 0, axis=0))
    for c, scheme in enumerate(schemes):
        x = data[c]
        if scheme["scheme"] == "ct":
            lo, hi = scheme["clip"]
            np.clip(x, lo, hi, out=x)
            x -= scheme["mean"]
            x /= max(scheme["std"], 1e-8)
        elif scheme["scheme"] == "zscore":
            if scheme.get("use_nonzero_mask"):
                values = x[mask]
                mean, std = (float(values.mean()), float(values.std())) if values.size else (0.0, 1.0)
                x -= mean
                x /= max(std, 1e-8)
                x[~mask] = 0
            else:
                mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
                x -= mean
                x /= max(std, 1e-8)
        elif scheme["scheme"] != "none":
            raise UserError(f"unknown normalisation scheme {scheme['scheme']!r}")
    return data


def preprocess_array(
    data: np.ndarray, geometry: Geometry, plans: Plans | dict, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Crop, normalise and resample one case held in memory; returns ``(data, seg, properties)``."""
    plans = Plans.coerce(plans)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise UserError(f"image must be (c, z, y, x) or (z, y, x), got shape {data.shape}")
    data = data.astype(np.float32, copy=True)
    if not np.isfinite(data).all():
        raise UserError("image has NaN/inf voxels")
    order = plans.transpose_forward
    if order:  # nnU-Net v1 plans: the network sees the axes in this order (``CaseProperties.untranspose`` undoes it)
        data = np.ascontiguousarray(data.transpose(0, *(a + 1 for a in order)))
        label = None if label is None else label.transpose(order)
    shape = data.shape[1:]
    bbox = nonzero_bbox(data)
    crop = tuple(slice(a, b) for a, b in bbox)
    data = np.ascontiguousarray(data[(slice(None), *crop)])
    normalize(data, plans)
    spacing = geometry.spacing_zyx
    if order:
        spacing = tuple(spacing[a] for a in order)
    target = tuple(float(t) for t in plans.target_spacing)
    new_shape = new_shape_for(data.shape[1:], spacing, target)
    axis = resampling_axis(spacing, target)
    data = resample_image(data, new_shape, plans.resampling["image_order"], axis)
    seg = None
    if label is not None:
        if label.shape != shape:
            raise UserError(f"label shape {label.shape} differs from image shape {shape}")
        seg = resample_label(np.ascontiguousarray(label[crop]), new_shape, axis, plans.resampling["label_order"])
    props = CaseProperties(
        shape=tuple(int(n) for n in shape), bbox=tuple((int(a), int(b)) for a, b in bbox),
        spacing=tuple(float(v) for v in spacing), target_spacing=target,
        shape_after_resampling=tuple(int(n) for n in new_shape), geometry=geometry, plans_id=plans.id,
        transpose_forward=tuple(int(a) for a in order) if order else None,
    )
    return data, seg, props


def _label_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.int16


def class_locations(seg: np.ndarray, seed: int, per_class: int = LOCATIONS_PER_CLASS) -> np.ndarray:
    """Rows ``(class, z, y, x)``: up to ``per_class`` seeded random voxels of each foreground class."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(seg):
        if c == 0:
            continue
        idx = np.flatnonzero(seg.ravel() == c)
        if idx.size > per_class:
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        zyx = np.stack(np.unravel_index(idx, seg.shape), axis=1)
        rows.append(np.concatenate([np.full((len(idx), 1), c), zyx], axis=1))
    if not rows:
        return np.zeros((0, 4), dtype=np.int32)
    return np.concatenate(rows).astype(np.int32)


def _case_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def is_done(out_dir: Path, name: str, pid: str) -> bool:
    j = out_dir / f"{name}.json"
    if not j.exists():
        return False
    try:
        return read_json(j).get("plans_id") == pid and all(
            (out_dir / f"{name}{s}.npy").exists() for s in ("", "_seg", "_locations")
        )
    except ValueError:
        return False


def preprocess_case(case: Case, plans: Plans | dict, out_dir: str | os.PathLike) -> CaseProperties:
    """Preprocess one training case and store it (data files first, the JSON marker last)."""
    out_dir = Path(out_dir)
    plans = Plans.coerce(plans)
    data, geometry = read_case(case.images)
    label, lgeom = read_image(case.label)
    if label.ndim != 3:
        raise UserError(f"{case.label}: label must be 3D, got shape {label.shape}")
    if why := geometry.mismatch(lgeom):
        raise UserError(f"{case.label}: label geometry differs from the image: {why}")
    declared = case.label_values if case.label_values is not None else plans.labels.values()
    require_declared_labels(label, case.label, declared)  # before the cast below could wrap 258 to 2
    label = label.astype(_label_dtype(plans.num_classes))
    data, seg, props = preprocess_array(data, geometry, plans, label)
    locations = class_locations(seg, _case_seed(case.name))
    voxels = {int(c): int(n) for c, n in zip(*np.unique(seg, return_counts=True), strict=True)}
    props = dataclasses.replace(props, name=case.name, class_voxels=voxels)
    write_npy(data, out_dir / f"{case.name}.npy")
    write_npy(seg, out_dir / f"{case.name}_seg.npy")
    write_npy(locations, out_dir / f"{case.name}_locations.npy")
    write_json(props.to_dict(), out_dir / f"{case.name}.json")
    return props


def _job(case: Case, plans: Plans, out_dir: Path) -> str:
    preprocess_case(case, plans, out_dir)
    return case.name


def preprocess_dataset(
    root: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    plans: Plans | dict | None = None,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Preprocess every training case of the dataset at ``root``; returns a summary."""
    root = Path(root)
    ds = Dataset.open(root)
    plans = Plans.coerce(plans) if plans is not None else load_plans(root / "plans.json")
    if {k: int(v) for k, v in ds.labels.items()} != {k: int(v) for k, v in plans.labels.items()}:
        raise UserError(f"{root / 'dataset.json'}: its labels {ds.labels} are not the plans' {plans.labels}; "
                         "run `unetrpp plan` again")
    if len(ds.channel_names) != len(plans.channel_names):
        raise UserError(f"{root / 'dataset.json'}: {len(ds.channel_names)} channel(s), the plans were made for "
                         f"{len(plans.channel_names)}; run `unetrpp plan` again")
    out_dir = Path(out_dir) if out_dir is not None else root / "preprocessed"
    out_dir.mkdir(parents=True, exist_ok=True)
    plans.save(out_dir / "plans.json")
    pid = plans.id
    cases = ds.training_cases()
    todo = [c for c in cases if overwrite or not is_done(out_dir, c.name, pid)]
    parallel_map(_job, [(c, plans, out_dir) for c in todo], workers, progress, desc="preprocess",
                 done=len(cases) - len(todo))
    return {"cases": len(cases), "processed": len(todo), "skipped": len(cases) - len(todo), "out": str(out_dir)}


def load_case(out_dir: str | os.PathLike, name: str, mmap: bool = True):
    """``(data, seg, locations, properties)`` of a preprocessed case; arrays memory-mapped by default,
    the properties a :class:`~unetrpp.data.restore.CaseProperties`."""
    out_dir = Path(out_dir)
    safe_case_name(name, out_dir)
    mode = "r" if mmap else None
    arrays = []
    for suffix, m in (("", mode), ("_seg", mode), ("_locations", None)):
        path = out_dir / f"{name}{suffix}.npy"
        try:
            arrays.append(np.load(path, mmap_mode=m, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: unreadable preprocessed array ({str(e).splitlines()[0][:120]}); rerun "
                             "`unetrpp preprocess` with --overwrite") from None
    data, seg, loc = arrays
    path = out_dir / f"{name}.json"
    props = CaseProperties.from_dict(read_json(path), str(path))
    if data.ndim != 4 or tuple(data.shape[1:]) != props.shape_after_resampling or seg.shape != data.shape[1:]:
        raise UserError(f"{path}: the case's arrays ({list(data.shape)}, labels {list(seg.shape)}) are not its "
                        f"preprocessed shape {list(props.shape_after_resampling)}; rerun `unetrpp preprocess` "
                        "with --overwrite")
    return data, seg, loc, props

