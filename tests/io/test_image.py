"""Volume I/O: geometry round trips through every format, DICOM series, one-line errors, atomic writes."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from tests.volumes import GEOMETRIES, rotation, write_dicom_series
from unetrpp.io import Geometry, ImageReadError, ImageWriteError, read_case, read_image, split_ending, write_image

FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _volume(dtype=np.int16, shape=(7, 9, 11)):
    return (np.arange(np.prod(shape)) % 251 - 100).reshape(shape).astype(dtype)


@pytest.mark.parametrize("ending", FORMATS)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_round_trip(tmp_path, ending, name):
    g = GEOMETRIES[name]
    vol = _volume()
    path = write_image(vol, g, tmp_path / f"v{ending}")
    back, g2 = read_image(path)
    np.testing.assert_array_equal(back, vol)
    assert back.dtype == vol.dtype
    # NIfTI keeps geometry as float32 (and the direction as a quaternion): exact to float32 precision
    tol = 1e-5 if ending.startswith(".nii") else 1e-12
    np.testing.assert_allclose(g2.spacing, g.spacing, rtol=tol)
    np.testing.assert_allclose(g2.origin, g.origin, atol=tol * 200)
    np.testing.assert_allclose(g2.direction, g.direction, atol=tol)


def test_spacing_zyx_is_reverse_of_itk_order():
    g = GEOMETRIES["lps"]
    assert g.spacing_zyx == (2.5, 0.75, 0.8)
    assert Geometry.identity((3.0, 2.0, 1.0)).spacing == (1.0, 2.0, 3.0)


def test_shifted_origin_follows_direction():
    g = GEOMETRIES["oblique"]
    crop = g.shifted((2, 3, 4))  # z, y, x voxels
    expect = np.asarray(g.origin) + g.direction_matrix @ (np.array([4, 3, 2]) * np.asarray(g.spacing))
    np.testing.assert_allclose(crop.origin, expect)


@pytest.mark.parametrize("name", ["lps", "oblique"])
def test_dicom_series_read(tmp_path, name):
    g = GEOMETRIES[name]
    vol = _volume(shape=(6, 10, 8)) * 7
    folder = write_dicom_series(vol, g, tmp_path / "series")
    back, g2 = read_image(folder)
    np.testing.assert_array_equal(back, vol)
    np.testing.assert_allclose(g2.spacing, g.spacing, rtol=1e-6)
    np.testing.assert_allclose(g2.origin, g.origin, atol=1e-6)
    np.testing.assert_allclose(g2.direction, g.direction, atol=1e-6)


def test_dicom_folder_with_two_series_is_refused(tmp_path):
    g = GEOMETRIES["lps"]
    write_dicom_series(_volume(shape=(3, 4, 4)), g, tmp_path / "d", series_uid="1.2.3.4.1")
    write_dicom_series(_volume(shape=(3, 4, 4)), g, tmp_path / "d", series_uid="1.2.3.4.2")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_image(tmp_path / "d")


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(ImageReadError, match="no DICOM series") as e:
        read_image(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_file_is_one_line_error(tmp_path):
    path = write_image(_volume(shape=(20, 30, 30)), GEOMETRIES["lps"], tmp_path / "v.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_not_an_image(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_bytes(gzip.compress(b"hello, not a nifti"))
    with pytest.raises(ImageReadError, match=r"x\.nii\.gz"):
        read_image(p)
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match="unknown file type"):
        read_image(png)
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")


def test_2d_image_refused(tmp_path):
    import SimpleITK as sitk

    p = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 5), np.int16)), str(p))
    with pytest.raises(ImageReadError, match="is 2D"):
        read_image(p)


def test_4d_file_reads_as_channels(tmp_path):
    import SimpleITK as sitk

    arr = np.stack([_volume() + i for i in range(3)])  # (c, z, y, x)
    img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arr])
    p = tmp_path / "multi.nii.gz"
    sitk.WriteImage(img, str(p))
    back, _ = read_image(p)
    np.testing.assert_array_equal(back, arr)


def test_read_case_checks_channels(tmp_path):
    g = GEOMETRIES["lps"]
    a = write_image(_volume(), g, tmp_path / "c_0000.nii.gz")
    b = write_image(_volume() * 2, g, tmp_path / "c_0001.nii.gz")
    data, g2 = read_case([a, b])
    assert data.shape == (2, 7, 9, 11)
    assert g2.matches(g)
    moved = Geometry(g.spacing, (0.0, 0.0, 0.0), g.direction)
    c = write_image(_volume(), moved, tmp_path / "c_0002.nii.gz")
    with pytest.raises(ImageReadError, match=r"c_0002\.nii\.gz: geometry differs"):
        read_case([a, c])
    d = write_image(_volume(shape=(7, 9, 10)), g, tmp_path / "c_0003.nii.gz")
    with pytest.raises(ImageReadError, match="shape"):
        read_case([a, d])


def test_write_is_atomic(tmp_path, monkeypatch):
    import SimpleITK as sitk

    g = GEOMETRIES["lps"]
    target = write_image(_volume(), g, tmp_path / "v.nii.gz")
    before = target.read_bytes()

    def broken(image, path, *a):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(ImageWriteError, match="disk full"):
        write_image(_volume() + 1, g, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["v.nii.gz"]  # and no temporary is left


def test_write_refuses_bad_input(tmp_path):
    g = GEOMETRIES["lps"]
    with pytest.raises(ImageWriteError, match="3D"):
        write_image(np.zeros((2, 3)), g, tmp_path / "a.nii.gz")
    with pytest.raises(ImageWriteError, match="unknown file type"):
        write_image(np.zeros((2, 3, 4)), g, tmp_path / "a.png")
    with pytest.raises(ImageWriteError, match="dtype"):
        write_image(np.zeros((2, 3, 4), np.complex64), g, tmp_path / "a.nii.gz")


def test_split_ending():
    assert split_ending("a/b/case_0000.nii.gz") == ("a/b/case_0000", ".nii.gz")
    assert split_ending("x.MHA") == ("x", ".MHA")
    assert split_ending("folder") == ("folder", "")


def test_geometry_mismatch_messages():
    g = GEOMETRIES["lps"]
    assert g.mismatch(g) is None
    assert "spacing" in g.mismatch(Geometry((1, 1, 1), g.origin, g.direction))
    assert "origin" in g.mismatch(Geometry(g.spacing, (0, 0, 0), g.direction))
    assert "direction" in g.mismatch(Geometry(g.spacing, g.origin, tuple(rotation(0, 0, 10).ravel())))
    with pytest.raises(ValueError, match="positive"):
        Geometry((0, 1, 1), (0, 0, 0), tuple(np.eye(3).ravel()))
