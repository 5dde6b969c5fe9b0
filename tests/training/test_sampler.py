"""Patch sampling and augmentation: alignment of image and label, oversampling, padding, transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.volumes import make_v2_dataset
from unetrpp.data.plan import plan_dataset
from unetrpp.data.preprocess import preprocess_dataset
from unetrpp.training.augment import AugmentConfig, augment_intensity, dummy_2d_for, mirror, sample_spatial
from unetrpp.training.loader import BatchStream, batch_loader
from unetrpp.training.sampler import PatchSampler, extract_patch


def _volume(shape=(20, 30, 26), seed=0):
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.uint8)
    seg[4:12, 5:20, 6:14] = 1
    seg[10:17, 12:26, 12:22] = 2
    seg[2:5, 22:27, 3:7] = 3
    data = (seg.astype(np.float32) * 10 + rng.normal(0, 0.01, shape).astype(np.float32))[None]
    return data, seg


def test_plain_crop_equals_slicing_and_pads_outside():
    data, seg = _volume()
    x, y = extract_patch(data, seg, center=(9.5, 14.5, 12.5), patch_size=(8, 10, 6))
    np.testing.assert_array_equal(x[0], data[0, 6:14, 10:20, 10:16])
    np.testing.assert_array_equal(y, seg[6:14, 10:20, 10:16])
    x, y = extract_patch(data, seg, center=(0, 0, 0), patch_size=(4, 4, 4))  # corner: half outside
    assert (x[:, :2] == 0).all() and (y[:2] == 0).all()
    np.testing.assert_array_equal(y[2:, 2:, 2:], seg[:2, :2, :2])


def test_rotation_matrix_maps_voxels_like_rot90():
    data, seg = _volume(shape=(9, 15, 15))
    rot = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # 90 degrees in the (y, x) plane
    x, y = extract_patch(data, seg, center=(4, 7, 7), patch_size=(9, 15, 15), matrix=rot)
    expect = np.rot90(seg, k=-1, axes=(1, 2))  # out[y, x] = src[n - 1 - x, y]
    np.testing.assert_array_equal(y, expect)
    np.testing.assert_allclose(x[0], np.rot90(data[0], k=-1, axes=(1, 2)), atol=1e-4)


def test_magnification_covers_a_smaller_region():
    data, seg = _volume()
    x, y = extract_patch(data, seg, center=(10, 15, 13), patch_size=(8, 8, 8), matrix=np.eye(3) / 2.0)
    # output voxel i reads source centre + (i - 3.5) / 2: the middle of the patch is the source centre
    assert y[4, 4, 4] == seg[10, 15, 13] or y[3, 3, 3] == seg[10, 15, 13]
    assert x.shape == (1, 8, 8, 8)


@pytest.mark.parametrize("seed", range(6))
def test_spatial_augmentation_keeps_image_and_label_aligned(seed):
    data, seg = _volume()
    rng = np.random.default_rng(seed)
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0)
    matrix = sample_spatial(rng, cfg)
    assert matrix is not None and not np.allclose(matrix, np.eye(3))
    x, y = extract_patch(data, seg, (10, 15, 13), (16, 24, 24), matrix)
    x, y = mirror(x, y, rng, cfg)
    # the image is 10 x label: after the same transform the rounded image still reads the label
    inside = y > 0
    agree = np.mean(np.round(x[0] / 10)[inside] == y[inside])
    assert inside.sum() > 100 and agree > 0.9


def test_dummy_2d_rotates_in_plane_only():
    assert dummy_2d_for((16, 160, 160)) and not dummy_2d_for((64, 128, 128))
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(p_rotation=1.0, p_scale=0.0, dummy_2d=True)
    for _ in range(5):
        m = sample_spatial(rng, cfg)
        np.testing.assert_allclose(m[0], [1, 0, 0], atol=1e-12)
        np.testing.assert_allclose(m[:, 0], [1, 0, 0], atol=1e-12)


def test_intensity_transforms():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (2, 8, 16, 16)).astype(np.float32)
    assert np.array_equal(augment_intensity(base.copy(), rng, AugmentConfig.off()), base)
    for kind in ("p_gamma", "p_gamma_inverted"):
        cfg = AugmentConfig.off()
        setattr(cfg, kind, 1.0)
        out = augment_intensity(base.copy(), np.random.default_rng(1), cfg)
        assert not np.allclose(out, base)
        np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), base.mean(axis=(1, 2, 3)), atol=1e-4)
        np.testing.assert_allclose(out.std(axis=(1, 2, 3)), base.std(axis=(1, 2, 3)), rtol=1e-3)
    cfg = AugmentConfig.off()
    cfg.p_contrast = 1.0
    out = augment_intensity(base.copy(), np.random.default_rng(2), cfg)
    assert out.min() >= base.min() - 1e-6 and out.max() <= base.max() + 1e-6
    cfg = AugmentConfig.off()
    cfg.p_lowres, cfg.p_lowres_channel = 1.0, 1.0
    out = augment_intensity(base.copy(), np.random.default_rng(3), cfg)
    assert out.shape == base.shape and not np.allclose(out, base)


def test_mirror_flips_image_and_label_together():
    data, seg = _volume()
    x, y = mirror(data.copy(), seg.copy(), np.random.default_rng(0), AugmentConfig(mirror_axes=(0, 1, 2)))
    assert np.array_equal(np.round(x[0] / 10).astype(np.uint8), y)
    assert not np.array_equal(y, seg)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = make_v2_dataset(tmp_path_factory.mktemp("s") / "ds", cases=3, shape=(12, 40, 40))
    plan_dataset(root, patch_size=(16, 32, 32))
    preprocess_dataset(root, workers=1)
    return root / "preprocessed"


def test_foreground_oversampling(cache):
    for b, forced in ((2, 1), (4, 1), (3, 1), (1, 0)):
        s = PatchSampler(cache, ["case_000", "case_001"], (4, 6, 6), b, AugmentConfig.off(), seed=0)
        assert s.forced == forced
    s = PatchSampler(cache, ["case_000", "case_001"], (4, 6, 6), 2, AugmentConfig.off(), seed=0)
    fg = [np.any(s.batch()[1][1] > 0) for _ in range(40)]  # the second sample is forced
    assert all(fg)
    free = np.mean([np.any(s.sample(force_fg=False)[1] > 0) for _ in range(200)])
    assert free < 0.9  # without forcing, many tiny patches miss the small boxes


def test_small_cases_are_padded(cache):
    s = PatchSampler(cache, ["case_002"], (16, 64, 64), 2, AugmentConfig.off(), seed=1)
    x, y = s.batch()
    assert x.shape == (2, 1, 16, 64, 64) and y.shape == (2, 16, 64, 64)
    x, y = s.sample(force_fg=False)  # a random patch of a smaller case is centred on it, zeros around
    assert (x[:, :2] == 0).all() and (x[:, 14:] == 0).all() and (x[:, 2:14] != 0).any()  # 12 slices
    assert (x[:, :, :12] == 0).all() and (x[:, :, 52:] == 0).all()  # 40 rows


def test_missing_case_is_one_line_error(cache):
    with pytest.raises(FileNotFoundError, match="not preprocessed"):
        PatchSampler(cache, ["case_000", "nope"], (4, 8, 8), 2)


def test_batch_stream_workers_are_distinct_and_reproducible(cache):
    names = ["case_000", "case_001", "case_002"]
    stream = BatchStream(seed=5, folder=cache, names=names, patch_size=(8, 16, 16), batch_size=2)
    it = iter(batch_loader(stream, workers=2))
    a = [next(it) for _ in range(4)]
    assert a[0][0].shape == (2, 1, 8, 16, 16) and a[0][1].dtype == torch.int64
    assert not torch.equal(a[0][0], a[1][0])  # worker 0 and worker 1 draw different patches
    it2 = iter(batch_loader(BatchStream(seed=5, folder=cache, names=names, patch_size=(8, 16, 16), batch_size=2), 2))
    b = [next(it2) for _ in range(4)]
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
