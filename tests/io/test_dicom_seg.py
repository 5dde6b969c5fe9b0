"""``predict --dicom-seg`` and :func:`unetrpp.io.dicom_seg.write_dicom_seg`: SEG and NIfTI agree voxel for voxel."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from tests.volumes import rotation  # noqa: E402
from unetrpp.checkpoint import save_checkpoint  # noqa: E402
from unetrpp.cli.main import main  # noqa: E402
from unetrpp.inference.predictor import Predictor  # noqa: E402
from unetrpp.io import Geometry, ImageWriteError, read_image, write_image  # noqa: E402
from unetrpp.io.dicom_seg import write_dicom_seg  # noqa: E402
from unetrpp.network.presets import create_model  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "unused": 5}
PATCH = (16, 32, 32)


def write_series(folder, volume, rot, origin, spacing=(1.0, 1.0, 2.0), seed=0):
    """A CT series of ``volume`` (created slice k, rows, columns) with pydicom: rows along ``rot[:, 0]``,
    columns down ``rot[:, 1]``, and slice k at ``origin - k * dz * rot[:, 2]`` (against the normal, so
    readers that sort by position reverse the created order). Files are written in shuffled order
    under names unrelated to the position. Returns the SOP Instance UIDs in created order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    col_sp, row_sp, dz = spacing
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    uids = [generate_uid() for _ in volume]
    for n, k in enumerate(rng.permutation(len(volume))):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT, uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT, uids[k]
        ds.Modality, ds.Manufacturer = "CT", "test"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^SEG", "P1", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, int(k) + 1
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*rot[:, 0], *rot[:, 1])]
        ds.ImagePositionPatient = [f"{v:.10f}" for v in np.asarray(origin) - k * dz * rot[:, 2]]
        ds.PixelSpacing = [row_sp, col_sp]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (volume[k].astype(np.int16) + 1024).astype("<i2").tobytes()
        name = folder / f"img{(n * 7919) % 1000:03d}"
        try:
            ds.save_as(name, enforce_file_format=True)  # pydicom 3
        except TypeError:
            ds.save_as(name, write_like_original=False)  # pydicom 2.4
    return uids


def make_series(folder, shape=(12, 32, 40), seed=0, angles=(14.0, -9.0, 31.0)):
    rng = np.random.default_rng(seed)
    volume = rng.normal(40, 60, shape).astype(np.int16)
    uids = write_series(folder, volume, rotation(*angles), (-20.5, 13.25, 80.0), seed=seed)
    return volume, uids


def asymmetric_labels(shape):
    """Labels 1, 2, 3 as off-centre boxes of different sizes, and empty slices at both ends."""
    z, y, x = np.indices(shape)
    label = np.zeros(shape, np.uint8)
    label[(z >= 2) & (z < 7) & (y < 9) & (x >= 3) & (x < 30)] = 1
    label[(z >= 4) & (z < 10) & (y >= 20) & (x < 11)] = 2
    label[(z == 5) & (y >= 12) & (y < 14) & (x >= 33)] = 3
    return label


def seg_volume(path, uids):
    """The SEG at ``path`` as a label map in the order of ``uids``, values from the segment labels."""
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    numbers = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    lut = np.zeros(len(seg.SegmentSequence) + 1, np.int64)
    for item in seg.SegmentSequence:
        lut[item.SegmentNumber] = LABELS[item.SegmentLabel]
    return lut[numbers], seg


def _checkpoint(path):
    torch.manual_seed(0)
    model = create_model("synapse", img_size=PATCH, feature_size=8, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1),
                         proj_size=16, decoder_proj_size=16, out_channels=3).eval()
    model.deep_supervision = False
    plans = {"target_spacing": [2.0, 1.0, 1.0], "patch_size": list(PATCH), "channel_names": ["CT"],
             "labels": {"background": 0, "liver": 1, "spleen": 2}, "num_classes": 3,
             "normalization": [{"channel": "CT", "scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0, "std": 80.0}],
             "resampling": {"image_order": 3, "label_order": 1, "anisotropy_threshold": 3,
                            "low_resolution_axis_order": 0}}  # fmt: skip
    save_checkpoint({"model_config": model.config.to_dict(), "plans": plans, "labels": plans["labels"],
                     "state_dict": model.state_dict()}, path)
    return path


def test_write_dicom_seg_matches_the_label_map_voxel_for_voxel(tmp_path):
    volume, uids = make_series(tmp_path / "series")
    image, geometry = read_image(tmp_path / "series")
    np.testing.assert_array_equal(image, volume[::-1])  # the reader sorts by position: created order reversed
    label = asymmetric_labels(image.shape)
    out = write_dicom_seg(label, tmp_path / "series", tmp_path / "seg.dcm", LABELS)
    assert out == tmp_path / "seg.dcm" and not [f for f in tmp_path.iterdir() if f.name.startswith(".")]
    back, seg = seg_volume(out, uids[::-1])
    np.testing.assert_array_equal(back, label)
    # one segment per present label, in value order; no frame for an empty slice or another label's slice
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "kidney"]
    assert int(seg.NumberOfFrames) == 5 + 6 + 1
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "unetrpp"
    assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Tissue"
    assert seg.Manufacturer == "unetrpp" and seg.SoftwareVersions
    src = pydicom.dcmread(next((tmp_path / "series").iterdir()))
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)

    # the same voxels on a grid with x flipped, or with x and y swapped, give the same SEG pixels
    d, sp, o = geometry.direction_matrix, np.asarray(geometry.spacing), np.asarray(geometry.origin)
    _, ny, nx = label.shape
    flipped = Geometry(sp, o + d[:, 0] * sp[0] * (nx - 1), (d * [-1, 1, 1]).ravel())
    write_dicom_seg(label[:, :, ::-1].copy(), tmp_path / "series", tmp_path / "flip.dcm", LABELS, flipped)
    np.testing.assert_array_equal(seg_volume(tmp_path / "flip.dcm", uids[::-1])[0], label)
    flipped = Geometry(sp, o + d[:, :2] @ (sp[:2] * [nx - 1, ny - 1]), (d * [-1, -1, 1]).ravel())
    write_dicom_seg(label[:, ::-1, ::-1].copy(), tmp_path / "series", tmp_path / "flip2.dcm", LABELS, flipped)
    np.testing.assert_array_equal(seg_volume(tmp_path / "flip2.dcm", uids[::-1])[0], label)
    swapped = Geometry(sp[[1, 0, 2]], o, d[:, [1, 0, 2]].ravel())
    write_dicom_seg(label.transpose(0, 2, 1).copy(), tmp_path / "series", tmp_path / "swap.dcm", LABELS, swapped)
    np.testing.assert_array_equal(seg_volume(tmp_path / "swap.dcm", uids[::-1])[0], label)
    # a grid the series does not lie on is refused in one line, and nothing is written
    shifted = Geometry(sp, o + d[:, 1] * sp[1] * 0.5, geometry.direction)
    with pytest.raises(ImageWriteError, match="does not fit the series"):
        write_dicom_seg(label, tmp_path / "series", tmp_path / "bad.dcm", LABELS, shifted)
    with pytest.raises(ImageWriteError, match="slices"):
        write_dicom_seg(label[1:], tmp_path / "series", tmp_path / "bad.dcm", LABELS, geometry)
    assert not (tmp_path / "bad.dcm").exists()


def test_empty_and_declared_segments(tmp_path):
    _, uids = make_series(tmp_path / "series", shape=(4, 16, 12), seed=1)
    label = np.zeros((4, 16, 12), np.uint8)
    seg = hd.seg.segread(write_dicom_seg(label, tmp_path / "series", tmp_path / "empty.dcm", LABELS))
    # nothing found: every declared label, one empty frame each, on one source slice
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "kidney", "unused"]
    assert int(seg.NumberOfFrames) == 4 and not seg.pixel_array.any()
    label[1, 2:5, 3] = 2
    seg = hd.seg.segread(write_dicom_seg(label, tmp_path / "series", tmp_path / "all.dcm", LABELS, include_empty=True))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "kidney", "unused"]
    assert int(seg.NumberOfFrames) == 1
    back, _ = seg_volume(tmp_path / "all.dcm", uids[::-1])
    np.testing.assert_array_equal(back, label)


def test_predict_dicom_seg_matches_the_nifti(tmp_path, capsys):
    make_series(tmp_path / "series")
    ckpt = _checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(tmp_path / "series"), "-o", str(out), "-m", str(ckpt), "--no-tta",
                 "--dicom-seg"]) == 0
    label, g = read_image(out / "series.nii.gz")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in (tmp_path / "series").iterdir()]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    # the source instances in the NIfTI's slice order, from their positions in its geometry
    k = [round(float((np.asarray(ds.ImagePositionPatient, float) - g.origin) @ g.direction_matrix[:, 2]
                     / g.spacing[2])) for ds in datasets]
    assert sorted(k) == list(range(label.shape[0])) and np.allclose(g.direction_matrix[:, 2], normal, atol=1e-6)
    uids = [ds.SOPInstanceUID for _, ds in sorted(zip(k, datasets, strict=True), key=lambda t: t[0])]
    if label.any():
        np.testing.assert_array_equal(seg_volume(out / "series.dcm", uids)[0], label)
    else:
        assert not hd.seg.segread(out / "series.dcm").pixel_array.any()


def test_predict_dicom_seg_case_by_case_with_several_labels(tmp_path, monkeypatch, capsys):
    _, uids_a = make_series(tmp_path / "cases" / "a", seed=2)
    _, uids_b = make_series(tmp_path / "cases" / "b", shape=(9, 32, 40), seed=3, angles=(180.0, 20.0, -40.0))
    ckpt = _checkpoint(tmp_path / "m.pt")
    real = Predictor.predict

    def predict(self, *args, **kwargs):  # several labels, whatever the tiny network says
        result = real(self, *args, **kwargs)
        return dataclasses.replace(result, label=asymmetric_labels(result.label.shape) % 3)

    monkeypatch.setattr(Predictor, "predict", predict)
    argv = ["predict", "-i", str(tmp_path / "cases"), "-o", str(tmp_path / "out"), "-m", str(ckpt), "--no-tta",
            "--dicom-seg"]
    assert main(argv) == 0
    for case, uids in (("a", uids_a), ("b", uids_b)):
        label, _ = read_image(tmp_path / "out" / f"{case}.nii.gz")
        assert set(np.unique(label)) == {0, 1, 2}
        np.testing.assert_array_equal(seg_volume(tmp_path / "out" / f"{case}.dcm", uids[::-1])[0], label)
    # a case is done only when its .dcm exists
    (tmp_path / "out" / "b.dcm").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert "predicted 1 case(s)" in capsys.readouterr().out and (tmp_path / "out" / "b.dcm").exists()


def test_dicom_seg_errors_are_one_line(tmp_path, monkeypatch, capsys):
    write_image(np.zeros((4, 8, 8), np.int16), Geometry.identity(), tmp_path / "in" / "ct.nii.gz")
    missing_model = str(tmp_path / "no-such-model.pt")  # the input is refused before the model is loaded
    for inp in (tmp_path / "in" / "ct.nii.gz", tmp_path / "in"):
        assert main(["predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m", missing_model, "--dicom-seg"]) == 2
        err = capsys.readouterr().err
        assert f"--dicom-seg needs DICOM input; {tmp_path / 'in' / 'ct.nii.gz'} is a NIfTI file" in err
        assert err.count("\n") == 1
    make_series(tmp_path / "series", shape=(3, 8, 8))
    monkeypatch.setitem(sys.modules, "highdicom", None)
    assert main(["predict", "-i", str(tmp_path / "series"), "-o", str(tmp_path / "o"), "-m", missing_model,
                 "--dicom-seg"]) == 2
    err = capsys.readouterr().err
    assert "unetrpp[dicom]" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
