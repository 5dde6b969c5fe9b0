"""io.atomic.atomic_path: the one way the package writes a file or a folder."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

from unetrpp.io.atomic import atomic_path
from unetrpp.io.jsonio import atomic_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_the_block_writes_a_temporary_name_that_takes_the_final_one(tmp_path):
    target = tmp_path / "sub" / "plans.json"
    with atomic_path(target, suffix=".json") as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert tmp.name.startswith(".plans.json.") and tmp.name.endswith(".partial.json")
        assert not target.exists()
        tmp.write_text('{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    assert os.listdir(target.parent) == ["plans.json"]


def test_the_file_gets_the_mode_the_umask_asks_for(tmp_path, umask_027):
    with atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "a.bin") == 0o640
    path = atomic_write(tmp_path / "b.bin", lambda f: f.write(b"y"))
    assert path.read_bytes() == b"y" and _mode(path) == 0o640


def _write_then_fail(target, directory: bool = False) -> None:
    with atomic_path(target, directory=directory) as tmp:
        (tmp / "new.txt" if directory else tmp).write_text("new")
        raise ValueError("verification failed")


def test_a_failing_block_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(ValueError, match="verification failed"):
        _write_then_fail(target)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_a_folder_replaces_the_old_one_whole_with_the_umask_modes(tmp_path, umask_027):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path
        (tmp / "new.txt").write_text("new")
        (tmp / "inner").mkdir()
        (tmp / "inner" / "w.bin").write_bytes(b"w")
    assert sorted(os.listdir(target)) == ["inner", "new.txt"]
    assert (target / "new.txt").read_text() == "new" and (target / "inner" / "w.bin").read_bytes() == b"w"
    assert _mode(target) == 0o750 and _mode(target / "new.txt") == 0o640 and _mode(target / "inner" / "w.bin") == 0o640
    assert os.listdir(tmp_path) == ["pkg"]


def test_a_failing_folder_block_keeps_the_old_folder(tmp_path):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="verification failed"):
        _write_then_fail(target, directory=True)
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["pkg"]


def test_a_short_write_names_the_target_and_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as e, atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_an_error_that_names_its_file_is_left_as_it_is(tmp_path):
    with pytest.raises(FileNotFoundError) as e, atomic_path(tmp_path / "a.bin") as tmp:
        open(tmp_path / "missing" / "x", "rb")  # noqa: SIM115
    assert e.value.filename == str(tmp_path / "missing" / "x")
    assert not tmp.exists() and os.listdir(tmp_path) == []


def test_a_header_and_data_pair_is_written_whole_with_the_umask_modes(tmp_path, umask_027):
    from unetrpp.io import Geometry, read_image, write_image

    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    geometry = Geometry(spacing=(1.0, 1.5, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(array, geometry, tmp_path / "case.mhd")
    files = sorted(os.listdir(tmp_path))
    assert files[0] == "case.mhd" and len(files) == 2 and files[1].startswith("case.")
    assert all(_mode(tmp_path / f) == 0o640 for f in files)
    back, geom = read_image(tmp_path / "case.mhd")
    assert np.array_equal(back, array) and np.allclose(geom.spacing, geometry.spacing)


def test_a_failed_rename_names_the_target_not_the_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.mkdir()  # a folder where the file should go
    (target / "keep").write_text("x")
    with pytest.raises(IsADirectoryError) as e, atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert e.value.filename == str(target)
    assert (target / "keep").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_folder_replaces_a_link_to_a_folder_and_the_link_target_is_left(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old").write_text("1")
    (tmp_path / "link").symlink_to(real)
    with atomic_path(tmp_path / "link", directory=True) as tmp:
        (tmp / "new").write_text("2")
    link = tmp_path / "link"
    assert not link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new"]
    assert (real / "old").read_text() == "1"  # the linked folder itself is not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
