"""Converters on small source trees in the real download layouts."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from tests.volumes import GEOMETRIES
from unetrpp.data.convert import (
    ACDC_TEST_PATIENTS,
    BTCV_VAL,
    LUNG_TEST,
    SYNAPSE_TEST,
    convert_acdc,
    convert_msd,
    convert_synapse,
)
from unetrpp.data.layout import Dataset, load_splits
from unetrpp.io import read_image, write_image

BTCV_IDS = [*range(1, 11), *range(21, 41)]


def _vol(seed, shape=(4, 5, 6), dtype=np.int16):
    return np.random.default_rng(seed).integers(0, 5, shape).astype(dtype)


def test_synapse_and_btcv_from_rawdata(tmp_path):
    raw = tmp_path / "RawData"
    g = GEOMETRIES["ras"]
    for i in BTCV_IDS:
        write_image(_vol(i), g, raw / "Training" / "img" / f"img{i:04d}.nii.gz")
        write_image(_vol(i, dtype=np.uint8) % 14, g, raw / "Training" / "label" / f"label{i:04d}.nii.gz")
    for i in (61, 62):
        write_image(_vol(i), g, raw / "Testing" / "img" / f"img{i:04d}.nii.gz")
    (raw / "Training" / "img" / "._img0001.nii.gz").write_bytes(b"macOS resource fork")

    out = convert_synapse(raw, tmp_path / "synapse", "synapse")
    ds = Dataset.open(out)
    assert ds.num_training == 30 and ds.channel_names == ["CT"] and ds.num_classes == 14
    assert ds.labels["pancreas"] == 11 and ds.labels["left adrenal gland"] == 13
    assert [c.name for c in ds.test_cases()] == ["img0061", "img0062"]
    case = ds.case("img0005")
    assert case.images[0].read_bytes() == (raw / "Training" / "img" / "img0005.nii.gz").read_bytes()
    assert case.label.read_bytes() == (raw / "Training" / "label" / "label0005.nii.gz").read_bytes()
    (split,) = load_splits(out, create=False)
    assert split["val"] == sorted(SYNAPSE_TEST) and len(split["train"]) == 18
    assert split["train"][:3] == ["img0005", "img0006", "img0007"]

    out = convert_synapse(raw, tmp_path / "btcv", "btcv")
    (split,) = load_splits(out, create=False)
    assert split["val"] == BTCV_VAL and len(split["train"]) == 24


def test_synapse_refuses_wrong_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no labelNNNN"):
        convert_synapse(tmp_path / "empty", tmp_path / "out")
    write_image(_vol(0, dtype=np.uint8), GEOMETRIES["lps"], tmp_path / "x" / "label0001.nii.gz")
    with pytest.raises(ValueError, match="label without image"):
        convert_synapse(tmp_path / "x", tmp_path / "out")


def _acdc_patient(root, number, ed=1, es=9, with_gt=True):
    folder = root / f"patient{number:03d}"
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
    g = GEOMETRIES["lps"]
    write_image(_vol(number), g, folder / f"patient{number:03d}_4d.nii.gz")
    for f in (ed, es):
        write_image(_vol(number + f), g, folder / f"patient{number:03d}_frame{f:02d}.nii.gz")
        if with_gt:
            write_image(_vol(number + f, dtype=np.uint8) % 4, g, folder / f"patient{number:03d}_frame{f:02d}_gt.nii.gz")


def test_acdc(tmp_path):
    src = tmp_path / "database"
    for n in (1, 2, 3, 8, 50):
        _acdc_patient(src / "training", n, ed=1, es=9 + n % 3)
    _acdc_patient(src / "testing", 101, ed=1, es=14)
    out = convert_acdc(src, tmp_path / "acdc")
    ds = Dataset.open(out)
    names = [c.name for c in ds.training_cases()]
    assert names[:2] == ["patient001_frame01", "patient001_frame10"]
    assert len(names) == 10 and ds.labels == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert [c.name for c in ds.test_cases()] == ["patient101_frame01", "patient101_frame14"]
    assert all(c.label is not None for c in ds.test_cases())
    (split,) = load_splits(out, create=False)
    assert {int(n[7:10]) for n in split["val"]} == {2, 3, 8}
    assert {2, 3, 8} <= set(ACDC_TEST_PATIENTS)
    assert {int(n[7:10]) for n in split["train"]} == {1, 50}


def test_acdc_missing_ground_truth_is_named(tmp_path):
    _acdc_patient(tmp_path / "training", 4, with_gt=False)
    with pytest.raises(FileNotFoundError, match=r"patient004_frame01_gt\.nii\.gz"):
        convert_acdc(tmp_path, tmp_path / "out")


def _msd_task(root, names, channels, test=()):
    import SimpleITK as sitk

    g = GEOMETRIES["oblique"]
    for n in [*names, *test]:
        arr = np.stack([_vol(zlib.crc32(n.encode()) + c).astype(np.float32) for c in range(channels)])
        if channels > 1:
            img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arr])
            img.SetSpacing((*g.spacing, 1.0))
            img.SetOrigin((*g.origin, 0.0))
            d = np.eye(4)
            d[:3, :3] = g.direction_matrix
            img.SetDirection(tuple(d.ravel()))
            folder = "imagesTs" if n in test else "imagesTr"
            (root / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / folder / f"{n}.nii.gz"))
        else:
            write_image(arr[0], g, root / ("imagesTs" if n in test else "imagesTr") / f"{n}.nii.gz")
        if n not in test:
            write_image(_vol(1, dtype=np.uint8) % 3, g, root / "labelsTr" / f"{n}.nii.gz")
    modality = {str(c): m for c, m in enumerate(["FLAIR", "T1w", "t1gd", "T2w"][:channels])} if channels > 1 else {
        "0": "CT"}
    meta = {
        "name": root.name, "modality": modality,
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor"},
        "numTraining": len(names), "numTest": len(test),
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
        "test": [f"./imagesTs/{n}.nii.gz" for n in test],
    }  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_4d_is_split_into_channels(tmp_path):
    src = _msd_task(tmp_path / "Task01_BrainTumour", ["BRATS_001", "BRATS_002", "BRATS_003"], 4, test=["BRATS_485"])
    out = convert_msd(src, tmp_path / "out", workers=2)
    ds = Dataset.open(out)
    assert ds.channel_names == ["FLAIR", "T1w", "t1gd", "T2w"]
    assert ds.labels == {"background": 0, "edema": 1, "non-enhancing tumor": 2}
    case = ds.case("BRATS_002")
    src4d, g4d = read_image(src / "imagesTr" / "BRATS_002.nii.gz")
    for c in range(4):
        arr, g = read_image(case.images[c])
        np.testing.assert_array_equal(arr, src4d[c])
        assert g.matches(g4d, tol=1e-6)
    assert [c.name for c in ds.test_cases()] == ["BRATS_485"]
    assert len(ds.test_cases()[0].images) == 4 and all(p.exists() for p in ds.test_cases()[0].images)
    splits = load_splits(out, create=False)
    assert len(splits) == 3  # 5-fold CV, capped at the number of cases
    assert sorted(n for s in splits for n in s["val"]) == ["BRATS_001", "BRATS_002", "BRATS_003"]


def test_msd_lung_gets_the_papers_split(tmp_path):
    names = sorted({*LUNG_TEST, "lung_004", "lung_005"})
    src = _msd_task(tmp_path / "Task06_Lung", names, 1)
    out = convert_msd(src, tmp_path / "out")
    (split,) = load_splits(out, create=False)
    assert split == {"train": ["lung_004", "lung_005"], "val": sorted(LUNG_TEST)}
    assert Dataset.open(out).channel_names == ["CT"]


def test_msd_missing_file_is_named(tmp_path):
    src = _msd_task(tmp_path / "Task04", ["h_001", "h_002"], 1)
    (src / "labelsTr" / "h_002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"labelsTr/h_002.nii.gz"):
        convert_msd(src, tmp_path / "out")


def test_msd_dataset_json_is_refused_by_v2_reader(tmp_path):
    src = _msd_task(tmp_path / "Task04", ["h_001", "h_002"], 1)
    with pytest.raises(ValueError, match="unetrpp convert msd"):
        Dataset.open(src)
