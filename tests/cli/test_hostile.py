"""Hostile and broken inputs (issue 14): each is refused in one line naming the file or entry, and
nothing is written under a final name."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_convert import _msd_task
from tests.inference.test_predictor import _checkpoint, _tiny
from tests.inference.test_predictor import _plans as _inference_plans
from tests.volumes import GEOMETRIES, make_v2_dataset
from unetrpp.cli.main import main
from unetrpp.data.check import check_dataset
from unetrpp.data.convert import convert_msd
from unetrpp.data.layout import load_splits, safe_case_name
from unetrpp.data.preprocess import load_case
from unetrpp.data.validate import label_problem
from unetrpp.io import ImageReadError, NonFiniteError, read_image, write_image
from unetrpp.training.sampler import CaseCache


def _plans():
    return {**_inference_plans(), "dataset": "test"}


def _one_line_error(capsys, argv, *needles) -> str:
    """Run the CLI; it must exit 2 with one line ``unetrpp CMD: error: ...`` holding every needle."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unetrpp {argv[0]}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------- 2: convert msd stays inside the task
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "test_entry"])
def test_msd_entries_must_stay_inside_the_task_folder(tmp_path, capsys, kind):
    src = _msd_task(tmp_path / "Task04", ["h_001", "h_002"], 1, test=["h_009"])
    secret = tmp_path / "secret" / "id_rsa.nii.gz"
    secret.parent.mkdir()
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    meta = json.loads((src / "dataset.json").read_text())
    if kind == "absolute":
        meta["training"][1]["label"] = entry = str(secret)
    elif kind == "dotdot":
        meta["training"][1]["image"] = entry = "./imagesTr/../../secret/id_rsa.nii.gz"
    elif kind == "symlink":
        (src / "labelsTr" / "h_002.nii.gz").unlink()
        (src / "labelsTr" / "h_002.nii.gz").symlink_to(secret)
        entry = meta["training"][1]["label"]
    else:
        meta["test"] = [{"image": "../secret/id_rsa.nii.gz"}]
        entry = "../secret/id_rsa.nii.gz"
    (src / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="points outside") as e:
        convert_msd(src, tmp_path / "out")
    assert repr(entry) in str(e.value) and "dataset.json" in str(e.value)
    assert _files(tmp_path / "out") == []  # every entry is checked before the first copy
    _one_line_error(capsys, ["convert", "msd", src, tmp_path / "out2", "--workers", 1], "dataset.json", "outside")
    assert _files(tmp_path / "out2") == []


def test_msd_malformed_entries_are_one_line(tmp_path, capsys):
    src = _msd_task(tmp_path / "Task04", ["h_001", "h_002"], 1)
    meta = json.loads((src / "dataset.json").read_text())
    for bad, needle in ((["x"], "training[0] must be"), ([{"image": 3, "label": "x"}], "training[0].image: 3"),
                        ([{"image": "./imagesTr", "label": "./labelsTr/h_001.nii.gz"}], "is not a file")):
        (src / "dataset.json").write_text(json.dumps({**meta, "training": bad}))
        _one_line_error(capsys, ["convert", "msd", src, tmp_path / "out", "--workers", 1], needle)
        assert _files(tmp_path / "out") == []


# ---------------------------------------------------------------------- 3: splits.json names
BAD_NAMES = ["../../outside/evil", "/etc/passwd", "a/b", "a\\b", "..", "", "x\0y", "C:evil", 7]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_safe_case_name_refuses_paths(name):
    with pytest.raises(ValueError, match="not a plain name"):
        safe_case_name(name, "splits.json")


def test_safe_case_name_keeps_plain_names():
    for n in ("case_001", "lung_001", "BRATS 2", "a.b"):
        assert safe_case_name(n, "x") == n


@pytest.mark.parametrize("name", ["../../outside/evil", "/tmp/abs", "..", "case_999"])
def test_splits_names_must_be_training_cases(tmp_path, capsys, name):
    ds = make_v2_dataset(tmp_path / "ds", cases=3)
    splits = [{"train": ["case_000", name], "val": ["case_002"]}]
    (ds / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(ValueError, match=r"splits\.json: fold 0 'train'") as e:
        load_splits(ds)
    assert repr(name) in str(e.value)
    # through the CLI: `plan` reads the splits
    _one_line_error(capsys, ["plan", ds, "--workers", 1], "splits.json", repr(name))


def test_splits_structure_is_checked(tmp_path):
    ds = make_v2_dataset(tmp_path / "ds", cases=3)
    (ds / "splits.json").write_text(json.dumps([{"train": "case_000", "val": []}]))
    with pytest.raises(ValueError, match="fold 0 'train' must be a list"):
        load_splits(ds)


def test_preprocessed_case_names_never_leave_the_folder(tmp_path):
    pre = tmp_path / "pre"
    pre.mkdir()
    (tmp_path / "evil.json").write_text("{}")
    np.save(tmp_path / "evil.npy", np.zeros(3))
    with pytest.raises(ValueError, match="not a plain name"):
        load_case(pre, "../evil")
    with pytest.raises(ValueError, match=r"'\.\./evil' is not a plain name"):
        CaseCache(pre, ["../evil"])


# ---------------------------------------------------------------------- 4: undeclared label values
@pytest.mark.parametrize(
    ("value", "dtype", "needle"),
    [(258, np.uint16, "values [258] not declared"), (5, np.uint8, "values [5] not declared"),
     (-1, np.int16, "values [-1] not declared"), (10**9, np.int32, "values [1000000000] not declared"),
     (1e9, np.float32, "values [1000000000] not declared"), (2.5, np.float32, "non-integer values [2.5]")],
)  # fmt: skip
def test_undeclared_labels_are_refused_by_plan_and_preprocess(tmp_path, capsys, value, dtype, needle):
    ds = make_v2_dataset(tmp_path / "ds", cases=3)
    assert main(["plan", str(ds), "--workers", "1"]) == 0
    capsys.readouterr()
    path = ds / "labelsTr" / "case_001.nii.gz"
    lab, g = read_image(path)
    lab = lab.astype(dtype)
    lab[0, 0, 0] = value
    write_image(lab, g, path)
    # preprocess (with the plans made before) and plan both name the file, the values and the declared set
    _one_line_error(capsys, ["preprocess", ds, "--workers", 1], str(path), needle, "[0, 1, 2]")
    assert not [f for f in _files(ds / "preprocessed") if f.startswith("case_001")]
    _one_line_error(capsys, ["plan", ds, "--workers", 1], str(path), needle, "[0, 1, 2]")
    # check says the same thing about the same case
    assert any(p.case == "case_001" and needle in p.message for p in check_dataset(ds))


def test_label_problem_lists_a_few_values_and_allocates_nothing_by_value():
    lab = np.zeros((4, 4, 4), np.int64)
    lab[0, 0, :] = [2**62, 9, 8, 7]
    lab[1, 0, :] = [6, 5, 1, 3]
    msg = label_problem(lab, [0, 1])
    assert msg == "values [3, 5, 6, 7, 8] and 2 more not declared in dataset.json [0, 1]"
    assert label_problem(lab.astype(np.uint8) * 0, [0, 1]) is None
    assert label_problem(np.array([[[0.0, 1.0]]], np.float64), [0, 1]) is None


# ---------------------------------------------------------------------- 5: NaN/inf voxels and bad spacing
def _patch_nifti(path, offset, fmt, *values):
    raw = path.read_bytes()
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(raw) if gz else raw)
    struct.pack_into("<" + fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))


def _nan_volume():
    a = np.random.default_rng(0).normal(100, 10, (6, 7, 8)).astype(np.float32)
    a[1, 2, 3], a[2, 3, 4], a[3, 4, 5] = np.nan, np.inf, -np.inf
    return a


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nan_and_inf_voxels_are_refused(tmp_path, ending):
    path = write_image(_nan_volume(), GEOMETRIES["oblique"], tmp_path / f"x{ending}")
    with pytest.raises(NonFiniteError, match="3 NaN/inf voxels") as e:
        read_image(path)
    assert str(e.value).startswith(f"{path}: ") and isinstance(e.value, ValueError)


def test_nan_is_found_in_the_raw_nifti_data_even_behind_scl_inter(tmp_path):
    # ITK zeroes NaN, then applies slope/intercept: the voxel comes back as 5.0, not 0 and not NaN
    path = write_image(_nan_volume(), GEOMETRIES["lps"], tmp_path / "x.nii.gz")
    _patch_nifti(path, 112, "2f", 2.0, 5.0)
    with pytest.raises(NonFiniteError, match="3 NaN/inf voxels"):
        read_image(path)


def test_float_nifti_with_zeros_and_no_nan_reads(tmp_path):
    a = np.zeros((5, 6, 7), np.float32)
    a[1:3] = 2.5
    path = write_image(a, GEOMETRIES["lps"], tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(read_image(path)[0], a)


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.5, float("inf")])
@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_bad_nifti_spacing_is_refused(tmp_path, value, ending):
    path = write_image(np.ones((4, 5, 6), np.int16), GEOMETRIES["lps"], tmp_path / f"x{ending}")
    _patch_nifti(path, 80, "f", value)  # pixdim[1]: the x spacing; ITK would read 1 mm (or its absolute value)
    with pytest.raises(ImageReadError, match="bad spacing in header: pixdim") as e:
        read_image(path)
    assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_empty_and_negative_sizes_are_named_not_called_truncated(tmp_path, ending):
    path = write_image(np.ones((4, 5, 6), np.int16), GEOMETRIES["lps"], tmp_path / f"x{ending}")
    _patch_nifti(path, 44, "h", 0)  # dim[2]: the y size
    with pytest.raises(ImageReadError, match=r"empty volume \(size \(6, 0, 4\) in the header\)") as e:
        read_image(path)
    assert str(e.value).startswith(f"{path}: ")
    _patch_nifti(path, 44, "h", -5)
    with pytest.raises(ImageReadError, match=r"corrupt NIfTI header \(negative size"):
        read_image(path)


def test_a_volume_too_big_for_the_memory_left_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    import unetrpp.runtime

    ds = make_v2_dataset(tmp_path / "ds", cases=2, channels=1)
    image = sorted((ds / "imagesTr").iterdir())[0]
    shape = read_image(image)[0].shape
    monkeypatch.setattr(unetrpp.runtime, "available_memory", lambda: 1 << 10)
    for ending in (".nii.gz", ".mha"):
        path = write_image(np.ones((40, 50, 60), np.float32), GEOMETRIES["lps"], tmp_path / f"big{ending}")
        with pytest.raises(ImageReadError, match=r"40 x 50 x 60 voxels of 32-bit float need 0\.0 GiB of memory to "
                                                 r"read; 0\.0 GiB are available") as e:
            read_image(path)
        assert str(e.value).startswith(f"{path}: ")
    # through a command: one line naming the file, nothing written
    _one_line_error(capsys, ["plan", ds, "--workers", 1], " x ".join(map(str, shape)), "of memory to read")
    assert not (ds / "plans.json").exists()
    monkeypatch.setattr(unetrpp.runtime, "available_memory", lambda: None)  # unknown: no check
    assert read_image(tmp_path / "big.mha")[0].shape == (40, 50, 60)


def test_running_out_of_memory_is_one_line_and_other_errors_stay_tracebacks(monkeypatch, capsys):
    from unetrpp.cli import info

    def oom(args):
        raise MemoryError("Unable to allocate 7.45 GiB for an array with shape (1000, 1000, 2000) and type float32")

    monkeypatch.setattr(info, "run", oom)
    _one_line_error(capsys, ["info", "synapse"], "out of memory: Unable to allocate 7.45 GiB",
                    "--debug shows the traceback")

    def torch_oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(info, "run", torch_oom)
    _one_line_error(capsys, ["info", "synapse"], "out of memory: [enforce fail", "can't allocate memory")
    with pytest.raises(RuntimeError, match="can't allocate"):
        main(["info", "synapse", "--debug"])

    def bug(args):
        raise RuntimeError("shape mismatch in some kernel")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["info", "synapse"])


def test_nan_image_fails_plan_preprocess_and_predict_in_one_line(tmp_path, capsys):
    ds = make_v2_dataset(tmp_path / "ds", cases=3)
    assert main(["plan", str(ds), "--workers", "1"]) == 0
    capsys.readouterr()
    path = ds / "imagesTr" / "case_002_0000.nii.gz"
    a, g = read_image(path)
    a[3, 3, 3] = np.nan
    write_image(a, g, path)
    _one_line_error(capsys, ["plan", ds, "--workers", 1], str(path), "1 NaN/inf voxels")
    _one_line_error(capsys, ["preprocess", ds, "--workers", 1], str(path), "1 NaN/inf voxels")
    assert not [f for f in _files(ds / "preprocessed") if f.startswith("case_002")]
    ckpt = _checkpoint(tmp_path / "m.pt", _tiny(), _plans())
    _one_line_error(capsys, ["predict", "-i", path, "-o", tmp_path / "pred", "-m", ckpt], str(path), "NaN/inf")
    assert _files(tmp_path / "pred") == []


# ---------------------------------------------------------------------- 8, 9: predict outputs
@pytest.fixture
def predict_setup(tmp_path):
    image = np.random.default_rng(1).normal(40, 60, (18, 30, 27)).astype(np.int16)
    write_image(image, GEOMETRIES["lps"], tmp_path / "in" / "case.nii.gz")
    return tmp_path / "in", _checkpoint(tmp_path / "m.pt", _tiny(), _plans())


def test_predict_refuses_to_write_over_its_input(tmp_path, capsys, predict_setup):
    inp, ckpt = predict_setup
    before = (inp / "case.nii.gz").read_bytes()
    (tmp_path / "link").symlink_to(inp)
    for out in (inp, tmp_path / "link", tmp_path / "in" / "."):
        _one_line_error(capsys, ["predict", "-i", inp, "-o", out, "-m", ckpt, "--overwrite", "--no-tta"],
                        "the output is the input")
    f = inp / "case.nii.gz"
    _one_line_error(capsys, ["predict", "-i", f, "-o", f, "-m", ckpt, "--overwrite", "--no-tta"],
                    "the output is the input")
    # a single file into its own folder: the output file would be the input file
    _one_line_error(capsys, ["predict", "-i", f, "-o", inp, "-m", ckpt, "--overwrite", "--no-tta"],
                    f"{f}: this output would replace the input")
    assert (inp / "case.nii.gz").read_bytes() == before and _files(inp) == ["case.nii.gz"]


def test_predict_redoes_a_case_until_every_requested_output_exists(tmp_path, capsys, predict_setup):
    inp, ckpt = predict_setup
    out = tmp_path / "out"
    run = ["predict", "-i", str(inp), "-o", str(out), "-m", str(ckpt), "--no-tta"]
    assert main(run) == 0
    assert _files(out) == ["case.nii.gz"]
    capsys.readouterr()
    assert main([*run, "--preview"]) == 0
    assert "predicted 1 case(s)" in capsys.readouterr().out
    assert _files(out) == ["case.nii.gz", "case.png"]
    assert main([*run, "--save-probabilities", "--preview"]) == 0
    assert "predicted 1 case(s)" in capsys.readouterr().out
    assert _files(out) == ["case.nii.gz", "case.npz", "case.png"]
    with np.load(out / "case.npz") as z:
        assert z["probabilities"].shape[0] == 3
    # everything asked for exists: skipped
    stamp = os.stat(out / "case.nii.gz").st_mtime_ns
    assert main([*run, "--save-probabilities"]) == 0
    assert "predicted 0 case(s)" in capsys.readouterr().out
    assert os.stat(out / "case.nii.gz").st_mtime_ns == stamp


# ---------------------------------------------------------------------- 1: a full disk never installs a bad file
def test_a_short_image_write_is_caught_before_the_rename(tmp_path, monkeypatch):
    """ITK's writer does not report a short write: a truncated file must never reach its final name."""
    import SimpleITK as sitk

    real = sitk.WriteImage

    def short_write(image, path, *args):  # what a full disk does: the file is cut, no error is raised
        real(image, path, *args)
        with open(path, "rb+") as f:
            f.truncate(max(os.path.getsize(path) // 3, 10))

    arr = np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)
    target = tmp_path / "out" / "seg.nii.gz"
    monkeypatch.setattr(sitk, "WriteImage", short_write)
    with pytest.raises(ValueError, match=r"seg\.nii\.gz: the written file does not read back \(disk full\?\)"):
        write_image(arr, GEOMETRIES["lps"], target)
    assert _files(tmp_path / "out") == []  # neither the final name nor a .partial
    monkeypatch.setattr(sitk, "WriteImage", real)
    write_image(arr, GEOMETRIES["lps"], target)
    np.testing.assert_array_equal(read_image(target)[0], arr)


def test_a_full_disk_during_an_atomic_write_keeps_the_old_file_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from unetrpp.io import write_json

    path = tmp_path / "plans.json"
    write_json({"a": 1}, path)
    ds = make_v2_dataset(tmp_path / "ds", cases=2, channels=1)

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_json({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [f for f in _files(tmp_path) if not f.startswith("ds")] == ["plans.json"]
    # through the CLI: one line naming the file, the traceback only with --debug
    _one_line_error(capsys, ["plan", ds, "--workers", 1], "No space left on device")
    with pytest.raises((OSError, ValueError), match="No space left"):  # the write probe sees it first
        main(["plan", str(ds), "--workers", "1", "--debug"])


@pytest.fixture
def small_disk(tmp_path):
    """A real full disk: a 48 KiB tmpfs, where this process may mount one (else the fault-injection
    tests above stand for it)."""
    import shutil
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the fault-injecting writer tests cover a full disk")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k,mode=0777", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]}); the fault-injecting writer tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_never_leaves_a_bad_file(small_disk, tmp_path, capsys, predict_setup):
    from unetrpp.io import write_json

    noise = np.random.default_rng(0).integers(-2000, 2000, (40, 40, 40)).astype(np.int16)  # ~100 KB compressed
    with pytest.raises((OSError, ValueError)) as e:
        write_image(noise, GEOMETRIES["lps"], small_disk / "seg.nii.gz")
    assert "seg.nii.gz" in str(e.value) and _files(small_disk) == []
    with pytest.raises(OSError, match="No space left"):
        write_json({"a": "x" * 200_000}, small_disk / "plans.json")
    assert _files(small_disk) == []
    # predict: the label map fits, the probabilities do not; one line, exit 2, nothing cut under a final name
    inp, ckpt = predict_setup
    _one_line_error(capsys, ["predict", "-i", inp, "-o", small_disk / "pred", "-m", ckpt, "--no-tta",
                             "--save-probabilities"], "No space left on device")
    left = _files(small_disk / "pred")
    assert "case.npz" not in left and not [f for f in left if "partial" in f or f.startswith(".")], left
    if "case.nii.gz" in left:
        assert read_image(small_disk / "pred" / "case.nii.gz")[0].shape == (18, 30, 27)


def test_outputs_follow_the_umask(tmp_path):
    from unetrpp.io import write_json

    old = os.umask(0o022)
    try:
        a = write_json({"a": 1}, tmp_path / "a.json")
        b = write_image(np.zeros((4, 4, 4), np.uint8), GEOMETRIES["lps"], tmp_path / "b.nii.gz")
    finally:
        os.umask(old)
    assert (a.stat().st_mode & 0o777) == 0o644 and (b.stat().st_mode & 0o777) == 0o644


# ---------------------------------------------------------------------- 6, 10: checkpoints that are damaged or odd
def _saved_tiny(tmp_path):
    from unetrpp.checkpoint import load_checkpoint

    model = _tiny()
    path = _checkpoint(tmp_path / "m.pt", model, _plans())
    return path, load_checkpoint(path)


@pytest.mark.parametrize("damage", ["nan", "bitflip", "unknown_key", "config_not_dict", "string_version"])
def test_damaged_or_odd_checkpoints_are_refused_in_one_line(tmp_path, capsys, damage):
    import torch

    path, ckpt = _saved_tiny(tmp_path)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 4)
    needle = {"nan": "holds NaN/inf values", "bitflip": "do not match their checksum",
              "unknown_key": "unknown keys banana", "config_not_dict": "model_config must be a dict",
              "string_version": "version must be an integer"}[damage]
    if damage == "bitflip":  # one bit of one weight changed after saving
        w = ckpt["state_dict"][key]
        w.view(-1).view(torch.int32)[3] ^= 1 << 20
        torch.save(ckpt, path)
    else:
        if damage == "nan":
            ckpt["state_dict"][key].view(-1)[0] = float("nan")
        elif damage == "unknown_key":
            ckpt["model_config"]["banana"] = 1
        elif damage == "config_not_dict":
            ckpt["model_config"] = [1, 2]
        else:
            ckpt["version"] = "1"
        from unetrpp.checkpoint import save_checkpoint

        save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "version")}, path)
        if damage == "string_version":
            raw = torch.load(path, weights_only=True)
            raw["version"] = "1"
            torch.save(raw, path)
    img = tmp_path / "ct.nii.gz"
    write_image(np.zeros((8, 16, 16), np.float32), GEOMETRIES["lps"], img)
    _one_line_error(capsys, ["predict", "-i", img, "-o", tmp_path / "out.nii.gz", "-m", path, "--device", "cpu"],
                    str(path), needle)
    assert not (tmp_path / "out.nii.gz").exists()


# ---------------------------------------------------------------------- 7: worker pools die with their parent
def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_pool_workers_end_when_the_parent_is_killed():
    import signal
    import subprocess
    import sys
    import time

    code = ("from unetrpp.parallel import worker_pool; import time\n"
            "p = worker_pool(2); list(p.map(abs, [1, 2, 3, 4]))\nprint('ready', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and "Z" not in _state(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "Z" not in _state(w)]
    # and every pool of the package is made that way
    import unetrpp

    src = Path(unetrpp.__file__).parent
    direct = [p.name for p in src.rglob("*.py")
              if "ProcessPoolExecutor(" in p.read_text(encoding="utf-8") and p.name != "parallel.py"]
    assert direct == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


# ---------------------------------------------------------------------- 10: a dataset with no training case
def test_check_does_not_pass_a_dataset_without_training_cases(tmp_path):
    root = make_v2_dataset(tmp_path / "ds", cases=2, channels=1)
    for f in [*(root / "imagesTr").iterdir(), *(root / "labelsTr").iterdir()]:
        f.unlink()
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = 0
    (root / "dataset.json").write_text(json.dumps(meta))
    problems = check_dataset(root)
    assert any("no training cases" in p.message for p in problems), problems


# ---------------------------------------------------------------------- 6, 10: more one-line errors
def test_predict_checks_the_output_location_before_computing(tmp_path, capsys):
    path, _ = _saved_tiny(tmp_path)
    img = tmp_path / "in" / "ct.nii.gz"
    write_image(np.zeros((8, 16, 16), np.float32), GEOMETRIES["lps"], img)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _one_line_error(capsys, ["predict", "-i", img.parent, "-o", blocker / "out", "-m", path, "--device", "cpu"],
                    "cannot write predictions there")


def test_random_bytes_are_not_called_code_and_damaged_arrays_are_named(tmp_path):
    from unetrpp.network.weights import read_checkpoint

    junk = tmp_path / "junk.model"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint") as e:
        read_checkpoint(junk)
    assert "could run code" not in str(e.value)
    root = make_v2_dataset(tmp_path / "ds", cases=2, channels=1)
    pre = tmp_path / "pre"
    pre.mkdir()
    np.save(pre / "case_000.npy", np.zeros((1, 4, 4, 4), np.float32))
    (pre / "case_000_seg.npy").write_bytes((pre / "case_000.npy").read_bytes()[:100])  # cut short
    np.save(pre / "case_000_locations.npy", np.zeros((0, 4), np.int64))
    with pytest.raises(ValueError, match=r"case_000_seg\.npy: unreadable preprocessed array"):
        load_case(pre, "case_000")
    del root


def test_evaluate_refuses_probabilities_as_predictions(tmp_path, capsys):
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[2:4, 2:6, 2:6] = 1
    write_image(ref, GEOMETRIES["lps"], tmp_path / "ref" / "c.nii.gz")
    write_image(ref.astype(np.float32) * 0.7, GEOMETRIES["lps"], tmp_path / "pred" / "c.nii.gz")
    _one_line_error(capsys, ["evaluate", tmp_path / "ref", tmp_path / "pred", "--workers", 1],
                    "holds non-integer values")


# ---------------------------------------------------------------------- variations found in review
def test_a_corrupt_gzip_stream_or_header_offset_is_one_line(tmp_path, capsys):
    path = write_image(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), GEOMETRIES["lps"], tmp_path / "x.nii.gz")
    raw = bytearray(path.read_bytes())
    raw[20:60] = bytes(40)  # damage the deflate data just after the gzip header
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    good = write_image(np.ones((4, 5, 6), np.int16), GEOMETRIES["lps"], tmp_path / "y.nii")
    for value in (float("inf"), float("nan"), -352.0):
        _patch_nifti(good, 108, "f", value)  # vox_offset
        with pytest.raises(ImageReadError, match=r"corrupt NIfTI header \(vox_offset"):
            read_image(good)


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
def test_header_and_data_pairs_are_written_whole_or_not_at_all(tmp_path, monkeypatch, ending):
    import SimpleITK as sitk

    arr = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    out = tmp_path / "out"
    done = write_image(arr, GEOMETRIES["oblique"], out / f"seg{ending}")
    np.testing.assert_array_equal(read_image(done)[0], arr)
    before = {f: (out / f).read_bytes() for f in _files(out)}
    real = sitk.WriteImage

    def short_write(image, path, *args):  # a full disk cuts the data file
        real(image, path, *args)
        data = [f for f in Path(path).parent.iterdir() if f.name != Path(path).name]
        with open(data[0], "rb+") as f:
            f.truncate(os.path.getsize(data[0]) // 2)

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    with pytest.raises(ValueError, match="does not read back"):
        write_image(arr + 1, GEOMETRIES["oblique"], out / f"seg{ending}")
    assert {f: (out / f).read_bytes() for f in _files(out)} == before  # the old pair, untouched, nothing else


def test_preprocess_refuses_labels_that_changed_since_plan(tmp_path, capsys):
    ds = make_v2_dataset(tmp_path / "ds", cases=2)
    assert main(["plan", str(ds), "--workers", "1"]) == 0
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"]["c"] = 5
    (ds / "dataset.json").write_text(json.dumps(meta))
    _one_line_error(capsys, ["preprocess", ds, "--workers", 1], "dataset.json: its labels", "run `unetrpp plan` again")
    assert not list((ds / "preprocessed").glob("*.npy")) if (ds / "preprocessed").exists() else True


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("preset", "../../../tmp/x", "unknown preset '../../../tmp/x'"),
    ("preset", "/tmp/x", "unknown preset"),
    ("preset", ["synapse"], "unknown preset"),
    ("normalization", [{"scheme": "ct"}], "clip must be two finite numbers"),
    ("normalization", [{"scheme": "ct", "clip": [-100, 200], "mean": float("nan"), "std": 1}], "mean and std"),
    ("normalization", [{"scheme": "whiten"}], "scheme must be ct, zscore or none"),
    ("resampling", {}, "resampling must give image_order and label_order"),
    ("resampling", {"image_order": 7, "label_order": 1}, "integers 0-5"),
])
def test_plans_fields_are_validated(tmp_path, capsys, field, value, needle):
    from unetrpp.data.plans import Plans

    ds = make_v2_dataset(tmp_path / "ds", cases=2)
    assert main(["plan", str(ds), "--workers", "1"]) == 0
    plans = json.loads((ds / "plans.json").read_text())
    plans[field] = value
    (ds / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ValueError, match=re_escape(needle)):
        Plans.load(ds / "plans.json")
    _one_line_error(capsys, ["train", ds, "--device", "cpu"], "plans.json", needle)
    assert not (tmp_path / "tmp").exists() and not (ds / "results").exists()


def re_escape(text):
    import re

    return re.escape(text)


def test_converters_refuse_links_that_leave_the_download(tmp_path):
    from unetrpp.data.convert import convert_synapse

    secret = tmp_path / "secret.nii.gz"
    write_image(np.ones((4, 5, 6), np.int16), GEOMETRIES["lps"], secret)
    raw = tmp_path / "RawData" / "Training"
    (raw / "img").mkdir(parents=True)
    (raw / "label").mkdir()
    write_image(np.ones((4, 5, 6), np.int16), GEOMETRIES["lps"], raw / "label" / "label0001.nii.gz")
    (raw / "img" / "img0001.nii.gz").symlink_to(secret)
    with pytest.raises(ValueError, match=r"img0001.nii.gz: points outside .*RawData.*; refusing to copy it"):
        convert_synapse(tmp_path / "RawData", tmp_path / "out")
    assert _files(tmp_path / "out") == []


def test_a_symlink_loop_is_one_line(tmp_path, capsys, predict_setup):
    _, ckpt = predict_setup
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    err = _one_line_error(capsys, ["predict", "-i", loop, "-o", tmp_path / "o", "-m", ckpt])
    assert "loop.nii.gz" in err


def test_errors_from_workers_keep_the_original_line(monkeypatch, capsys):
    from concurrent.futures.process import BrokenProcessPool

    from unetrpp.cli import info
    from unetrpp.cli.main import _user_message

    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: /d/case_seg.npy: unreadable array")
    assert _user_message(wrapped) == "/d/case_seg.npy: unreadable array"

    def broken(args):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly while the future was "
                                "running or pending.")

    monkeypatch.setattr(info, "run", broken)
    _one_line_error(capsys, ["info", "synapse"], "a worker process died", "fewer --workers")

    def loader(args):
        raise wrapped

    monkeypatch.setattr(info, "run", loader)
    _one_line_error(capsys, ["info", "synapse"], "error: /d/case_seg.npy: unreadable array")


@pytest.mark.parametrize("damage", ["labels_list", "tensor_not", "key_not_str"])
def test_checkpoint_fields_of_the_wrong_type_are_refused(tmp_path, capsys, damage):
    import torch

    from unetrpp.checkpoint import load_checkpoint

    path = _checkpoint(tmp_path / "m.pt", _tiny(), _plans())
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop("state_dict_sha256", None)
    if damage == "labels_list":
        ckpt["labels"] = ["background", "a"]
    elif damage == "tensor_not":
        ckpt["state_dict"][next(iter(ckpt["state_dict"]))] = [1, 2, 3]
    else:
        ckpt["model_config"][3] = 1
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"m\.pt: checkpoint (labels|state_dict|model_config)"):
        load_checkpoint(path)


def test_random_bytes_of_every_first_byte_are_one_line(tmp_path):
    from unetrpp.checkpoint import load_checkpoint
    from unetrpp.network.weights import read_checkpoint

    rng = np.random.default_rng(5)
    for first in b"RaesutQqh\x81\x85\x80}":
        junk = tmp_path / "junk.pt"
        junk.write_bytes(bytes([first]) + rng.bytes(300))
        with pytest.raises(ValueError, match="not a loadable unetrpp checkpoint") as e:
            load_checkpoint(junk)
        assert "weights_only" not in str(e.value)
        with pytest.raises(ValueError, match=r"not a (readable )?PyTorch checkpoint") as e:
            read_checkpoint(junk)
        assert "weights_only" not in str(e.value) and "could run code" not in str(e.value)


def test_resuming_from_a_final_checkpoint_is_one_line(tmp_path):
    import shutil

    import torch

    from unetrpp.training.config import TrainConfig
    from unetrpp.training.trainer import Trainer

    ds = make_v2_dataset(tmp_path / "ds", cases=4)
    assert main(["plan", str(ds), "--workers", "1"]) == 0
    assert main(["preprocess", str(ds), "--workers", "1"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    final = _checkpoint(tmp_path / "final.pt", _tiny(), _plans())
    shutil.copy(final, run / "checkpoint_latest.pt")
    assert "optimizer" not in torch.load(final, weights_only=True)
    trainer = Trainer(ds, TrainConfig(device="cpu", epochs=1, iters_per_epoch=1, val_iters=1, workers=0),
                      out_dir=run, progress=False, echo=False)
    with pytest.raises(ValueError, match=r"checkpoint_latest.pt: cannot resume from it: it lacks train_config"):
        trainer.run(resume=True)


def test_two_inputs_for_one_output_and_bad_flags_are_refused(tmp_path, capsys, predict_setup):
    inp, ckpt = predict_setup
    (inp / "case_0000.nii.gz").write_bytes((inp / "case.nii.gz").read_bytes())
    _one_line_error(capsys, ["predict", "-i", inp, "-o", tmp_path / "o", "-m", ckpt],
                    "one output would serve two inputs")
    assert not (tmp_path / "o").exists() or _files(tmp_path / "o") == []
    with pytest.raises(SystemExit):
        main(["predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m", str(ckpt), "--batch", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_msd_output_inside_the_task_and_deep_json_are_refused(tmp_path, capsys):
    from unetrpp.io import read_json

    task = _msd_task(tmp_path / "Task09_Spleen", ["spleen_1", "spleen_2"], 1)
    before = (task / "dataset.json").read_bytes()
    for out in (task, task / "v2"):
        with pytest.raises(ValueError, match="the output must be outside the MSD task folder"):
            convert_msd(task, out)
    assert (task / "dataset.json").read_bytes() == before
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: JSON nested too deeply"):
        read_json(deep)


def test_a_short_write_names_the_file(tmp_path, monkeypatch):
    from unetrpp.io.jsonio import atomic_write

    def full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as e:
        atomic_write(tmp_path / "a.bin", full)
    assert e.value.filename == str(tmp_path / "a.bin") and _files(tmp_path) == []


def test_saved_weights_follow_the_umask(tmp_path):
    model = _tiny()
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "w")
    finally:
        os.umask(old)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "w").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644}


def test_an_msd_dataset_json_beside_the_references_names_the_labels(tmp_path, capsys):
    from unetrpp.data.layout import read_labels

    lab = np.zeros((6, 7, 8), np.uint8)
    lab[1:4, 2:5, 2:6] = 1
    write_image(lab, GEOMETRIES["lps"], tmp_path / "labelsTr" / "c.nii.gz")
    write_image(lab, GEOMETRIES["lps"], tmp_path / "pred" / "c.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}}))
    assert read_labels(tmp_path / "dataset.json") == {"background": 0, "spleen": 1}
    assert main(["evaluate", str(tmp_path / "labelsTr"), str(tmp_path / "pred")]) == 0
    assert "spleen" in capsys.readouterr().out
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"spleen": "one"}}))
    _one_line_error(capsys, ["evaluate", tmp_path / "labelsTr", tmp_path / "pred"], "dataset.json: 'labels' must map")
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    _one_line_error(capsys, ["overlay", tmp_path / "pred" / "c.nii.gz", tmp_path / "pred" / "c.nii.gz",
                             tmp_path / "o.png", "--dataset", tmp_path], "dataset.json: no 'labels' mapping")


def test_plan_and_evaluate_check_their_output_location_first(tmp_path, capsys, monkeypatch):
    import unetrpp.data.plan

    ds = make_v2_dataset(tmp_path / "ds", cases=2)
    called = []
    monkeypatch.setattr(unetrpp.data.plan, "plan_dataset", lambda *a, **k: called.append(1))
    os.chmod(ds, 0o555)
    try:
        if os.access(ds, os.W_OK):  # root writes anywhere: the read-only case cannot be made here
            pytest.skip("running as root: a read-only folder is still writable")
        _one_line_error(capsys, ["plan", ds], f"{ds}: cannot write plans there")
    finally:
        os.chmod(ds, 0o755)
    assert called == []


def test_evaluate_checks_its_output_location_first(tmp_path, capsys, monkeypatch):
    import unetrpp.evaluation.evaluate

    lab = np.zeros((6, 7, 8), np.uint8)
    lab[1:4, 2:5, 2:6] = 1
    write_image(lab, GEOMETRIES["lps"], tmp_path / "ref" / "c.nii.gz")
    write_image(lab, GEOMETRIES["lps"], tmp_path / "pred" / "c.nii.gz")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    called = []
    monkeypatch.setattr(unetrpp.evaluation.evaluate, "evaluate_pairs", lambda *a, **k: called.append(1))
    _one_line_error(capsys, ["evaluate", tmp_path / "ref", tmp_path / "pred", "-o", blocker / "e.json"],
                    "cannot write the evaluation there")
    assert called == []


def test_plan_on_a_full_disk_fails_before_the_fingerprint(small_disk, capsys, monkeypatch):
    import unetrpp.data.plan

    ds = make_v2_dataset(small_disk / "ds", cases=2)
    with open(small_disk / "filler", "wb", buffering=0) as f:  # take what is left
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    called = []
    monkeypatch.setattr(unetrpp.data.plan, "plan_dataset", lambda *a, **k: called.append(1))
    _one_line_error(capsys, ["plan", ds], f"{ds}: cannot write plans there (No space left on device)")
    assert called == [] and not (ds / "plans.json").exists()


def test_only_user_errors_are_one_line_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from unetrpp import UserError
    from unetrpp.cli import info

    def user(args):
        raise UserError("/data/case.nii.gz: 4-D image; give one volume per file")

    monkeypatch.setattr(info, "run", user)
    _one_line_error(capsys, ["info", "synapse"], "error: /data/case.nii.gz: 4-D image")

    def numpy_bug(args):  # a ValueError from deep inside a library is a bug: the traceback, not a line
        import numpy as np
        np.zeros(3).reshape(2, 2)

    monkeypatch.setattr(info, "run", numpy_bug)
    with pytest.raises(ValueError, match="cannot reshape"):
        main(["info", "synapse"])
    assert "error:" not in capsys.readouterr().err
