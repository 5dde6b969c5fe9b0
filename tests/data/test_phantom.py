"""The synthetic abdominal CT: deterministic, CT-like, anatomically placed, not separable by intensity."""

from __future__ import annotations

import numpy as np
import pytest

from unetrpp.cli.main import main
from unetrpp.data.check import check_dataset
from unetrpp.data.layout import Dataset, load_splits
from unetrpp.data.phantom import PHANTOM_ORGANS, make_phantom_case
from unetrpp.io import read_image


@pytest.fixture(scope="module")
def cases():
    return [make_phantom_case((7, i)) for i in range(3)]


def test_deterministic_for_a_seed(cases):
    img, lab, g = make_phantom_case((7, 0))
    np.testing.assert_array_equal(img, cases[0][0])
    np.testing.assert_array_equal(lab, cases[0][1])
    assert g == cases[0][2]
    assert not np.array_equal(cases[1][1].shape, cases[0][1].shape) or not np.array_equal(cases[1][1], cases[0][1])


def test_ct_like_intensities_and_spacing(cases):
    for img, lab, g in cases:
        assert img.dtype == np.int16 and lab.dtype == np.uint8
        assert set(np.unique(lab)) == {0, *PHANTOM_ORGANS.values()}
        sx, sy, sz = g.spacing
        assert 2.0 <= sx == sy <= 3.0 and 4.0 <= sz <= 6.0  # anisotropic
        assert np.median(img[(lab == 0)][:1000]) < -900  # air outside the body (first voxels are a corner)
        fat = img[(lab == 0) & (img > -300) & (img < -30)]
        assert -130 < np.median(fat) < -60
        assert 100 < np.mean(img[lab == 8]) < 230  # contrast-enhanced aorta


def test_organs_sit_where_they_belong(cases):
    for _img, lab, g in cases:
        _z, _y, _x = lab.shape
        centre = {}
        for name, v in PHANTOM_ORGANS.items():
            idx = np.argwhere(lab == v)
            assert len(idx) > 100, name
            centre[name] = (idx.mean(0) - (np.array(lab.shape) - 1) / 2) * np.array(g.spacing_zyx)  # mm, z y x
        # patient right is -x (LPS): liver and right kidney on the right, spleen and left kidney on the left
        assert centre["liver"][2] < -20 and centre["right kidney"][2] < -20
        assert centre["spleen"][2] > 40 and centre["left kidney"][2] > 20
        # kidneys and spleen posterior (+y) to the stomach and gallbladder
        assert centre["right kidney"][1] > centre["gallbladder"][1] + 40
        assert centre["spleen"][1] > centre["stomach"][1] + 30
        # liver volume 1-2.5 litres, spleen 50-400 ml
        voxel_ml = np.prod(g.spacing) / 1000
        assert 900 < np.sum(lab == 6) * voxel_ml < 2500
        assert 50 < np.sum(lab == 1) * voxel_ml < 400


def test_not_separable_by_intensity(cases):
    """Spleen, kidneys, liver and pancreas lie within tens of HU of each other and of unlabelled tissue."""
    img, lab, _ = cases[0]
    means = {v: float(np.mean(img[lab == v])) for v in (1, 2, 3, 6, 11)}
    assert max(means.values()) - min(means.values()) < 60
    # the best single intensity threshold cannot tell the liver from the spleen
    liver, spleen = img[lab == 6].astype(float), img[lab == 1].astype(float)
    best = max(np.mean(liver > t) / 2 + np.mean(spleen <= t) / 2 for t in np.arange(-50, 150))
    assert best < 0.85
    # unlabelled soft tissue (bowel, muscle) in the same range as the organs
    soft = img[(lab == 0) & (img > 0) & (img < 100)]
    assert soft.size > 0.5 * np.sum(lab == 6)


def test_phantom_command_writes_a_checked_dataset(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--cases", "4", "--test", "1", "--seed", "3", "--workers", "2"]) == 0
    assert "4 training + 1 test" in capsys.readouterr().out
    ds = Dataset.open(out)
    assert ds.num_training == 4 and ds.num_classes == 14 and ds.labels["pancreas"] == 11
    assert [c.name for c in ds.test_cases()] == ["phantom_004"]
    assert ds.test_cases()[0].label.exists()
    assert check_dataset(out) == []
    assert sum(len(s["val"]) for s in load_splits(out, create=False)) == 4
    img, g = read_image(ds.training_cases()[1].images[0])
    ref_img, _, ref_g = make_phantom_case((3, 1))
    np.testing.assert_array_equal(img, ref_img)
    assert g.matches(ref_g, tol=1e-5)
    assert main(["phantom", str(tmp_path / "x"), "--cases", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_contrast_phase_separates_organs_by_enhancement():
    img, lab, _ = make_phantom_case((7, 0), contrast=True)
    assert set(np.unique(lab)) == {0, *PHANTOM_ORGANS.values()}
    means = {v: float(np.mean(img[lab == v])) for v in (1, 2, 3, 6, 11)}
    assert means[2] > means[1] + 20 and means[3] > means[6] + 40  # kidneys brightest of the parenchyma
    assert means[1] > means[6] > means[11]  # spleen above liver above pancreas, as in portal-venous CT
    plain, plain_lab, _ = make_phantom_case((7, 0))
    assert np.mean(img[lab == 2]) > np.mean(plain[plain_lab == 2]) + 80
