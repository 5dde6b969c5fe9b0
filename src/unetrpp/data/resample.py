"""Resampling of images, label maps and class probabilities between voxel grids (scipy).

Grids are aligned at their outer voxel edges (``grid_mode=True``): the output covers the same
physical extent as the input, as in nnU-Net. For strongly anisotropic data (largest spacing more
than :data:`ANISOTROPY_THRESHOLD` times the smallest) the low-resolution axis is resampled
separately with nearest neighbour, the other two with the requested order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """The voxel count covering the same extent at ``target_spacing`` (at least 1 per axis)."""
    return tuple(
        max(1, round(float(n) * float(s) / float(t)))
        for n, s, t in zip(shape, spacing, target_spacing, strict=True)
    )


def anisotropic_axis(spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The low-resolution axis when ``max(spacing) > threshold * min(spacing)``, else None."""
    s = np.asarray(spacing, dtype=np.float64)
    if s.max() > threshold * s.min():
        return int(np.argmax(s))
    return None


def _zoom(x: np.ndarray, shape: Sequence[int], order: int, axes: Sequence[int], out_dtype=np.float32) -> np.ndarray:
    factors = [1.0] * x.ndim
    for a in axes:
        factors[a] = shape[a] / x.shape[a]
    if all(f == 1.0 for f in factors):
        return x.astype(out_dtype, copy=False)
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1,
                       output=out_dtype)  # fmt: skip
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def resample_volume(
    x: np.ndarray, shape: Sequence[int], order: int = 3, separate_axis: int | None = None
) -> np.ndarray:
    """Resample a 3D float volume to ``shape``; ``separate_axis`` is resampled with order 0."""
    shape = tuple(int(s) for s in shape)
    if x.shape == shape:
        return x.astype(np.float32, copy=False)
    x = x.astype(np.float32, copy=False)
    if separate_axis is None:
        return _zoom(x, shape, order, (0, 1, 2))
    in_plane = [a for a in range(3) if a != separate_axis]
    mid = tuple(shape[a] if a in in_plane else x.shape[a] for a in range(3))
    y = _zoom(x, mid, order, in_plane)
    return _zoom(y, shape, 0, (separate_axis,))


def resample_image(
    data: np.ndarray, shape: Sequence[int], order: int = 3, separate_axis: int | None = None
) -> np.ndarray:
    """Resample every channel of ``(c, z, y, x)`` data to ``shape``."""
    return np.stack([resample_volume(c, shape, order, separate_axis) for c in data])


def resample_label(
    seg: np.ndarray, shape: Sequence[int], separate_axis: int | None = None, order: int = 1
) -> np.ndarray:
    """Resample a label map without inventing classes.

    Each present class is resampled as a soft mask (linear by default) and every output voxel
    takes the class with the highest value: an arg-max over one-hot channels, computed one class
    at a time so memory stays at two volumes.
    """
    shape = tuple(int(s) for s in shape)
    if seg.shape == shape:
        return seg.copy()
    classes = np.unique(seg)
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=seg.dtype)
    for c in classes:
        m = resample_volume((seg == c).astype(np.float32), shape, order, separate_axis)
        better = m > best
        best[better] = m[better]
        out[better] = c
    return out


def resample_probabilities(
    probs: np.ndarray, shape: Sequence[int], separate_axis: int | None = None, order: int = 1
) -> np.ndarray:
    """Resample ``(k, z, y, x)`` class probabilities (linear; renormalised to sum to one)."""
    out = resample_image(probs, shape, order, separate_axis)
    np.clip(out, 0, None, out=out)
    total = out.sum(0, keepdims=True)
    np.divide(out, np.maximum(total, 1e-8), out=out)
    return out


def nonzero_bbox(data: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box ``((z0, z1), (y0, y1), (x0, x1))`` of voxels nonzero in any channel (holes filled)."""
    mask = np.any(data != 0, axis=0) if data.ndim == 4 else data != 0
    if not mask.any():
        return tuple((0, int(n)) for n in mask.shape)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        out.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask)
