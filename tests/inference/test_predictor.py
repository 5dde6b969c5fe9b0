"""Sliding window, Gaussian weighting, TTA, the predictor and its geometry, the predict/overlay CLIs."""

import itertools
import shutil

import numpy as np
import pytest
import torch

from tests.official_fixture import SHARED, require_shared
from tests.volumes import GEOMETRIES, write_dicom_series
from unetrpp.checkpoint import save_checkpoint
from unetrpp.cli.main import main
from unetrpp.data.restore import restore_label_from_probabilities, restore_probabilities
from unetrpp.inference import Predictor, gaussian_importance, sliding_window_probabilities, window_starts
from unetrpp.io import Geometry, read_image, write_image
from unetrpp.network.presets import create_model

PATCH = (16, 32, 32)
TINY = dict(img_size=PATCH, feature_size=8, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1), proj_size=16,
            decoder_proj_size=16, out_channels=3)  # fmt: skip


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = create_model("synapse", **TINY).eval()
    m.deep_supervision = False
    return m


def _plans(spacing=(2.0, 1.0, 1.0), patch=PATCH):
    return {"target_spacing": list(spacing), "patch_size": list(patch), "channel_names": ["CT"],
            "labels": {"background": 0, "a": 1, "b": 2}, "num_classes": 3,
            "normalization": [{"channel": "CT", "scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0,
                               "std": 80.0}],
            "resampling": {"image_order": 3, "label_order": 1, "anisotropy_threshold": 3,
                           "low_resolution_axis_order": 0}}  # fmt: skip


def _checkpoint(path, model, plans):
    save_checkpoint({"model_config": model.config.to_dict(), "plans": plans, "labels": plans["labels"],
                     "state_dict": model.state_dict()}, path)
    return path


def test_gaussian_importance_map():
    g = gaussian_importance((16, 32, 40)).numpy()
    assert g.shape == (16, 32, 40) and g.dtype == np.float32
    assert g[8, 16, 20] == 1.0 and g.max() == 1.0 and g.min() > 0
    # sigma = patch / 8 along each axis: one sigma from the centre the weight is exp(-1/2)
    assert g[8 + 2, 16, 20] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert g[8, 16 + 4, 20] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert g[8, 16, 20 + 5] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert np.allclose(g[8 - 3], g[8 + 3]) and np.allclose(g[:, :, 20 - 7], g[:, :, 20 + 7])


def test_window_positions():
    assert window_starts(64, 64, 0.5) == [0]
    assert window_starts(100, 64, 0.5) == [0, 18, 36]  # ceil(36 / 32) + 1 = 3, evenly spaced
    assert window_starts(200, 64, 0.5) == [0, 27, 54, 82, 109, 136]  # 136 / 5 = 27.2 apart, rounded
    assert window_starts(100, 64, 1.0) == [0, 36]
    with pytest.raises(ValueError, match="smaller than the patch"):
        window_starts(10, 16, 0.5)


def test_single_patch_equals_one_forward_pass_with_and_without_tta():
    model = _tiny()
    x = torch.randn(1, *PATCH)
    with torch.no_grad():
        direct = torch.softmax(model(x[None]), 1)[0]
        flips = [list(a) for r in range(4) for a in itertools.combinations((2, 3, 4), r)]
        mirrored = sum(torch.flip(torch.softmax(model(torch.flip(x[None], d)), 1), d) for d in flips)[0] / 8
    plain = sliding_window_probabilities(model, x, PATCH, 3, mirror_axes=())
    tta = sliding_window_probabilities(model, x, PATCH, 3)
    torch.testing.assert_close(plain, direct, atol=1e-6, rtol=0)
    torch.testing.assert_close(tta, mirrored, atol=1e-6, rtol=0)
    assert not torch.allclose(plain, tta, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 20, 40, 50), (1, 10, 20, 30), (1, 16, 32, 70)])
def test_output_shapes_tta_off_and_on(shape):
    model = _tiny()
    x = torch.randn(*shape)
    for axes in ((), (0, 1, 2)):
        p = sliding_window_probabilities(model, x, PATCH, 3, mirror_axes=axes, batch=3)
        assert p.shape == (3, *shape[1:]) and p.dtype == torch.float32
        torch.testing.assert_close(p.sum(0), torch.ones(shape[1:]), atol=1e-5, rtol=0)


def test_overlapping_windows_blend_to_a_constant_when_the_network_is_constant():
    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 2, *x.shape[2:])
            out[:, 1] = 1.0
            return out

    p = sliding_window_probabilities(Constant(), torch.zeros(1, 40, 70, 90), PATCH, 2, step=0.25)
    torch.testing.assert_close(p[1], torch.full((40, 70, 90), float(torch.softmax(torch.tensor([0.0, 1.0]), 0)[1])))


def test_label_restore_by_class_equals_full_resample_then_argmax():
    rng = np.random.default_rng(0)
    props = {"shape": [30, 40, 44], "bbox": [[2, 28], [5, 37], [0, 44]], "shape_after_crop": [26, 32, 44],
             "spacing": [3.0, 0.8, 0.8], "target_spacing": [2.0, 1.1, 1.3], "shape_after_resampling": [39, 23, 27]}
    logits = torch.from_numpy(rng.normal(size=(4, 39, 23, 27)).astype(np.float32))
    probs = torch.softmax(torch.from_numpy(
        np.asarray(torch.nn.functional.avg_pool3d(logits[None], 5, 1, 2)[0])) * 8, 0).numpy()
    full = restore_probabilities(probs, props)
    streamed = restore_label_from_probabilities(probs, props)
    assert streamed.shape == (30, 40, 44)
    assert np.mean(streamed == full.argmax(0)) > 0.999  # ties at 1e-7 aside, the same arg-max
    assert (streamed[:2] == 0).all() and (streamed[28:] == 0).all()


@pytest.mark.parametrize(("geometry", "ending"), [("lps", ".nii.gz"), ("oblique", ".nii.gz"), ("ras", ".nrrd"),
                                                  ("oblique", ".mha")])
def test_predict_keeps_input_geometry_and_format(tmp_path, geometry, ending, capsys):
    geom = GEOMETRIES[geometry]
    rng = np.random.default_rng(1)
    image = rng.normal(40, 60, (18, 30, 27)).astype(np.int16)
    write_image(image, geom, tmp_path / "in" / f"case{ending}")
    ckpt = _checkpoint(tmp_path / "m.pt", _tiny(), _plans(spacing=(2.0, 1.0, 1.0)))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(out), "-m", str(ckpt), "--no-tta",
                 "--preview"]) == 0
    label, g = read_image(out / f"case{ending}")
    assert label.shape == image.shape and g.matches(geom, tol=1e-5)
    assert set(np.unique(label)) <= {0, 1, 2}
    assert (out / "case.png").read_bytes()[:4] == b"\x89PNG"
    # a second call skips the existing output; the log says how the sliding window runs
    capsys.readouterr()
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(out), "-m", str(ckpt)]) == 0
    assert "sliding window: constant windows computed once, mirrored passes where the margin < 0.3, on the " \
           "driver's windows, mirroring, 8 passes per forward call" in capsys.readouterr().out
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(out), "-m", str(ckpt), "--exact",
                 "--batch", "3"]) == 0
    assert "sliding window: exact protocol, mirroring, 3 windows per forward call" in capsys.readouterr().out


def test_predict_dicom_series_and_python_api(tmp_path):
    geom = GEOMETRIES["oblique"]
    rng = np.random.default_rng(2)
    image = rng.normal(40, 60, (12, 24, 20)).astype(np.int16)
    write_dicom_series(image, geom, tmp_path / "series")
    ckpt = _checkpoint(tmp_path / "m.pt", _tiny(), _plans())
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "-i", str(tmp_path / "series"), "-o", str(out), "-m", str(ckpt), "--no-tta",
                 "--save-probabilities"]) == 0
    label, g = read_image(out)
    _, g_in = read_image(tmp_path / "series")
    assert label.shape == image.shape and g.matches(g_in, tol=1e-4)
    npz = np.load(tmp_path / "seg.npz")
    assert npz["probabilities"].shape == (3, *image.shape) and list(npz["classes"]) == ["background", "a", "b"]
    probs = npz["probabilities"].astype(np.float32)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=3e-3)
    top2 = np.sort(probs, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-2  # float16 storage may flip near-ties only
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(probs.argmax(0)[clear], label[clear])
    # the Python API on an array gives the same labels
    result = Predictor.from_checkpoint(ckpt, device="cpu", tta=False).predict(image, geometry=g_in)
    np.testing.assert_array_equal(result.label, label)
    with pytest.raises(ValueError, match="spacing"):
        Predictor.from_checkpoint(ckpt, device="cpu").predict(image.astype(np.float32))


def test_predict_errors_are_one_line(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.pt", _tiny(), _plans())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "bad.pt")]) == 2
    assert "bad.pt: not a loadable unetrpp checkpoint" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "-m", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "broken.nii.gz").exists()


def test_overlay_cli(tmp_path, capsys):
    geom = Geometry.identity((3.0, 1.0, 1.0))
    image = np.random.default_rng(0).normal(0, 100, (10, 40, 40)).astype(np.int16)
    label = np.zeros_like(image, dtype=np.uint8)
    label[3:7, 10:20, 10:25] = 6
    write_image(image, geom, tmp_path / "img.nii.gz")
    write_image(label, geom, tmp_path / "lab.nii.gz")
    assert main(["overlay", str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz"), str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"
    write_image(label[:, :30], geom, tmp_path / "small.nii.gz")
    assert main(["overlay", str(tmp_path / "img.nii.gz"), str(tmp_path / "small.nii.gz"), str(tmp_path / "x.png")]) == 2
    assert "differs" in capsys.readouterr().err


def test_predict_real_abdominal_ct_end_to_end_on_cpu(tmp_path):
    """The synapse network at its own patch size, on the real CT (3 mm, 30 x 101 x 122), no training needed."""
    src = require_shared(SHARED / "data" / "abdomen_ct")
    shutil.copy(src / "ct.nii.gz", tmp_path / "ct.nii.gz")
    torch.manual_seed(0)
    model = create_model("synapse")
    plans = _plans(spacing=(3.0, 3.0, 3.0), patch=(64, 128, 128))
    plans["labels"] = {"background": 0, **{f"organ{i}": i for i in range(1, 14)}}
    ckpt = _checkpoint(tmp_path / "synapse.pt", model, plans)
    assert main(["predict", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "seg.nii.gz"), "-m", str(ckpt),
                 "--no-tta", "--device", "cpu"]) == 0
    label, g = read_image(tmp_path / "seg.nii.gz")
    image, g_in = read_image(tmp_path / "ct.nii.gz")
    assert label.shape == image.shape == (30, 101, 122) and g.matches(g_in, tol=1e-6)
    assert label.max() < 14
