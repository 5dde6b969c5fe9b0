"""Patch sampling from the preprocessed cache, with foreground oversampling and augmentation.

Cases stay memory-mapped; a patch reads only the box of voxels it needs. A spatial transform
(rotation, scaling) is applied while reading: the patch's voxel grid is mapped into the case and
interpolated there (order 3 for images, nearest for labels), so no enlarged patch is cut first.
Outside the case the image is 0 and the label background, which also pads cases smaller than
the patch.

In each batch of ``B`` the last ``B - round(B * (1 - oversample_foreground))`` samples are forced to
contain foreground (the official rule: one of two, one of four): a foreground class present in
the case is drawn uniformly, then one of its stored voxel locations becomes the patch centre.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..data.layout import safe_case_name
from ..data.preprocess import load_case
from ..errors import UserError
from .augment import AugmentConfig, augment_intensity, mirror, sample_spatial


class CaseCache:
    """Memory-mapped preprocessed cases, opened on first use (per process)."""

    def __init__(self, folder: str | os.PathLike, names: Sequence[str]):
        self.folder = Path(folder)
        self.names = [safe_case_name(n, self.folder) for n in names]
        if not self.names:
            raise UserError(f"{self.folder}: no cases to sample from")
        missing = [n for n in self.names if not (self.folder / f"{n}.json").exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.folder}: {len(missing)} case(s) not preprocessed (first: {missing[0]}); "
                "run `unetrpp preprocess`"
            )
        self._open: dict[str, tuple] = {}

    def get(self, name: str):
        if name not in self._open:
            data, seg, loc, props = load_case(self.folder, name)
            self._open[name] = (data, seg, loc, props)
        return self._open[name]


def extract_patch(
    data: np.ndarray,
    seg: np.ndarray | None,
    center: Sequence[float],
    patch_size: Sequence[int],
    matrix: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The patch of ``patch_size`` centred at voxel ``center`` of ``(c, z, y, x)`` data (zeros outside).

    ``matrix`` maps output voxel offsets from the patch centre to source voxel offsets.
    """
    patch = np.asarray(patch_size, dtype=np.int64)
    shape = np.asarray(data.shape[1:], dtype=np.int64)
    center = np.asarray(center, dtype=np.float64)
    out_data = np.zeros((data.shape[0], *patch), dtype=np.float32)
    out_seg = np.zeros(tuple(patch), dtype=seg.dtype) if seg is not None else None
    if matrix is None:
        start = np.floor(center - (patch - 1) / 2).astype(np.int64)  # integer-aligned crop
        lo, hi = np.maximum(start, 0), np.minimum(start + patch, shape)
        if np.any(hi <= lo):
            return out_data, out_seg
        src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
        out_data[(slice(None), *dst)] = data[(slice(None), *src)]
        if seg is not None:
            out_seg[dst] = seg[src]
        return out_data, out_seg
    # the transformed patch's bounding box in the source, plus a margin for the cubic spline
    half = (patch - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    src_corners = matrix @ corners + center[:, None]
    lo = np.maximum(np.floor(src_corners.min(1)).astype(np.int64) - 2, 0)
    hi = np.minimum(np.ceil(src_corners.max(1)).astype(np.int64) + 3, shape)
    if np.any(hi <= lo):
        return out_data, out_seg
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) - h for n, h in zip(patch, half, strict=True)],
                                indexing="ij")).reshape(3, -1)  # fmt: skip
    coords = (matrix.astype(np.float32) @ grid) + (center - lo).astype(np.float32)[:, None]
    coords = coords.reshape(3, *patch)
    for c in range(data.shape[0]):
        block = np.asarray(data[c][box], dtype=np.float32)
        out_data[c] = ndimage.map_coordinates(block, coords, order=3, mode="constant", cval=0.0, prefilter=True)
    if seg is not None:
        out_seg[...] = ndimage.map_coordinates(np.asarray(seg[box]), coords, order=0, mode="constant", cval=0)
    return out_data, out_seg


class PatchSampler:
    """Draws augmented training batches ``(images (b, c, z, y, x) float32, labels (b, z, y, x) uint8/int16)``."""

    def __init__(
        self,
        folder: str | os.PathLike,
        names: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        augment: AugmentConfig | None = None,
        oversample_foreground: float = 0.33,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.cases = CaseCache(folder, names)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.augment = augment if augment is not None else AugmentConfig()
        self.forced = batch_size - round(batch_size * (1 - oversample_foreground))
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed) -> None:
        self.rng = np.random.default_rng(seed)

    def _center(self, shape: np.ndarray, loc: np.ndarray, force_fg: bool) -> np.ndarray:
        if force_fg and len(loc):
            classes = np.unique(loc[:, 0])
            rows = loc[loc[:, 0] == self.rng.choice(classes)]
            return rows[self.rng.integers(len(rows)), 1:].astype(np.float64)
        patch = np.asarray(self.patch_size)
        lo = np.minimum((patch - 1) / 2, (shape - 1) / 2)  # cases smaller than the patch: centred, padded
        hi = np.maximum(shape - 1 - (patch - 1) / 2, (shape - 1) / 2)
        return np.floor(self.rng.uniform(lo, hi + 1e-9) + 0.5)

    def sample(self, force_fg: bool = False) -> tuple[np.ndarray, np.ndarray]:
        name = self.cases.names[self.rng.integers(len(self.cases.names))]
        data, seg, loc, _ = self.cases.get(name)
        center = self._center(np.asarray(seg.shape), loc, force_fg)
        matrix = sample_spatial(self.rng, self.augment)
        x, y = extract_patch(data, seg, center, self.patch_size, matrix)
        x = augment_intensity(x, self.rng, self.augment)
        return mirror(x, y, self.rng, self.augment)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        samples = [self.sample(force_fg=i >= self.batch_size - self.forced) for i in range(self.batch_size)]
        return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.batch()
