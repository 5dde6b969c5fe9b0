"""``check`` reports every problem, each with its case."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tests.volumes import GEOMETRIES, make_v2_dataset
from unetrpp.cli.main import main
from unetrpp.data.check import check_dataset
from unetrpp.io import Geometry, read_image, write_image


@pytest.fixture
def dataset(tmp_path):
    return make_v2_dataset(tmp_path / "ds", cases=3, channels=2)


def _rewrite(path, fn):
    arr, g = read_image(path)
    arr, g = fn(arr, g)
    write_image(arr, g, path)


def test_clean_dataset_has_no_problems(dataset):
    assert check_dataset(dataset) == []
    assert check_dataset(dataset, workers=2) == []


def _missing_image(root):
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    return "case_001", "missing image file case_001_0001.nii.gz"


def _missing_label(root):
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    return "case_002", "missing label file"


def _extra_file(root):
    (root / "imagesTr" / "notes.txt").write_text("x")
    return "notes.txt", "unexpected file"


def _badly_named(root):
    write_image(np.zeros((2, 2, 2), np.int16), GEOMETRIES["lps"], root / "imagesTr" / "loose.nii.gz")
    return "loose", "must end in _XXXX"


def _channel_count(root):
    write_image(np.zeros((12, 16, 14), np.float32), GEOMETRIES["lps"], root / "imagesTr" / "case_000_0002.nii.gz")
    return "case_000", "channel count mismatch"


def _shape_mismatch(root):
    _rewrite(root / "labelsTr" / "case_001.nii.gz", lambda a, g: (a[:, :, :-1], g))
    return "case_001", "label shape (12, 16, 13) differs from image shape (12, 16, 14)"


def _channel_shape_mismatch(root):
    _rewrite(root / "imagesTr" / "case_001_0001.nii.gz", lambda a, g: (a[1:], g))
    return "case_001", "case_001_0001.nii.gz shape"


def _geometry_mismatch(root):
    _rewrite(root / "labelsTr" / "case_000.nii.gz", lambda a, g: (a, Geometry(g.spacing, (0.0, 0.0, 0.0), g.direction)))
    return "case_000", "label geometry differs from image: origin"


def _spacing_mismatch(root):
    _rewrite(root / "imagesTr" / "case_002_0001.nii.gz",
             lambda a, g: (a, Geometry((1.0, 1.0, 1.0), g.origin, g.direction)))  # fmt: skip
    return "case_002", "case_002_0001.nii.gz geometry differs from case_002_0000.nii.gz: spacing"


def _undeclared_label(root):
    _rewrite(root / "labelsTr" / "case_002.nii.gz", lambda a, g: (np.where(a == 2, 7, a).astype(a.dtype), g))
    return "case_002", "values [7] not declared"


def _nan(root):
    def f(a, g):
        a = a.copy()
        a[0, 0, 0] = np.nan
        a[1, 1, 1] = np.inf
        return a, g

    _rewrite(root / "imagesTr" / "case_000_0000.nii.gz", f)
    return "case_000", "2 NaN/inf voxels"


def _non_integer_label(root):
    _rewrite(root / "labelsTr" / "case_001.nii.gz", lambda a, g: (a.astype(np.float32) * 0.5, g))
    return "case_001", "non-integer values"


def _four_d(root):
    import SimpleITK as sitk

    img = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((12, 16, 14), np.float32))] * 2)
    sitk.WriteImage(img, str(root / "imagesTr" / "case_001_0000.nii.gz"))
    return "case_001", "case_001_0000.nii.gz is 4D"


def _two_d(root):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 14), np.uint8)), str(root / "labelsTr" / "case_000.nii.gz"))
    return "case_000", "unreadable label case_000.nii.gz: is 2D"


def _truncated(root):
    p = root / "imagesTr" / "case_002_0000.nii.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) - 500]))
    return "case_002", "unreadable image case_002_0000.nii.gz: truncated"


def _garbage(root):
    (root / "labelsTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return "case_001", "unreadable label case_001.nii.gz"


def _num_training(root):
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = 5
    (root / "dataset.json").write_text(json.dumps(meta))
    return "dataset", "numTraining is 5 but 3 training cases were found"


PROBLEMS = [_missing_image, _missing_label, _extra_file, _badly_named, _channel_count, _shape_mismatch,
            _channel_shape_mismatch, _geometry_mismatch, _spacing_mismatch, _undeclared_label, _nan,
            _non_integer_label, _four_d, _two_d, _truncated, _garbage, _num_training]  # fmt: skip


@pytest.mark.parametrize("corrupt", PROBLEMS, ids=lambda f: f.__name__.strip("_"))
def test_each_problem_is_reported_with_its_case(dataset, corrupt):
    case, text = corrupt(dataset)
    problems = check_dataset(dataset)
    assert any(p.case == case and text in p.message for p in problems), problems
    assert all("\n" not in str(p) for p in problems)


def test_all_problems_at_once(dataset, capsys):
    expected = [f(dataset) for f in (_missing_label, _non_integer_label, _nan, _geometry_mismatch, _extra_file)]
    problems = check_dataset(dataset, workers=2)
    for case, text in expected:
        assert any(p.case == case and text in p.message for p in problems), (case, text, problems)
    assert main(["check", str(dataset)]) == 1
    out = capsys.readouterr()
    assert "case_000: " in out.out and "problem(s)" in out.err


def test_bad_dataset_json(tmp_path):
    root = make_v2_dataset(tmp_path / "d", cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    del meta["file_ending"]
    meta["labels"] = {"background": 0, "x": "one"}
    (root / "dataset.json").write_text(json.dumps(meta))
    problems = check_dataset(root)
    assert [p.case for p in problems] == ["dataset"]
    assert "missing key 'file_ending'" in problems[0].message
    (root / "dataset.json").write_text("{not json")
    assert "not valid JSON" in check_dataset(root)[0].message
