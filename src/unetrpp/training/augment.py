"""Data augmentation of the official recipe (spec section 3), in numpy/scipy, per sample.

The spatial part (rotation, scaling) is not applied here but folded into patch extraction
(:mod:`unetrpp.training.sampler`): the patch is read through the transform straight from the
memory-mapped case, so nothing is cropped twice and no enlarged patch is needed. Image data is
interpolated with cubic splines (order 3, as the official code), labels with nearest neighbour
(the official code interpolates labels linearly per class; nearest never invents a class either).

Every transform and its defaults (probability per sample, per channel, ranges):

======================  ==========================================================================
spatial                 rotation p 0.2, +-30 deg about each axis (dummy 2D: +-180 deg in plane
                        only); isotropic scaling p 0.2 in (0.7, 1.4); zeros outside the volume
Gaussian noise          p 0.1, variance U(0, 0.1)
Gaussian blur           p 0.2, per channel p 0.5, sigma U(0.5, 1.0) (in plane only in dummy 2D)
brightness              p 0.15, x U(0.75, 1.25) per channel
contrast                p 0.15, factor U(0.75, 1.25) about the mean, range preserved
low resolution          p 0.25, per channel p 0.5, zoom U(0.5, 1): nearest down, cubic up
                        (z untouched in dummy 2D)
gamma, inverted image   p 0.1, gamma in (0.7, 1.5), mean and sd retained
gamma                   p 0.3, gamma in (0.7, 1.5), mean and sd retained
mirror                  each of the three axes with p 0.5
======================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage


@dataclass
class AugmentConfig:
    """Probabilities and ranges; defaults are the official recipe's. Saved with a training run."""

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    dummy_2d: bool = False
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    p_lowres_channel: float = 0.5
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    mirror_axes: tuple[int, ...] = (0, 1, 2)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all (validation patches)."""
        return cls(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
                   p_gamma_inverted=0, p_gamma=0, mirror_axes=())  # fmt: skip


def dummy_2d_for(patch_size, threshold: float = 3.0) -> bool:
    """nnU-Net's rule: augment in plane only when the patch is much longer in-plane than in z."""
    return max(patch_size[1:]) / patch_size[0] > threshold


def _rotation(angles_rad) -> np.ndarray:
    a, b, c = angles_rad  # about the z, y, x array axes
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_spatial(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray | None:
    """A 3x3 matrix mapping output voxel offsets to source voxel offsets, or None for identity."""
    matrix = np.eye(3)
    changed = False
    if rng.random() < cfg.p_rotation:
        if cfg.dummy_2d:  # rotate in the (y, x) plane only
            angles = (rng.uniform(-np.pi, np.pi), 0.0, 0.0)
        else:
            r = np.deg2rad(cfg.rotation_deg)
            angles = tuple(rng.uniform(-r, r, 3))
        matrix = _rotation(angles)
        changed = True
    if rng.random() < cfg.p_scale:
        lo, hi = cfg.scale
        # half the draws shrink, half enlarge (as nnU-Net), so small and large zooms are equally likely
        s = rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1 else rng.uniform(max(lo, 1.0), hi)
        matrix = matrix / s  # s > 1 magnifies: the patch covers a smaller source region
        changed = True
    return matrix if changed else None


def _gamma(x: np.ndarray, gamma: float, invert: bool) -> np.ndarray:
    if invert:
        x = -x
    mean, std = x.mean(), x.std()
    lo, rng_ = x.min(), x.max() - x.min()
    x = np.power((x - lo) / (rng_ + 1e-7), gamma) * (rng_ + 1e-7) + lo
    x = (x - x.mean()) / (x.std() + 1e-8) * std + mean
    return -x if invert else x


def _draw_gamma(rng, lo_hi) -> float:
    lo, hi = lo_hi
    return float(rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1 else rng.uniform(max(lo, 1.0), hi))


def augment_intensity(data: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """The intensity transforms, in the official order, on float32 ``(c, z, y, x)`` (modified in place)."""
    c_count = data.shape[0]
    if rng.random() < cfg.p_noise:
        var = rng.uniform(*cfg.noise_variance)
        data += rng.normal(0.0, np.sqrt(var), data.shape).astype(np.float32)
    if rng.random() < cfg.p_blur:
        for c in range(c_count):
            if rng.random() < cfg.p_blur_channel:
                s = rng.uniform(*cfg.blur_sigma)
                data[c] = ndimage.gaussian_filter(data[c], (0.0, s, s) if cfg.dummy_2d else s)
    if rng.random() < cfg.p_brightness:
        for c in range(c_count):
            data[c] *= rng.uniform(*cfg.brightness)
    if rng.random() < cfg.p_contrast:
        for c in range(c_count):
            f = rng.uniform(*cfg.contrast)
            lo, hi, mean = data[c].min(), data[c].max(), data[c].mean()
            data[c] = np.clip((data[c] - mean) * f + mean, lo, hi)
    if rng.random() < cfg.p_lowres:
        shape = data.shape[1:]
        for c in range(c_count):
            if rng.random() < cfg.p_lowres_channel:
                z = rng.uniform(*cfg.lowres_zoom)
                small = [max(1, round(n * z)) for n in shape]
                if cfg.dummy_2d:
                    small[0] = shape[0]
                down = ndimage.zoom(data[c], [s / n for s, n in zip(small, shape, strict=True)], order=0,
                                    mode="nearest", grid_mode=True)  # fmt: skip
                data[c] = ndimage.zoom(down, [n / s for s, n in zip(down.shape, shape, strict=True)], order=3,
                                       mode="nearest", grid_mode=True)  # fmt: skip
    if rng.random() < cfg.p_gamma_inverted:
        g = _draw_gamma(rng, cfg.gamma)
        for c in range(c_count):
            data[c] = _gamma(data[c], g, invert=True)
    if rng.random() < cfg.p_gamma:
        g = _draw_gamma(rng, cfg.gamma)
        for c in range(c_count):
            data[c] = _gamma(data[c], g, invert=False)
    return data


def mirror(data: np.ndarray, seg: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """Flip each configured spatial axis with p 0.5, image and label together."""
    for axis in cfg.mirror_axes:
        if rng.random() < 0.5:
            data = np.flip(data, axis + 1)
            seg = np.flip(seg, axis)
    return np.ascontiguousarray(data), np.ascontiguousarray(seg)
