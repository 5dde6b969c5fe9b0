"""Overlap and surface metrics of binary masks, with voxel spacing.

Definitions (ours, the default):

* Dice = 2|P ∩ G| / (|P| + |G|).
* HD95 = the 95th percentile of the pooled surface distances in both directions, in millimetres
  (the definition of medpy's ``hd95``: surfaces are the mask voxels removed by one erosion with
  6-connectivity; distances are Euclidean with the voxel spacing).
* NSD (normalised surface Dice, Nikolov et al.) at a tolerance in mm: the fraction of both
  surfaces lying within the tolerance of the other surface (surface voxels counted, not areas).

Empty masks: both empty -> every metric is NaN and the pair is reported as ``both_empty``
(excluded from means); exactly one empty -> Dice 0 and NSD 0, HD95 NaN (missing, counted),
never a perfect score.

``official=True`` reproduces the official UNETR++ evaluation scripts (spec section 5): HD95 in
voxel units (spacing ignored), Dice 1 when both are empty, HD95 0 when either is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import UserError

_CROSS = ndimage.generate_binary_structure(3, 1)


@dataclass
class PairMetrics:
    dice: float
    hd95: float
    nsd: float | None
    status: str  # "ok", "both_empty", "pred_empty", "gt_empty"
    pred_voxels: int
    gt_voxels: int


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, g = int(pred.sum()), int(gt.sum())
    if p + g == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, gt).sum()) / (p + g)


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``a | b`` with one voxel of margin where the array allows (exact for surfaces)."""
    both = a | b
    box = []
    for axis in range(both.ndim):
        other = tuple(i for i in range(both.ndim) if i != axis)
        hit = np.flatnonzero(both.any(axis=other))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, both.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, iterations=1, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (in the units of ``spacing``) from each surface voxel of ``pred`` to ``gt``'s surface, and back."""
    box = _union_box(pred, gt)
    p, g = pred[box], gt[box]
    sp, sg = _surface(p), _surface(g)
    to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_g[sp], to_p[sg]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance of two non-empty masks (medpy's definition, with spacing)."""
    if not pred.any() or not gt.any():
        raise UserError("hd95 needs two non-empty masks")
    a, b = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.hstack((a, b)), 95))


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    a, b = surface_distances(pred, gt, spacing)
    return float(((a <= tolerance).sum() + (b <= tolerance).sum()) / (a.size + b.size))


def compare_masks(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance: float | None = None,
    official: bool = False,
) -> PairMetrics:
    """Dice, HD95 and (optionally) NSD of one pair of boolean masks, with the empty-mask policy above."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise UserError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    np_, ng = int(pred.sum()), int(gt.sum())
    status = "ok" if np_ and ng else "both_empty" if not (np_ or ng) else "pred_empty" if not np_ else "gt_empty"
    if official:
        spacing = (1.0,) * pred.ndim
        if status == "ok":
            d, h = dice_score(pred, gt), hd95(pred, gt, spacing)
        else:
            d, h = (1.0 if status == "both_empty" else 0.0), 0.0
        nsd = None
        if nsd_tolerance is not None:
            nsd = normalized_surface_dice(pred, gt, spacing, nsd_tolerance) if status == "ok" else d
        return PairMetrics(d, h, nsd, status, np_, ng)
    if status == "both_empty":
        return PairMetrics(math.nan, math.nan, math.nan if nsd_tolerance is not None else None, status, 0, 0)
    if status != "ok":
        return PairMetrics(0.0, math.nan, 0.0 if nsd_tolerance is not None else None, status, np_, ng)
    a, b = surface_distances(pred, gt, spacing)
    h = float(np.percentile(np.hstack((a, b)), 95))
    nsd = None
    if nsd_tolerance is not None:
        nsd = float(((a <= nsd_tolerance).sum() + (b <= nsd_tolerance).sum()) / (a.size + b.size))
    return PairMetrics(dice_score(pred, gt), h, nsd, status, np_, ng)
