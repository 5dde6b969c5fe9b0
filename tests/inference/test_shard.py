"""Sharded prediction: `--part-id K --num-parts N` and torchrun ranks each predict their share, and
together write exactly what one process writes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.inference.test_predictor import _checkpoint, _plans, _tiny
from tests.volumes import GEOMETRIES
from unetrpp.cli.main import main
from unetrpp.inference.shard import Shard, device_for, shard_of, threads_per_rank
from unetrpp.io import read_image, write_image
from unetrpp.io.jsonio import check_writable

SHAPES = [(18, 30, 27), (20, 26, 31), (16, 33, 29), (22, 28, 24), (17, 31, 33)]
NAMES = ["liver_07", "liver_02", "kidney_10", "kidney_01", "spleen_03"]  # sorted: k01 k10 l02 l07 s03
TORCHRUN = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")


def _predict(*argv) -> int:
    """``unetrpp predict`` in this process, on as many threads as each of 2 torchrun ranks (same arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_per_rank(2, {}))
    try:
        return main(["predict", *(str(a) for a in argv)])
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Five cases of different shapes and geometries, a tiny checkpoint, and the single-process result."""
    root = tmp_path_factory.mktemp("shard")
    rng = np.random.default_rng(7)
    geometries = list(GEOMETRIES.values())
    for i, (name, shape) in enumerate(zip(NAMES, SHAPES, strict=True)):
        image = rng.normal(40, 60, shape).astype(np.int16)
        image[shape[0] // 3:, 5:15, 8:20] += 150  # something for the network to see
        write_image(image, geometries[i % len(geometries)], root / "in" / f"{name}.nii.gz")
    ckpt = _checkpoint(root / "m.pt", _tiny(), _plans())
    assert _predict("-i", root / "in", "-o", root / "A", "-m", ckpt, "--device", "cpu", "--no-tta") == 0
    return root, ckpt


def _files(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir())


def _assert_same_predictions(a: Path, b: Path) -> None:
    assert _files(a) == _files(b) == sorted(f"{n}.nii.gz" for n in NAMES)  # no probe or partial files left
    for name in _files(a):
        (la, ga), (lb, gb) = read_image(a / name), read_image(b / name)
        assert la.dtype == lb.dtype and la.shape == lb.shape, name
        np.testing.assert_array_equal(la, lb, err_msg=name)
        assert ga == gb, name


def test_shares_are_round_robin_over_sorted_cases():
    cases = ["e", "c", "a", "g", "b", "d", "f"]
    shares = [Shard(k, 3, requested=True).select(cases) for k in range(3)]
    assert shares == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert Shard().select(cases) == sorted(cases) and Shard().prefix == ""
    assert Shard(2, 4, requested=True).prefix == "part 2/4: "
    assert Shard(1, 9, requested=True).select(cases[:1]) == []  # more parts than cases: some get none


def test_shard_from_flags_and_torchrun_variables(monkeypatch):
    assert shard_of(None, None, {}) == Shard()
    assert shard_of(1, 3, {}) == Shard(1, 3, requested=True)
    assert shard_of(0, 1, {}) == Shard(0, 1, requested=True)
    assert shard_of(None, None, TORCHRUN) == Shard(1, 2, 1, 2, torchrun=True, requested=True)
    assert shard_of(None, None, dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")) == Shard(torchrun=True)
    assert shard_of(1, 2, dict(RANK="0", WORLD_SIZE="1")) == Shard(1, 2, requested=True)  # one rank: no conflict
    for part, parts, env, message in [
        (None, None, dict(RANK="2", WORLD_SIZE="2"), "inconsistent"),
        (None, None, dict(RANK="x", WORLD_SIZE="2"), "must be integers"),
        (0, 2, TORCHRUN, "under torchrun"),
        (2, 2, {}, "must be 0 to 1"),
        (-1, 2, {}, "must be 0 to 1"),
        (0, 0, {}, "at least 1"),
        (1, None, {}, "needs --num-parts"),
        (None, 2, {}, "needs --part-id"),
    ]:
        with pytest.raises(ValueError, match=message):
            shard_of(part, parts, env)
    # each rank on its own GPU; on CPU the node's cores split among its ranks
    rank1 = shard_of(None, None, TORCHRUN)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for("auto", rank1) == device_for("cuda", rank1) == "cuda:1"
    assert device_for("cpu", rank1) == "cpu" and device_for("cuda:0", rank1) == "cuda:0"  # explicit: as given
    assert device_for("auto", Shard(1, 2, requested=True)) == "auto"  # --part-id: the usual choice
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="1 CUDA device"):
        device_for("auto", rank1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for("auto", rank1) == "cpu"
    assert threads_per_rank(2, {}, cores=16) == 8 and threads_per_rank(3, {}, cores=2) == 1
    assert threads_per_rank(2, {"OMP_NUM_THREADS": "1"}, cores=16) == 8  # torchrun's own default
    assert threads_per_rank(2, {"OMP_NUM_THREADS": "3"}, cores=16) == 3  # the user's choice


def test_parts_write_what_one_process_writes(setup, capsys):
    root, ckpt = setup
    out = root / "B"
    capsys.readouterr()
    # an existing output of part 1 changes neither part's share (part 0 still has k01, l02, s03)
    out.mkdir()
    (out / "kidney_10.nii.gz").write_bytes((root / "A" / "kidney_10.nii.gz").read_bytes())
    common = ("-i", root / "in", "-o", out, "-m", ckpt, "--device", "cpu", "--no-tta", "--num-parts", 2)
    assert _predict(*common, "--part-id", 0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.pop(0).startswith("part 0/2: sliding window: ")
    assert [ln.split(":")[0] for ln in lines[:-1]] == ["kidney_01", "liver_02", "spleen_03"]
    assert lines[-1].startswith("part 0/2: predicted 3 case(s)")
    assert _predict(*common, "--part-id", 1) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.pop(0).startswith("part 1/2: sliding window: ")
    assert [ln.split(":")[0] for ln in lines[:-1]] == ["liver_07"]
    assert lines[-1].startswith("part 1/2: predicted 1 case(s)") and "skipped 1 with existing output" in lines[-1]
    _assert_same_predictions(root / "A", out)


def test_torchrun_ranks_write_what_one_process_writes(setup):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed (torchrun)")
    root, ckpt = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unetrpp.cli.main", "predict", "-i", str(root / "in"), "-o", str(root / "C"), "-m", str(ckpt),
           "--device", "cpu", "--no-tta"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = sorted(ln for ln in done.stdout.splitlines() if "predicted" in ln)
    assert [s.split(" case(s)")[0] for s in summaries] == ["part 0/2: predicted 3", "part 1/2: predicted 2"]
    _assert_same_predictions(root / "A", root / "C")


@pytest.mark.parametrize(("flags", "message"), [
    (["--part-id", "2", "--num-parts", "2"], "--part-id 2: must be 0 to 1 for --num-parts 2"),
    (["--part-id", "0", "--num-parts", "0"], "--num-parts 0: must be at least 1"),
    (["--part-id", "1"], "--part-id 1: needs --num-parts"),
    (["--num-parts", "3"], "--num-parts 3: needs --part-id"),
])
def test_bad_parts_are_one_line_errors(tmp_path, capsys, flags, message):
    # checked before the model is read or any case is looked at: a missing model and input do not matter
    code = main(["predict", "-i", str(tmp_path / "none"), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "m.pt"),
                 *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_part_id_under_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    code = main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "m.pt"),
                 "--part-id", "0", "--num-parts", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "under torchrun" in err


def test_concurrent_write_probes_do_not_collide(tmp_path):
    """Ranks probe the shared output folder at once: each probe has its own name, and none is left behind."""
    folder = tmp_path / "new" / "out"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def probe():
        start.wait()
        try:
            for _ in range(20):
                check_writable(folder, "predictions")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and list(folder.iterdir()) == []
