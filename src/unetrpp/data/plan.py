"""``unetrpp plan``: the dataset fingerprint and the experiment plans (``plans.json``).

The fingerprint records per case the spacing, the shape before and after cropping to the
nonzero box, and a fixed-size random sample of foreground intensities per channel; from it we
derive dataset-wide intensity statistics. The plans decide, in a readable JSON:

* target spacing: the median spacing; for strongly anisotropic datasets (largest spacing > 3x the
  others and fewer than a third as many voxels along that axis) the low-resolution axis takes
  the 10th percentile of its spacings instead (nnU-Net's rule), but never finer than the others;
* normalisation per channel: ``ct`` (clip to the dataset's foreground 0.5/99.5 percentiles, then
  z-score with the foreground mean and sd) for channels named CT; ``zscore`` per image otherwise,
  inside the nonzero mask when cropping to it removes at least a quarter of the volume;
* patch size: a preset's, or the median resampled shape rounded up to what the network strides
  divide, shrunk on its physically longest axis until it fits a voxel budget;
* batch size.

All shapes, spacings and patch sizes are in array order ``(z, y, x)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..io import read_case, read_image, read_json, write_json
from .check import with_progress as _progress
from .layout import Case, Dataset
from .resample import ANISOTROPY_THRESHOLD, nonzero_bbox

PLANS_VERSION = 1
SAMPLES_PER_CASE = 10_000
#: Default patch-size budget: the voxels of the Synapse patch, 64 x 128 x 128.
DEFAULT_PATCH_VOXELS = 64 * 128 * 128


def _fingerprint_case(case: Case, seed: int) -> dict:
    data, geometry = read_case(case.images)
    label, _ = read_image(case.label)
    if label.shape != data.shape[1:]:
        raise ValueError(f"{case.label}: label shape {label.shape} differs from image shape {data.shape[1:]}")
    bbox = nonzero_bbox(data)
    cropped = tuple(b - a for a, b in bbox)
    fg = label != 0
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(data.shape[0]):
        values = data[c][fg]
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float64))
    return {
        "name": case.name,
        "spacing": list(geometry.spacing_zyx),
        "shape": list(data.shape[1:]),
        "shape_after_crop": list(cropped),
        "samples": samples,
    }


def compute_fingerprint(dataset: Dataset, workers: int = 1, progress: bool = False, seed: int = 1234) -> dict:
    cases = list(dataset.training_cases())
    if not cases:
        raise ValueError(f"{dataset.root}: no training cases")
    args = [(c, seed + i) for i, c in enumerate(cases)]
    if workers > 1 and len(args) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            it = pool.map(_fingerprint_case, *zip(*args, strict=False), chunksize=4)
            results = list(_progress(it, len(args), progress, "fingerprint"))
    else:
        results = [_fingerprint_case(*a) for a in _progress(args, len(args), progress, "fingerprint")]
    stats = []
    for c, name in enumerate(dataset.channel_names):
        v = np.concatenate([r["samples"][c] for r in results])
        if v.size == 0:
            raise ValueError(f"{dataset.root}: no foreground voxels in any label; cannot plan")
        stats.append({
            "channel": name, "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max()),
            "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)),
        })  # fmt: skip
    return {
        "dataset": dataset.name,
        "axes": "zyx",
        "cases": [{k: r[k] for k in ("name", "spacing", "shape", "shape_after_crop")} for r in results],
        "foreground_intensities": stats,
    }


def target_spacing_for(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """Median spacing, with the anisotropic-axis rule (module docstring)."""
    spacings, shapes = np.asarray(spacings, np.float64), np.asarray(shapes, np.float64)
    target = np.median(spacings, axis=0)
    sizes = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[others])
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(t, float(max(target[others])))
    return [float(v) for v in target]


def auto_patch_size(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    divisor: Sequence[int] = (16, 32, 32),
    max_voxels: int = DEFAULT_PATCH_VOXELS,
) -> list[int]:
    """The median shape rounded up to multiples of ``divisor``, shrunk until it has at most ``max_voxels``."""
    patch = [int(np.ceil(max(m, 1) / d) * d) for m, d in zip(median_shape, divisor, strict=True)]
    while int(np.prod(patch)) > max_voxels:
        shrinkable = [a for a in range(3) if patch[a] > divisor[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: patch[a] * spacing[a])
        patch[axis] -= divisor[axis]
    return patch


def make_plans(
    dataset: Dataset,
    fingerprint: dict,
    patch_size: Sequence[int] | None = None,
    divisor: Sequence[int] = (16, 32, 32),
    batch_size: int = 2,
    preset: str | None = None,
    max_patch_voxels: int = DEFAULT_PATCH_VOXELS,
    target_spacing: Sequence[float] | None = None,
) -> dict:
    cases = fingerprint["cases"]
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    cropped = np.array([c["shape_after_crop"] for c in cases], dtype=np.float64)
    full = np.array([c["shape"] for c in cases], dtype=np.float64)
    if target_spacing is not None:
        target = [float(v) for v in target_spacing]
        if len(target) != 3 or not all(v > 0 for v in target):
            raise ValueError(f"target spacing must be 3 positive numbers (z, y, x) in mm, got {target_spacing}")
    else:
        target = target_spacing_for(spacings, cropped)
    resampled = cropped * spacings / np.asarray(target)
    median_shape = [float(v) for v in np.median(resampled, axis=0)]
    if patch_size is None:
        patch = auto_patch_size(median_shape, target, divisor, max_patch_voxels)
    else:
        patch = [int(p) for p in patch_size]
        bad = [a for a in range(3) if patch[a] % divisor[a]]
        if bad:
            raise ValueError(f"patch size {patch} is not divisible by the network strides {list(divisor)}")
    # crop to nonzero shrinks the volume by >= 25 % -> MRI z-scores inside the nonzero mask (e.g. skull-stripped)
    crop_ratio = float(np.median(np.prod(cropped, axis=1) / np.prod(full, axis=1)))
    normalization = []
    for name, st in zip(dataset.channel_names, fingerprint["foreground_intensities"], strict=True):
        if name.strip().upper() == "CT":
            normalization.append({
                "channel": name, "scheme": "ct",
                "clip": [st["percentile_00_5"], st["percentile_99_5"]], "mean": st["mean"], "std": st["std"],
            })  # fmt: skip
        else:
            normalization.append({"channel": name, "scheme": "zscore", "use_nonzero_mask": crop_ratio < 0.75})
    plans = {
        "version": PLANS_VERSION,
        "dataset": dataset.name,
        "axes": "zyx",
        "channel_names": dataset.channel_names,
        "labels": dataset.labels,
        "num_classes": dataset.num_classes,
        "preset": preset,
        "target_spacing": target,
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "median_shape_after_resampling": median_shape,
        "patch_size": patch,
        "patch_divisor": [int(d) for d in divisor],
        "batch_size": int(batch_size),
        "normalization": normalization,
        "resampling": {"image_order": 3, "label_order": 1, "anisotropy_threshold": ANISOTROPY_THRESHOLD,
                       "low_resolution_axis_order": 0},
    }
    return plans


def plans_id(plans: dict) -> str:
    """A short hash of everything in the plans that changes preprocessed data."""
    keys = ("target_spacing", "normalization", "resampling", "channel_names", "labels")
    blob = json.dumps({k: plans.get(k) for k in keys}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan_dataset(
    root: str | os.PathLike,
    patch_size: Sequence[int] | None = None,
    divisor: Sequence[int] = (16, 32, 32),
    batch_size: int = 2,
    preset: str | None = None,
    workers: int = 1,
    progress: bool = False,
    target_spacing: Sequence[float] | None = None,
) -> dict:
    """Fingerprint + plans, written to ``ROOT/fingerprint.json`` and ``ROOT/plans.json``."""
    ds = Dataset.open(root)
    fp = compute_fingerprint(ds, workers=workers, progress=progress)
    plans = make_plans(ds, fp, patch_size=patch_size, divisor=divisor, batch_size=batch_size, preset=preset,
                       target_spacing=target_spacing)
    write_json(fp, Path(root) / "fingerprint.json")
    write_json(plans, Path(root) / "plans.json")
    return plans


def load_plans(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "plans.json"
    plans = read_json(path)
    required = ("target_spacing", "normalization", "patch_size", "channel_names", "labels")
    missing = [k for k in required if k not in plans]
    if missing:
        raise ValueError(f"{path}: not a unetrpp plans file (missing {', '.join(missing)})")
    return plans

