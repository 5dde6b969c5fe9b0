"""Models as artefacts: ensembles, postprocessing chosen on cross-validation, model packages, show-model."""

import json
import zipfile

import numpy as np
import pytest
import torch

from unetrpp.checkpoint import save_checkpoint
from unetrpp.cli.main import main
from unetrpp.inference import Predictor
from unetrpp.inference.model import load_model, read_package
from unetrpp.inference.postprocess import apply_postprocessing, choose_postprocessing, keep_largest_component
from unetrpp.io import Geometry, read_image, write_image
from unetrpp.network.presets import create_model

PATCH = (16, 32, 32)
TINY = dict(img_size=PATCH, feature_size=8, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1), proj_size=16,
            decoder_proj_size=16, out_channels=3)  # fmt: skip
LABELS = {"background": 0, "a": 1, "b": 2}


def _plans(spacing=(2.0, 1.0, 1.0)):
    return {"target_spacing": list(spacing), "patch_size": list(PATCH), "channel_names": ["CT"], "labels": LABELS,
            "normalization": [{"channel": "CT", "scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0, "std": 80.0}],
            "resampling": {"image_order": 3, "label_order": 1, "anisotropy_threshold": 3,
                           "low_resolution_axis_order": 0}}  # fmt: skip


def _checkpoint(path, seed, spacing=(2.0, 1.0, 1.0), fold=0):
    torch.manual_seed(seed)
    model = create_model("synapse", **TINY).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model_config": model.config.to_dict(), "plans": _plans(spacing), "labels": LABELS,
                     "channel_names": ["CT"], "state_dict": model.state_dict(),
                     "train_config": {"recipe": "short", "optimizer": "adamw", "lr": 0.003, "fold": fold,
                                      "device": "cpu"},
                     "history": [{"epoch": 0, "iterations": 5, "train_loss": 1.0}], "elapsed": 12.0}, path)
    return path


def _volume(path, seed=0, shape=(20, 40, 36)):
    rng = np.random.default_rng(seed)
    img = rng.normal(40, 120, shape).astype(np.float32)
    img[5:15, 10:30, 8:28] += 200
    write_image(img, Geometry.identity((2.0, 1.0, 1.0)), path)
    return path


def test_ensemble_equals_the_mean_of_its_members_probabilities(tmp_path):
    a, b = _checkpoint(tmp_path / "a.pt", 0), _checkpoint(tmp_path / "b.pt", 1)
    vol = _volume(tmp_path / "x.nii.gz")
    pa = Predictor.from_checkpoint(a, device="cpu", tta=False).predict(vol, return_probabilities=True)
    pb = Predictor.from_checkpoint(b, device="cpu", tta=False).predict(vol, return_probabilities=True)
    ens = Predictor.from_model([a, b], device="cpu", tta=False).predict(vol, return_probabilities=True)
    mean = (pa.probabilities + pb.probabilities) / 2
    np.testing.assert_allclose(ens.probabilities, mean, atol=1e-6)
    assert not np.allclose(pa.probabilities, pb.probabilities, atol=1e-3)  # the members differ
    # the label is the arg-max of the averaged (preprocessed-grid) probabilities, restored
    assert (ens.label == mean.argmax(0)).mean() > 0.999
    # members trained at different spacings are averaged on the input's grid
    c = _checkpoint(tmp_path / "c.pt", 1, spacing=(3.0, 1.5, 1.5))
    pc = Predictor.from_checkpoint(c, device="cpu", tta=False).predict(vol, return_probabilities=True)
    mixed = Predictor.from_model([a, c], device="cpu", tta=False).predict(vol, return_probabilities=True)
    np.testing.assert_allclose(mixed.probabilities, (pa.probabilities + pc.probabilities) / 2, atol=1e-6)
    np.testing.assert_array_equal(mixed.label, mixed.probabilities.argmax(0))
    # the CLI takes several models
    assert main(["predict", "-i", str(vol), "-o", str(tmp_path / "out.nii.gz"), "-m", str(a), str(b),
                 "--no-tta", "--device", "cpu"]) == 0
    np.testing.assert_array_equal(read_image(tmp_path / "out.nii.gz")[0], ens.label)


def test_models_with_different_labels_are_not_ensembled(tmp_path):
    a = _checkpoint(tmp_path / "a.pt", 0)
    torch.manual_seed(0)
    model = create_model("synapse", **TINY).eval()
    other = {"background": 0, "x": 1, "y": 2}
    save_checkpoint({"model_config": model.config.to_dict(), "plans": {**_plans(), "labels": other}, "labels": other,
                     "state_dict": model.state_dict()}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"labels .* differ"):
        load_model([a, tmp_path / "b.pt"])


def _blob(shape, centre, r):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= r * r


def test_keep_largest_component():
    m = _blob((20, 20, 20), (5, 5, 5), 3) | _blob((20, 20, 20), (15, 15, 15), 2)
    keep = keep_largest_component(m)
    np.testing.assert_array_equal(keep, _blob((20, 20, 20), (5, 5, 5), 3))
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # 26-connected: one component
    assert keep_largest_component(diagonal).sum() == 2


def _cv_cases(n=4):
    """Class 1: a true organ plus a spurious distant speck (largest component helps); class 2: the reference
    is two separate parts, both predicted (keeping the largest would lose one)."""
    shape = (24, 24, 24)
    out = []
    for i in range(n):
        ref = np.zeros(shape, np.uint8)
        ref[_blob(shape, (6, 6, 6), 4)] = 1
        ref[_blob(shape, (18, 6, 18), 3)] = 2
        ref[_blob(shape, (18, 18, 6), 3 + i % 2)] = 2
        pred = ref.copy()
        pred[_blob(shape, (20, 20, 20), 1)] = 1  # false positive speck
        pred[_blob(shape, (6, 6, 6), 4) & (np.indices(shape)[0] == 2)] = 0  # a little under-segmentation
        out.append((f"case{i}", ref, pred))
    return out


def test_postprocessing_is_chosen_where_it_raises_cv_dice_and_never_lowers_it():
    cases = _cv_cases()
    post, cv = choose_postprocessing(iter(cases), [1, 2])
    assert post["largest_component"] == [1] and post["foreground_as_one"] is False
    for c in ("1", "2"):
        assert cv["dice_after"][c] >= cv["dice_before"][c]
    assert cv["dice_after"]["1"] > cv["dice_before"]["1"] + 0.01
    assert cv["dice_after"]["2"] == cv["dice_before"]["2"]
    # applied: the speck goes, class 2's two parts stay
    _, ref, pred = cases[0]
    out = apply_postprocessing(pred, post)
    assert out[20, 20, 20] == 0 and (out == 2).sum() == (pred == 2).sum()
    assert (out == 1).sum() == (pred == 1).sum() - _blob(ref.shape, (20, 20, 20), 1).sum()
    # a postprocessing that would lower a class's Dice is never chosen: predictions already clean
    clean = [(n, r, r.copy()) for n, r, _ in cases]
    post2, cv2 = choose_postprocessing(iter(clean), [1, 2])
    assert post2["largest_component"] == [] and not post2["foreground_as_one"]
    assert cv2["dice_after"] == cv2["dice_before"]


def _dataset_with_runs(root, n=6):
    """A dataset of ``n`` cases, a 2-fold split and two finished runs whose validation holds predictions
    with a spurious class-1 speck (one case of fold 1 left unpredicted, as a time budget would)."""
    cases = _cv_cases(n)
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    g = Geometry.identity((2.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    for name, ref, _ in cases:
        write_image((rng.normal(0, 50, ref.shape) + 150.0 * ref).astype(np.float32), g,
                    root / "imagesTr" / f"{name}_0000.nii.gz")
        write_image(ref, g, root / "labelsTr" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                   "numTraining": n, "file_ending": ".nii.gz"}))
    names = [c[0] for c in cases]
    splits = [{"train": names[n // 2:], "val": names[: n // 2]}, {"train": names[: n // 2], "val": names[n // 2:]}]
    (root / "splits.json").write_text(json.dumps(splits))
    runs = []
    for fold in (0, 1):
        run = root / "results" / f"unetrpp_fold{fold}"
        _checkpoint(run / "checkpoint_final.pt", fold, fold=fold)
        (run / "train_config.json").write_text(json.dumps({"fold": fold}))
        for name, _, pred in cases:
            if name in splits[fold]["val"] and not (fold == 1 and name == splits[1]["val"][-1]):
                write_image(pred, g, run / "validation" / f"{name}.nii.gz")
        runs.append(run)
    return runs, splits


def test_find_best_export_model_and_predict_from_the_package(tmp_path, capsys):
    runs, splits = _dataset_with_runs(tmp_path / "D")
    missing = runs[1] / "validation" / f"{splits[1]['val'][-1]}.nii.gz"
    assert main(["find-best", *map(str, runs), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "predicting 1 of 3 validation case(s)" in out and missing.is_file()
    post = json.loads((tmp_path / "D" / "results" / "postprocessing.json").read_text())
    cv = json.loads((tmp_path / "D" / "results" / "cross_validation.json").read_text())
    assert post["runs"] == ["unetrpp_fold0", "unetrpp_fold1"] and cv["cases"] == 6
    assert 1 in post["largest_component"]
    for c in ("1", "2"):
        assert cv["dice_after"][c] >= cv["dice_before"][c]
    csv = (tmp_path / "D" / "results" / "cross_validation.csv").read_text().splitlines()
    assert csv[0] == "case,a before,a after,b before,b after" and csv[-1].startswith("mean,") and len(csv) == 8
    # predict -m RUN RUN finds the postprocessing beside the runs and applies it
    vol = _volume(tmp_path / "x.nii.gz")
    ens = load_model(runs)
    assert ens.postprocessing["largest_component"] == post["largest_component"] and len(ens.members) == 2
    assert load_model(runs[:1]).postprocessing is None  # chosen for both runs, not for one
    assert main(["predict", "-i", str(vol), "-o", str(tmp_path / "p_runs"), "-m", *map(str, runs), "--no-tta",
                 "--device", "cpu"]) == 0
    assert "postprocessing largest component of class" in capsys.readouterr().out
    # the package: predicts the same, holds no pickle, says what it is
    assert main(["export-model", *map(str, runs), str(tmp_path / "model.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "model.zip") as zf:
        assert sorted(zf.namelist()) == ["model.json", "unetrpp_fold0.safetensors", "unetrpp_fold1.safetensors"]
    assert main(["predict", "-i", str(vol), "-o", str(tmp_path / "p_zip"), "-m", str(tmp_path / "model.zip"),
                 "--no-tta", "--device", "cpu"]) == 0
    a, ga = read_image(tmp_path / "p_runs" / "x.nii.gz")
    b, gb = read_image(tmp_path / "p_zip" / "x.nii.gz")
    np.testing.assert_array_equal(a, b)
    assert ga.spacing_zyx == gb.spacing_zyx
    capsys.readouterr()
    assert main(["show-model", str(tmp_path / "model.zip")]) == 0
    shown = capsys.readouterr().out
    assert "networks: 2 (an ensemble" in shown and "1 a, 2 b" in shown and "short recipe, adamw lr 0.003" in shown
    assert "cross-validation: 6 case(s)" in shown
    assert main(["show-model", str(tmp_path / "model.zip"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in info["networks"]] == ["unetrpp_fold0", "unetrpp_fold1"]
    assert info["networks"][0]["training"]["epochs"] == 1
    # exporting again refuses to overwrite unless asked
    assert main(["export-model", str(runs[0]), str(tmp_path / "model.zip")]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_package_folder_round_trips_and_damage_is_refused(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.pt", 0)
    assert main(["export-model", str(a), str(tmp_path / "pkg")]) == 0
    vol = _volume(tmp_path / "x.nii.gz")
    ref = Predictor.from_checkpoint(a, device="cpu", tta=False).predict(vol)
    got = Predictor.from_model(tmp_path / "pkg", device="cpu", tta=False).predict(vol)
    np.testing.assert_array_equal(ref.label, got.label)
    manifest = json.loads((tmp_path / "pkg" / "model.json").read_text())
    # a weights name that leaves the package
    bad = tmp_path / "bad1"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({**manifest, "members": [
        {**manifest["members"][0], "weights": "../pkg/a.safetensors"}]}))
    with pytest.raises(ValueError, match="inside the package"):
        read_package(bad)
    # edited weights
    import safetensors.torch as st

    weights = tmp_path / "pkg" / manifest["members"][0]["weights"]
    assert weights.name == "a.safetensors"
    state = st.load_file(str(weights))
    key = next(iter(state))
    state[key] = state[key] + 1
    st.save_file(state, str(weights))
    with pytest.raises(ValueError, match="checksum"):
        read_package(tmp_path / "pkg")
    # random bytes as a zip; a zip without the manifest
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04" + bytes(range(200)))
    assert main(["predict", "-i", str(vol), "-o", str(tmp_path / "o.nii.gz"), "-m", str(tmp_path / "junk.zip")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.zip" in err
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match=r"lacks model\.json"):
        read_package(tmp_path / "empty.zip")


def test_hostile_packages_and_postprocessing_files_are_one_line_errors(tmp_path, capsys):
    from tests.cli.test_hostile import _one_line_error

    a = _checkpoint(tmp_path / "a.pt", 0)
    assert main(["export-model", str(a), str(tmp_path / "pkg")]) == 0
    manifest = json.loads((tmp_path / "pkg" / "model.json").read_text())
    member = manifest["members"][0]
    weights = (tmp_path / "pkg" / member["weights"]).read_bytes()

    def package(name, manifest=manifest, files=None):
        with zipfile.ZipFile(tmp_path / name, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("model.json", json.dumps(manifest))
            for n, blob in (files or {member["weights"]: weights}).items():
                zf.writestr(n, blob)
        return tmp_path / name

    # a member that inflates far beyond what its network's weights can be: refused before it is read
    bomb = package("bomb.zip", files={member["weights"]: bytes(64 << 20)})
    _one_line_error(capsys, ["show-model", bomb], "bomb.zip", "bytes")
    # weights of the right shapes but integer type; labels giving two classes one value
    import safetensors.torch as st

    state = st.load(weights)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(torch.int32)
    ints = package("ints.zip", {**manifest, "members": [{**member, "weights_sha256": None}]},
                   {member["weights"]: st.save(state)})
    _one_line_error(capsys, ["show-model", ints], key, "int32")
    twice = package("twice.zip", {**manifest, "labels": {"background": 0, "a": 1, "b": 1}})
    _one_line_error(capsys, ["show-model", twice], "each class one value")
    # a postprocessing.json of the wrong shape beside the runs: one line naming it, for every command
    runs, _ = _dataset_with_runs(tmp_path / "D")
    pp = tmp_path / "D" / "results" / "postprocessing.json"
    pp.write_text(json.dumps({"format": "unetrpp-postprocessing", "version": 1, "largest_component": [1],
                              "runs": 5}))
    _one_line_error(capsys, ["show-model", *runs], str(pp), "runs must be a list")
    pp.write_text(json.dumps({"format": "unetrpp-postprocessing", "version": 1, "largest_component": [1],
                              "runs": [r.name for r in runs],
                              "cross_validation": {"cases": 3, "mean_dice_before": None, "dice_before": {"1": None}}}))
    assert main(["show-model", *map(str, runs)]) == 0
    assert "mean Dice n/a -> n/a" in capsys.readouterr().out
    # export --overwrite never replaces a file that is not a package
    (tmp_path / "notes.zip").write_bytes(b"mine")
    _one_line_error(capsys, ["export-model", a, tmp_path / "notes.zip", "--overwrite"], "not a model package")
    assert (tmp_path / "notes.zip").read_bytes() == b"mine"


def test_find_best_refuses_predictions_that_are_not_label_maps_of_the_dataset(tmp_path, capsys):
    from tests.cli.test_hostile import _one_line_error

    runs, splits = _dataset_with_runs(tmp_path / "D")
    bad = runs[0] / "validation" / f"{splits[0]['val'][0]}.nii.gz"
    ref, g = read_image(bad)
    write_image(ref.astype(np.float32) / 2, g, bad)
    _one_line_error(capsys, ["find-best", *runs], str(bad), "integer labels")
    labels = ref.astype(np.uint8)
    labels[0, 0, 0] = 7
    write_image(labels, g, bad)
    _one_line_error(capsys, ["find-best", *runs], str(bad), "[7]")
    assert not (tmp_path / "D" / "results" / "postprocessing.json").exists()
