"""Planning rules, resampling, preprocessing and its undo, on made-up and real data."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.official_fixture import SHARED, require_shared
from tests.volumes import GEOMETRIES, make_v2_dataset, plans_for
from unetrpp.cli.main import main
from unetrpp.data.layout import Dataset, load_splits
from unetrpp.data.plan import (
    load_plans,
    plan_dataset,
    plan_patch_size,
    plans_id,
    stem_stride_for,
    target_spacing_for,
)
from unetrpp.data.plans import Plans
from unetrpp.data.preprocess import (
    class_locations,
    is_done,
    load_case,
    normalize,
    preprocess_array,
    preprocess_dataset,
)
from unetrpp.data.resample import anisotropic_axis, new_shape_for, nonzero_bbox, resample_label
from unetrpp.data.restore import restore_label, restore_probabilities
from unetrpp.io import Geometry, read_image

HIPPOCAMPUS = SHARED / "data" / "hippocampus"
ABDOMEN = SHARED / "data" / "abdomen_ct"


# ---------------------------------------------------------------------- planning rules
def test_target_spacing_is_the_median():
    sp = np.array([[2.0, 0.8, 0.8], [3.0, 0.7, 0.7], [2.5, 0.9, 0.9]])
    shapes = np.array([[100, 200, 200]] * 3)
    assert target_spacing_for(sp, shapes) == pytest.approx([2.5, 0.8, 0.8])


def test_target_spacing_anisotropic_rule():
    # 5 mm slices vs 0.7 mm in plane, few slices: the z target is the 10th percentile of z spacings
    sp = np.array([[z, 0.7, 0.7] for z in (1.5, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 8.0, 8.0, 10.0)])
    shapes = np.array([[20, 300, 300]] * 10)
    t = target_spacing_for(sp, shapes)
    assert t[0] == pytest.approx(np.percentile(sp[:, 0], 10))
    assert t[1:] == pytest.approx([0.7, 0.7])
    # not anisotropic in voxels (many slices): stays the median
    assert target_spacing_for(sp, np.array([[200, 300, 300]] * 10))[0] == pytest.approx(5.5)
    # the z target never goes below the in-plane spacing
    sp2 = np.array([[z, 2.0, 2.0] for z in (0.5, 0.5, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0)])
    assert target_spacing_for(sp2, np.array([[10, 300, 300]] * 10))[0] == pytest.approx(2.0)


def test_plan_patch_size():
    # rounded up unless that pads by more than 60 %: 36 -> 32, 50 -> 64, 35 -> 32
    assert plan_patch_size((36, 50, 35), (1, 1, 1), (32, 32, 32)) == [32, 64, 32]
    assert plan_patch_size((36, 50, 35), (1, 1, 1), (16, 32, 32)) == [48, 64, 32]
    p = plan_patch_size((140, 600, 600), (2.5, 0.8, 0.8), (16, 32, 32), max_voxels=64 * 128 * 128)
    assert np.prod(p) <= 64 * 128 * 128 and all(v % d == 0 for v, d in zip(p, (16, 32, 32), strict=True))
    assert p == [48, 128, 160]  # shrunk on the physically longest axis each time: 120 x 102 x 128 mm
    assert plan_patch_size((3, 3, 3), (1, 1, 1), (16, 32, 32)) == [16, 32, 32]
    # the token budget: a cardiac cine MRI (10 x 256 x 216 at 10 x 1.56 x 1.56 mm) stays near the paper's size
    p = plan_patch_size((10, 256, 216), (10, 1.56, 1.56), (8, 32, 32), max_tokens=32768, stem_stride=(1, 4, 4))
    assert p == [16, 160, 192] and 16 * 40 * 48 <= 32768


def test_stem_stride_follows_the_spacing():
    assert stem_stride_for((1.5, 0.76, 0.76), (148, 512, 512)) == [2, 4, 4]  # Synapse: the official stem
    assert stem_stride_for((10, 1.56, 1.56), (10, 256, 216)) == [1, 4, 4]  # ACDC
    assert stem_stride_for((1, 1, 1), (138, 170, 138)) == [4, 4, 4]  # BraTS
    assert stem_stride_for((1, 1, 1), (12, 50, 50)) == [2, 4, 4]  # 12 slices: too few for 32, enough for 16
    assert stem_stride_for((1, 1, 1), (6, 50, 50)) == [1, 4, 4]  # 6 slices: 8 at most


def test_plans_round_trip_as_a_typed_object(tmp_path):
    root = make_v2_dataset(tmp_path / "mr", cases=3, channels=2)
    plans = plan_dataset(root)
    assert isinstance(plans, Plans) and plans.preset is None and plans.decisions
    again = load_plans(root)
    assert again == plans and Plans.from_dict(plans.to_dict()) == plans
    cfg = plans.network_config()
    assert list(cfg.img_size) == plans.patch_size and cfg.in_channels == 2 and cfg.out_channels == 3
    assert [s * 8 for s in cfg.stem_stride] == plans.patch_divisor
    with pytest.raises(ValueError, match=r"img_size .* differs from patch_size"):
        Plans.from_dict({**plans.to_dict(), "patch_size": [p * 2 for p in plans.patch_size]})
    with pytest.raises(ValueError, match="missing target_spacing"):
        Plans.from_dict({k: v for k, v in plans.to_dict().items() if k != "target_spacing"})
    with pytest.raises(ValueError, match="newer than this unetrpp"):
        Plans.from_dict({**plans.to_dict(), "version": 99})
    syn = plan_dataset(root, preset="synapse")
    assert syn.preset == "synapse" and syn.network_config().stem_stride == (2, 4, 4)
    assert syn.patch_size == [64, 128, 128] and syn.batch_dice


def test_plan_normalisation_schemes(tmp_path):
    root = make_v2_dataset(tmp_path / "ct", cases=3, channels=1)
    meta = (root / "dataset.json").read_text().replace('"MR0"', '"CT"')
    (root / "dataset.json").write_text(meta)
    plans = plan_dataset(root)
    (n,) = plans.normalization
    assert n["scheme"] == "ct" and n["clip"][0] < n["mean"] < n["clip"][1]
    assert all(p % d == 0 for p, d in zip(plans.patch_size, plans.patch_divisor, strict=True))
    assert plans.target_spacing == pytest.approx(GEOMETRIES["lps"].spacing_zyx)
    assert (root / "fingerprint.json").exists() and load_plans(root).num_classes == 3
    mr = make_v2_dataset(tmp_path / "mr", cases=2, channels=2)
    plans = plan_dataset(mr, patch_size=(16, 32, 32))
    assert [n["scheme"] for n in plans.normalization] == ["zscore", "zscore"]
    assert plans.patch_size == [16, 32, 32]
    with pytest.raises(ValueError, match="not divisible"):
        plan_dataset(mr, patch_size=(12, 32, 32))


def test_normalize():
    rng = np.random.default_rng(0)
    data = rng.normal(300, 50, (2, 6, 7, 8)).astype(np.float32)
    data[:, :, :, :2] = 0  # a zero border in every channel (e.g. skull-stripped MRI)
    plans = plans_for([
        {"scheme": "ct", "clip": [250.0, 350.0], "mean": 300.0, "std": 25.0},
        {"scheme": "zscore", "use_nonzero_mask": True},
    ])  # fmt: skip
    expect0 = (np.clip(data[0], 250, 350) - 300) / 25
    inside = data[1][:, :, 2:]
    expect1 = (inside - inside.mean()) / inside.std()
    out = normalize(data.copy(), plans)
    np.testing.assert_allclose(out[0], expect0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1][:, :, 2:], expect1, rtol=1e-4, atol=1e-4)
    assert (out[1][:, :, :2] == 0).all()
    with pytest.raises(ValueError, match="3 channel"):
        normalize(np.zeros((3, 2, 2, 2), np.float32), plans)


# ---------------------------------------------------------------------- resampling
def test_resample_label_never_invents_classes():
    seg = np.zeros((10, 20, 20), np.uint8)
    seg[2:5, 3:9, 3:9] = 1
    seg[5:9, 9:17, 10:18] = 3
    seg[4:6, 8:11, 8:11] = 7
    for shape in [(17, 31, 27), (5, 9, 11), (10, 20, 20)]:
        for axis in (None, 0):
            out = resample_label(seg, shape, axis)
            assert out.shape == shape and set(np.unique(out)) <= {0, 1, 3, 7}
    # up then down by an integer factor returns the original
    up = resample_label(seg, (20, 40, 40))
    np.testing.assert_array_equal(resample_label(up, seg.shape), seg)


def test_resample_helpers():
    assert new_shape_for((30, 101, 122), (3, 3, 3), (4.5, 1.8, 2.2)) == (20, 168, 166)
    assert anisotropic_axis((5.0, 0.8, 0.8)) == 0 and anisotropic_axis((2.0, 0.8, 0.8)) is None
    d = np.zeros((1, 5, 6, 7))
    d[0, 1:3, 2:5, 3] = 1
    assert nonzero_bbox(d) == ((1, 3), (2, 5), (3, 4))
    assert nonzero_bbox(np.zeros((1, 2, 2, 2))) == ((0, 2), (0, 2), (0, 2))


def test_class_locations_are_inside_their_class():
    seg = np.zeros((8, 9, 10), np.uint8)
    seg[1:4, 2:5, 3:6] = 2
    seg[5, 5, 5] = 1
    loc = class_locations(seg, seed=0, per_class=10)
    assert loc.dtype == np.int32 and loc.shape == (11, 4)
    assert (seg[loc[:, 1], loc[:, 2], loc[:, 3]] == loc[:, 0]).all()
    np.testing.assert_array_equal(loc, class_locations(seg, seed=0, per_class=10))


# ---------------------------------------------------------------------- preprocessing
def test_preprocess_dataset_skips_done_and_recovers_interrupted(tmp_path, capsys):
    root = make_v2_dataset(tmp_path / "d", cases=3)
    assert main(["preprocess", str(root)]) == 2  # no plans yet: a one-line error
    assert "run `unetrpp plan" in capsys.readouterr().err
    assert main(["plan", str(root), "--patch-size", "16", "32", "32", "--workers", "1"]) == 0
    assert len(load_splits(root, create=False)) == 3
    out = root / "preprocessed"
    s = preprocess_dataset(root, workers=2)
    assert s["processed"] == 3 and s["skipped"] == 0
    plans = load_plans(out)
    data, seg, _loc, props = load_case(out, "case_001")
    assert isinstance(data, np.memmap) and data.dtype == np.float32 and seg.dtype == np.uint8
    assert data.shape == (1, *seg.shape) and props.to_dict()["plans_id"] == plans_id(plans)
    assert abs(float(np.asarray(data).mean())) < 1e-4 and float(np.asarray(data).std()) == pytest.approx(1, abs=1e-3)
    # a case whose JSON marker is missing (interrupted after its arrays) is redone; the rest is skipped
    (out / "case_002.json").unlink()
    assert not is_done(out, "case_002", plans_id(plans))
    s = preprocess_dataset(root, workers=1)
    assert s == {"cases": 3, "processed": 1, "skipped": 2, "out": str(out)}
    assert not [f for f in os.listdir(out) if "partial" in f]
    # different plans: everything is redone
    plans.target_spacing = [5.0, 1.5, 1.6]
    assert preprocess_dataset(root, plans=plans, workers=1)["processed"] == 3


def test_preprocess_undo_on_an_oblique_anisotropic_case():
    g = GEOMETRIES["oblique"]  # 4 mm slices, 0.9 x 1.1 mm in plane
    rng = np.random.default_rng(3)
    img = rng.normal(0, 1, (14, 40, 36)).astype(np.float32)
    img[:, :3] = 0  # a zero border that the crop removes
    seg = np.zeros(img.shape, np.uint8)
    seg[3:9, 10:30, 8:28] = 1
    seg[6:12, 15:25, 12:20] = 2
    plans = plans_for([{"scheme": "zscore"}], target_spacing=(2.0, 1.0, 1.0))
    data, s, props = preprocess_array(img, g, plans, seg)
    assert props.to_dict()["bbox"] == [[0, 14], [3, 40], [0, 36]]
    assert data.shape[1:] == s.shape == (28, 41, 32)
    back = restore_label(s, props)
    assert back.shape == seg.shape
    assert (back[:, :3] == 0).all()
    assert np.mean(back == seg) > 0.97
    probs = np.stack([s == c for c in range(3)]).astype(np.float32)
    p = restore_probabilities(probs, props)
    assert p.shape == (3, *seg.shape)
    np.testing.assert_allclose(p.sum(0), 1, atol=1e-5)
    assert (p[0, :, :3] == 1).all()
    np.testing.assert_array_equal(p.argmax(0), back)


# ---------------------------------------------------------------------- real data
@pytest.mark.slow
def test_hippocampus_converts_checks_plans_preprocesses(tmp_path):
    from unetrpp.data.check import check_dataset
    from unetrpp.data.convert import convert_msd

    src = require_shared(HIPPOCAMPUS)
    out = convert_msd(src, tmp_path / "hippo", workers=2)
    ds = Dataset.open(out)
    assert ds.num_training == 260 and ds.labels == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert check_dataset(out, workers=2) == []
    plans = plan_dataset(out, workers=2)
    assert plans.target_spacing == [1.0, 1.0, 1.0]
    assert plans.normalization == [{"channel": "MRI", "scheme": "zscore", "use_nonzero_mask": False}]
    assert plans.network["stem_stride"] == [4, 4, 4]  # 1 mm isotropic: the BraTS stem
    assert plans.patch_size == [32, 64, 32]  # median (36, 50, 35) in multiples of 32, up where it pads < 60 %
    s = preprocess_dataset(out, workers=2)
    assert s["processed"] == 260
    # the two float32 label files (003, 243) come out as integer labels 0/1/2, the images z-scored
    for name in ("hippocampus_003", "hippocampus_243", "hippocampus_001"):
        data, seg, loc, props = load_case(out / "preprocessed", name)
        lab, _ = read_image(src / "labelsTr" / f"{name}.nii.gz")
        assert seg.dtype == np.uint8
        np.testing.assert_array_equal(seg, lab.astype(np.uint8))  # 1 mm already: no resampling happened
        assert set(np.unique(seg)) == {0, 1, 2} and set(np.unique(loc[:, 0])) == {1, 2}
        assert abs(float(np.mean(data))) < 1e-3 and float(np.std(data)) == pytest.approx(1, abs=1e-2)
    # an image with uint8 intensities and one with float32 intensities up to ~1e6 both end z-scored
    assert props.to_dict()["shape"] == list(lab.shape)


def _abdomen_dataset(tmp_path):
    root = require_shared(ABDOMEN)
    ds = tmp_path / "abdomen"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    shutil.copy(root / "ct.nii.gz", ds / "imagesTr" / "abd_0000.nii.gz")
    shutil.copy(root / "label_btcv13.nii.gz", ds / "labelsTr" / "abd.nii.gz")
    from unetrpp.data.convert import BTCV_LABELS
    from unetrpp.data.layout import write_dataset_json

    write_dataset_json(ds, ["CT"], BTCV_LABELS, 1)
    return ds


def test_abdominal_ct_keeps_its_geometry_through_preprocess_and_undo(tmp_path):
    ds = _abdomen_dataset(tmp_path)
    img, geometry = read_image(ds / "imagesTr" / "abd_0000.nii.gz")
    lab, _ = read_image(ds / "labelsTr" / "abd.nii.gz")
    plans = plan_dataset(ds)
    (n,) = plans.normalization
    assert n["scheme"] == "ct" and -200 < n["clip"][0] < n["mean"] < n["clip"][1] < 400  # soft-tissue HU
    assert plans.target_spacing == pytest.approx([3.0, 3.0, 3.0])
    preprocess_dataset(ds, workers=1)
    _data, seg, _, props = load_case(ds / "preprocessed", "abd")
    assert Geometry.from_json(props.to_dict()["geometry"]) == geometry
    # no resampling at 3 mm: the undo gives the labels back exactly
    np.testing.assert_array_equal(restore_label(np.asarray(seg), props), lab)
    # resampled to another grid and back: same grid as the input, labels nearly the same
    plans.target_spacing = [4.5, 1.8, 2.2]
    _data2, seg2, props2 = preprocess_array(img, geometry, plans, lab)
    assert seg2.shape == (20, 168, 166) and set(np.unique(seg2)) <= set(np.unique(lab))
    back = restore_label(seg2, props2)
    assert back.shape == lab.shape and Geometry.from_json(props2.to_dict()["geometry"]) == geometry
    assert np.mean(back == lab) > 0.99
    for organ in (1, 2, 3, 6, 7, 8):
        inter = np.sum((back == organ) & (lab == organ))
        assert 2 * inter / (np.sum(back == organ) + np.sum(lab == organ)) > 0.95
