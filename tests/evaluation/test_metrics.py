"""Metrics against independent references (medpy, brute force) and the empty-mask policy."""

import json
import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage
from scipy.spatial.distance import cdist

from unetrpp.cli.main import main
from unetrpp.evaluation import compare_masks, dice_score, evaluate_pairs, hd95, protocol_regions
from unetrpp.io import Geometry, write_image

SPACING = (3.0, 0.8, 1.25)


def _blob(rng, shape, n=3):
    m = np.zeros(shape, bool)
    for _ in range(n):
        c = rng.uniform(4, np.array(shape) - 4)
        r = rng.uniform(2, 5, 3)
        z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
        m |= ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
    return m


def _brute_hd95(a, b, spacing):
    """All-pairs distances between the two surfaces (face-connected erosion), pooled 95th percentile."""
    def surface(m):
        inner = m.copy()
        padded = np.pad(m, 1)
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = cdist(sa, sb)
    return float(np.percentile(np.hstack((d.min(1), d.min(0))), 95))


@pytest.mark.parametrize("seed", range(6))
def test_dice_and_hd95_match_references_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (14, 30, 26)
    a, b = _blob(rng, shape), _blob(rng, shape)
    a[0, 5:9, 5:9] = True  # touches the array border: surfaces there must still count
    inter = np.logical_and(a, b).sum()
    assert dice_score(a, b) == 2 * inter / (a.sum() + b.sum())
    assert dice_score(a, b) == pytest.approx(medpy_binary.dc(a, b), abs=1e-12)
    ours = hd95(a, b, SPACING)
    assert ours == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=SPACING), abs=1e-6)
    assert ours == pytest.approx(_brute_hd95(a, b, SPACING), abs=1e-6)
    # official compatibility: voxel units, as the official scripts call medpy without spacing
    off = compare_masks(a, b, SPACING, official=True)
    assert off.hd95 == pytest.approx(medpy_binary.hd95(a, b), abs=1e-6)
    assert off.hd95 != pytest.approx(ours)


def test_hd95_of_shifted_cube_is_the_shift_in_mm():
    a = np.zeros((20, 20, 20), bool)
    a[5:12, 5:12, 5:12] = True
    b = np.roll(a, 2, axis=0)
    # every surface point of the shifted cube's top/bottom face is 2 slices away; pooled 95th pct = 2 * 3 mm
    assert hd95(a, b, SPACING) == pytest.approx(6.0)
    assert dice_score(a, a) == 1.0


def test_normalized_surface_dice():
    a = np.zeros((20, 20, 20), bool)
    a[5:12, 5:12, 5:12] = True
    b = np.roll(a, 1, axis=2)  # 1.25 mm shift along x
    assert compare_masks(a, b, SPACING, nsd_tolerance=1.3).nsd == 1.0
    nsd = compare_masks(a, b, SPACING, nsd_tolerance=1.0).nsd
    assert 0.5 < nsd < 1.0  # the faces normal to x move by 1.25 mm > tolerance; the others move by 0


def test_empty_mask_policy():
    full = np.zeros((8, 8, 8), bool)
    full[2:5, 2:5, 2:5] = True
    empty = np.zeros_like(full)
    both = compare_masks(empty, empty, SPACING)
    assert both.status == "both_empty" and math.isnan(both.dice) and math.isnan(both.hd95)
    missed = compare_masks(empty, full, SPACING)
    assert missed.status == "pred_empty" and missed.dice == 0.0 and math.isnan(missed.hd95)
    extra = compare_masks(full, empty, SPACING)
    assert extra.status == "gt_empty" and extra.dice == 0.0 and math.isnan(extra.hd95)
    # the official scripts: Dice 1 when both empty, HD95 0 when either is empty
    assert compare_masks(empty, empty, SPACING, official=True).dice == 1.0
    assert compare_masks(empty, full, SPACING, official=True).hd95 == 0.0
    assert compare_masks(empty, full, SPACING, official=True).dice == 0.0


def test_protocols():
    assert protocol_regions("brats") == {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}
    assert list(protocol_regions("synapse8").values()) == [[1], [2], [3], [4], [6], [7], [8], [11]]
    assert protocol_regions("labels", {"background": 0, "a": 2, "b": 1}) == {"b": [1], "a": [2]}
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_regions("nope")


def _write_pair(tmp_path, name, gt, pred, geometry):
    write_image(gt.astype(np.uint8), geometry, tmp_path / "gt" / f"{name}.nii.gz")
    write_image(pred.astype(np.uint8), geometry, tmp_path / "pred" / f"{name}.nii.gz")


def test_evaluate_cli_brats_regions_and_missing_hd95(tmp_path, capsys):
    geometry = Geometry.identity(SPACING)
    rng = np.random.default_rng(3)
    gt = np.zeros((12, 24, 24), np.uint8)
    gt[_blob(rng, gt.shape)] = 1
    gt[3:7, 8:14, 8:14] = 2
    gt[4:6, 10:12, 10:12] = 3
    pred = ndimage.shift(gt, (0, 1, 0), order=0)
    _write_pair(tmp_path, "c1", gt, pred, geometry)
    pred2 = gt.copy()
    pred2[pred2 == 3] = 2  # enhancing tumour missed entirely
    _write_pair(tmp_path, "c2", gt, pred2, geometry)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tmp_path / "gt"), str(tmp_path / "pred"), "--protocol", "brats",
                 "-o", str(out)]) == 0
    s = json.loads(out.read_text())
    et = s["mean"]["ET"]
    assert et["hd95_missing"] == 1 and et["cases"] == 2
    c2 = next(c for c in s["cases"] if c["case"] == "c2")["regions"]
    assert c2["ET"]["dice"] == 0.0 and c2["ET"]["hd95"] is None and c2["WT"]["dice"] == 1.0
    wt = (gt > 0)
    expected = compare_masks(pred > 0, wt, SPACING).dice
    c1 = next(c for c in s["cases"] if c["case"] == "c1")["regions"]
    assert c1["WT"]["dice"] == pytest.approx(expected)
    assert (tmp_path / "eval.csv").read_text().count("\n") == 1 + 2 * 3
    assert "ET" in capsys.readouterr().out


def test_evaluate_cli_refuses_mismatched_geometry(tmp_path, capsys):
    gt = np.zeros((6, 8, 8), np.uint8)
    gt[2:4, 2:5, 2:5] = 1
    write_image(gt, Geometry.identity(SPACING), tmp_path / "gt" / "a.nii.gz")
    write_image(gt, Geometry.identity((3.0, 0.8, 2.0)), tmp_path / "pred" / "a.nii.gz")
    assert main(["evaluate", str(tmp_path / "gt"), str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert "a.nii.gz" in err and "geometry" in err and "Traceback" not in err


def test_evaluate_pairs_official_compat_mean_counts_empty_as_perfect(tmp_path):
    geometry = Geometry.identity(SPACING)
    gt = np.zeros((6, 10, 10), np.uint8)
    gt[1:4, 2:6, 2:6] = 1
    _write_pair(tmp_path, "a", gt, gt, geometry)
    pairs = [("a", tmp_path / "gt" / "a.nii.gz", tmp_path / "pred" / "a.nii.gz")]
    regions = {"one": [1], "two": [2]}
    ours = evaluate_pairs(pairs, regions)
    official = evaluate_pairs(pairs, regions, official=True)
    assert math.isnan(ours["mean"]["two"]["dice"]) and ours["mean"]["two"]["both_empty"] == 1
    assert ours["mean_dice"] == 1.0  # NaN region excluded
    assert official["mean"]["two"]["dice"] == 1.0 and official["mean"]["two"]["hd95"] == 0.0
