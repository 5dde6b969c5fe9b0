"""``unetrpp import-official``: official (nnU-Net v1) checkpoint + plans pickle -> a model package that predicts
exactly like our own pipeline with the same weights and the equivalent plans; hostile pickles refused."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load

from tests.cli.test_hostile import _one_line_error
from unetrpp.cli.main import main
from unetrpp.data.convert import BTCV_LABELS
from unetrpp.data.plans import Plans
from unetrpp.inference.model import load_model
from unetrpp.inference.official_import import SafeUnpickler, safe_unpickle
from unetrpp.inference.predictor import Predictor
from unetrpp.io import Geometry, read_image, write_image
from unetrpp.network.presets import create_model

PATCH = (16, 32, 32)
CT = {"mean": 50.0, "sd": 120.0, "percentile_00_5": -500.0, "percentile_99_5": 400.0}


# ---------------------------------------------------------------------- official-layout files
def _tiny(out_channels: int, feature_size: int, seed: int = 0):
    torch.manual_seed(seed)
    m = create_model("synapse", img_size=PATCH, feature_size=feature_size, depths=(1, 1, 1, 1),
                     decoder_depths=(1, 1, 1), proj_size=16, decoder_proj_size=16, out_channels=out_channels)
    with torch.no_grad():  # move gamma etc. off their init so every path shapes the output
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _block_key(sub: str, v: torch.Tensor, kv: str) -> list[tuple[str, torch.Tensor]]:
    """One of our TransformerBlock keys -> the official key(s) (inverse of ``network.weights``)."""
    same = {"gamma", "pos_embed", "norm.weight", "norm.bias"}
    if sub in same:
        return [(sub, v)]
    if sub in ("attn.temperature_channel", "attn.temperature_spatial"):
        name = "temperature" if sub.endswith("channel") else "temperature2"
        return [(f"epa_block.{name}", v.reshape(-1, 1, 1))]
    if sub == "attn.qkvv.weight":
        return [("epa_block.qkvv.weight", v)]
    if m := re.fullmatch(r"attn\.proj_kv\.(weight|bias)", sub):
        if kv == "shared_nobias":
            return [("epa_block.EF", v.t().contiguous())]
        return [(f"epa_block.E.{m[1]}", v), (f"epa_block.F.{m[1]}", v)]  # one Linear stored twice
    if m := re.fullmatch(r"attn\.proj_(k|v)\.(weight|bias)", sub):
        return [(f"epa_block.{'E' if m[1] == 'k' else 'F'}.{m[2]}", v)]
    if m := re.fullmatch(r"attn\.out_(spatial|channel)\.(weight|bias)", sub):
        return [(f"epa_block.{'out_proj' if m[1] == 'spatial' else 'out_proj2'}.{m[2]}", v)]
    if sub == "proj.weight":
        return [("conv8.1.weight", v[:, :, None, None, None])]
    if sub == "proj.bias":
        return [("conv8.1.bias", v)]
    if m := re.fullmatch(r"convs\.(\d)\.(conv[12])\.weight", sub):
        return [(f"conv5{int(m[1]) + 1}.{m[2]}.conv.weight", v)]
    if m := re.fullmatch(r"convs\.(\d)\.(norm[12]\.\w+)", sub):
        return [(f"conv5{int(m[1]) + 1}.{m[2]}", v)]
    raise KeyError(sub)


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """Our model's weights in the official UNETR_PP key layout (spec section 2.2)."""
    kv = model.config.kv_proj
    dec = {"0": 5, "1": 4, "2": 3}
    rules = [
        (r"downsample\.(\d)\.conv\.weight", lambda m: f"unetr_pp_encoder.downsample_layers.{m[1]}.0.conv.weight"),
        (r"downsample\.(\d)\.norm\.(\w+)", lambda m: f"unetr_pp_encoder.downsample_layers.{m[1]}.1.{m[2]}"),
        (r"decoder\.(\d)\.up\.weight", lambda m: f"decoder{dec[m[1]]}.transp_conv.conv.weight"),
        (r"stem_block\.conv([12])\.weight", lambda m: f"encoder1.conv{m[1]}.conv.weight"),
        (r"stem_block\.skip\.weight", lambda m: "encoder1.conv3.conv.weight"),
        (r"final\.up\.weight", lambda m: "decoder2.transp_conv.conv.weight"),
        (r"final\.block\.conv([12])\.weight", lambda m: f"decoder2.decoder_block.0.conv{m[1]}.conv.weight"),
        (r"heads\.(\d)\.(weight|bias)", lambda m: f"out{int(m[1]) + 1}.conv.conv.{m[2]}"),
    ]
    out: dict[str, torch.Tensor] = {}
    for key, v in model.state_dict().items():
        v = v.detach().clone()
        if m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(.+)", key):
            prefix = f"unetr_pp_encoder.stages.{m[1]}.{m[2]}."
        elif m := re.fullmatch(r"decoder\.(\d)\.blocks\.(\d+)\.(.+)", key):
            prefix = f"decoder{dec[m[1]]}.decoder_block.0.{m[2]}."
        else:
            for pattern, build in rules:
                if r := re.fullmatch(pattern, key):
                    out[build(r)] = v
                    break
            else:
                raise KeyError(key)
            continue
        for sub, value in _block_key(m[3], v, kv):
            out[prefix + sub] = value
    return out


def v1_info(spacing, patch=PATCH, transpose=(0, 1, 2), classes: int = 13, fold: int = 0) -> dict:
    """Checkpoint info as nnU-Net v1's ``nnUNetTrainer.save_checkpoint`` pickles it (plans included)."""
    forward = list(transpose)
    stage = collections.OrderedDict(
        batch_size=2, num_pool_per_axis=[3, 3, 3], patch_size=np.array(patch),
        median_patient_size_in_voxels=np.array([90, 210, 210]), current_spacing=np.array(spacing, dtype=np.float64),
        original_spacing=np.array(spacing, dtype=np.float64), do_dummy_2D_data_aug=False,
        pool_op_kernel_sizes=[[2, 4, 4], [2, 2, 2], [2, 2, 2]], conv_kernel_sizes=[[3, 3, 3]] * 4)
    intensity = collections.OrderedDict({0: {k: np.float64(v) for k, v in {**CT, "median": 60.0, "min": -1000.0,
                                                                           "max": 2000.0}.items()}})
    plans = {
        "num_stages": 1, "num_modalities": 1, "modalities": {0: "CT"},
        "normalization_schemes": collections.OrderedDict({0: "CT"}),
        "dataset_properties": {"all_spacings": [np.array([3.0, 0.8, 0.8])], "all_sizes": [np.array([90, 512, 512])],
                               "modalities": {0: "CT"}, "intensityproperties": intensity,
                               "all_classes": list(range(1, classes + 1))},
        "list_of_npz_files": ["/data/Task002_Synapse/img0001.npz"], "original_spacings": [np.array([3.0, 0.8, 0.8])],
        "original_sizes": [np.array([90, 512, 512])],
        "preprocessed_data_folder": "/data/nnFormer_preprocessed/Task002_Synapse",
        "num_classes": classes, "all_classes": list(range(1, classes + 1)), "base_num_features": 32,
        "use_mask_for_norm": collections.OrderedDict({0: False}), "keep_only_largest_region": None,
        "min_region_size_per_class": None, "min_size_per_class": None,
        "transpose_forward": forward, "transpose_backward": [int(a) for a in np.argsort(forward)],
        "data_identifier": "nnFormerData_plans_v2.1", "plans_per_stage": {0: stage},
        "preprocessor_name": "GenericPreprocessor", "conv_per_stage": 2,
    }
    info = collections.OrderedDict()
    info["init"] = ("/data/Task002_Synapse/nnFormerPlansv2.1_plans_3D.pkl", fold, "/out/fold_0",
                    "/data/Task002_Synapse", True, 0, True, True, False)
    info["name"] = "unetr_pp_trainer_synapse"
    info["class"] = "<class 'unetr_pp.training.network_training.unetr_pp_trainer_synapse.unetr_pp_trainer_synapse'>"
    info["plans"] = plans
    return info


def _numpy1_names(blob: bytes) -> bytes:
    """Bytes as numpy 1 pickles them (``numpy.core.*``): what the official files hold."""
    return blob.replace(b"numpy._core.", b"numpy.core.")


def write_official(folder, model, info, pkl: bool = True):
    """``model_final_checkpoint.model`` (+ ``.pkl``) in nnU-Net v1's format, numpy-1 global names."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"epoch": 1000, "state_dict": official_state_dict(model), "optimizer_state_dict": None,
            "lr_scheduler_state_dict": None,
            "plot_stuff": ([1.2, 0.9], [1.1, 1.0], [np.float64(0.5), np.float64(0.61)], [np.float64(0.55)]),
            "best_stuff": (998, np.float64(0.873), np.float64(0.871)), "amp_grad_scaler": None}
    buf = io.BytesIO()
    torch.save(ckpt, buf, _use_new_zipfile_serialization=False)  # the legacy format: its pickles can be edited
    path = folder / "model_final_checkpoint.model"
    path.write_bytes(_numpy1_names(buf.getvalue()))
    if pkl:
        (folder / "model_final_checkpoint.model.pkl").write_bytes(_numpy1_names(pickle.dumps(info, protocol=3)))
    return path


def _volume(shape, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-900, 900, size=shape).astype(np.float32)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    x[zz**2 + yy**2 + xx**2 < 0.4] += 300.0  # a bright blob, partly beyond the clip range
    return x


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- import, then predict
def test_import_predicts_like_our_pipeline_with_the_same_plans(tmp_path, capsys):
    model = _tiny(out_channels=14, feature_size=16)
    spacing = (2.0, 1.5, 1.5)
    ckpt = write_official(tmp_path / "fold_0", model, v1_info(spacing))
    pkg = tmp_path / "synapse_pkg.zip"
    assert main(["import-official", str(ckpt), "-o", str(pkg)]) == 0  # the .pkl found beside it
    assert "the official synapse layout" in capsys.readouterr().out

    with zipfile.ZipFile(pkg) as zf:  # read without building the network again
        manifest = json.loads(zf.read("model.json"))
        (entry,) = manifest["members"]
        weights = safetensors_load(zf.read(entry["weights"]))
    plans = Plans.from_dict(entry["plans"])
    assert plans.target_spacing == [2.0, 1.5, 1.5] and plans.patch_size == list(PATCH)
    assert plans.normalization == [{"channel": "CT", "scheme": "ct", "clip": [-500.0, 400.0], "mean": 50.0,
                                    "std": 120.0}]
    assert plans.resampling["image_order"] == 3 and plans.resampling["label_order"] == 1
    assert plans.channel_names == ["CT"] and plans.transpose_forward is None
    assert manifest["labels"] == BTCV_LABELS and plans.labels == BTCV_LABELS  # 14 classes, the synapse network
    assert plans.preset == "synapse" and plans.eval_classes == [1, 2, 3, 4, 6, 7, 8, 11]
    assert entry["model_config"] == plans.network == json.loads(json.dumps(model.config.to_dict()))
    ours = model.state_dict()
    assert weights.keys() == ours.keys() and all(torch.equal(weights[k], ours[k]) for k in ours)
    t = entry["training"]
    assert t["trainer"] == "unetr_pp_trainer_synapse" and t["fold"] == 0 and t["stage"] == 0 and t["epoch"] == 1000
    assert t["checkpoint"] == {"name": "model_final_checkpoint.model", "sha256": _sha(ckpt)}
    assert t["plans_pickle"]["sha256"] == _sha(tmp_path / "fold_0" / "model_final_checkpoint.model.pkl")

    # the same weights, our pipeline, hand-made plans with the same spacing, clip, mean and sd ...
    hand = {"target_spacing": list(spacing), "patch_size": list(PATCH), "channel_names": ["CT"],
            "labels": BTCV_LABELS, "network": model.config.to_dict(),
            "normalization": [{"channel": "CT", "scheme": "ct", "clip": [-500.0, 400.0], "mean": 50.0,
                               "std": 120.0}]}
    image = _volume((10, 48, 48))  # resampled to (15, 32, 32): one window
    geometry = Geometry.identity((3.0, 1.0, 1.0))
    ref = Predictor(model, hand, BTCV_LABELS, device="cpu", tta=False).predict(image, geometry=geometry)
    # ... and `unetrpp predict -m PACKAGE` segment the file alike
    write_image(image, geometry, tmp_path / "scan.nii.gz")
    assert main(["predict", "-i", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "seg.nii.gz"),
                 "-m", str(pkg), "--no-tta", "--device", "cpu"]) == 0
    seg, g = read_image(tmp_path / "seg.nii.gz")
    assert g.spacing_zyx == pytest.approx((3.0, 1.0, 1.0)) and len(np.unique(ref.label)) > 1
    np.testing.assert_array_equal(seg, ref.label)


def test_transposed_plans_are_reproduced_and_label_names_come_from_dataset_json(tmp_path):
    """v1 ``transpose_forward`` [2, 0, 1]: the network sees (x, z, y); the prediction comes back in (z, y, x)."""
    model = _tiny(out_channels=3, feature_size=8, seed=3)
    order = [2, 0, 1]
    spacing_net = (2.0, 1.5, 1.5)  # current_spacing, in the transposed (network) order
    info = v1_info(spacing_net, transpose=order, classes=2, fold=3)
    ckpt = write_official(tmp_path / "fold_3", model, info)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}}))
    pkg = tmp_path / "pkg"
    assert main(["import-official", str(ckpt), str(ckpt) + ".pkl", "-o", str(pkg),
                 "--labels", str(tmp_path / "dataset.json")]) == 0
    imported = load_model(pkg)
    plans = imported.members[0].plans
    assert plans.transpose_forward == order and plans.target_spacing == list(spacing_net)
    assert imported.labels == {"background": 0, "liver": 1, "tumour": 2} and plans.preset is None
    assert imported.members[0].name == "fold3" and imported.members[0].training["fold"] == 3

    image = _volume((48, 48, 10), seed=5)  # (z, y, x) spacing (1, 1, 3): transposed it is (10, 48, 48) at (3, 1, 1)
    kw = dict(device="cpu", tta=False)
    got = Predictor.from_model(imported, **kw).predict(image, spacing=(1.0, 1.0, 3.0), return_probabilities=True)
    hand = {"target_spacing": list(spacing_net), "patch_size": list(PATCH), "channel_names": ["CT"],
            "labels": imported.labels, "network": model.config.to_dict(),
            "normalization": [{"channel": "CT", "scheme": "ct", "clip": [-500.0, 400.0], "mean": 50.0,
                               "std": 120.0}]}
    ref = Predictor(model, hand, **kw).predict(np.ascontiguousarray(image.transpose(order)), spacing=(3.0, 1.0, 1.0),
                                              return_probabilities=True)
    back = [int(a) for a in np.argsort(order)]
    assert got.label.shape == image.shape and len(np.unique(ref.label)) > 1
    np.testing.assert_array_equal(got.label, ref.label.transpose(back))
    np.testing.assert_allclose(got.probabilities, ref.probabilities.transpose(0, *(b + 1 for b in back)),
                               atol=1e-6, rtol=0)
    assert Plans.from_dict(plans.to_dict()).id != Plans.from_dict({**plans.to_dict(), "transpose_forward": None}).id


def test_plans_pickle_numpy1_and_numpy2_names_load(tmp_path):
    info = {"plans": {"a": np.float64(1.5), "b": np.array([1.0, 2.0]), "c": {1, 2}, "d": complex(1, 2),
                      "e": collections.OrderedDict(x=np.int64(3)), "f": b"raw"}}
    blobs = [pickle.dumps(info, protocol=p) for p in (2, 3, 4, 5)]
    blobs += [_numpy1_names(pickle.dumps(info, protocol=p)) for p in (2, 3)]  # text GLOBALs: renaming is safe
    for blob in blobs:
        if True:
            got = SafeUnpickler(io.BytesIO(blob)).load()
            assert got["plans"]["a"] == 1.5 and got["plans"]["b"].tolist() == [1.0, 2.0]
            assert got["plans"]["c"] == {1, 2} and got["plans"]["e"]["x"] == 3 and got["plans"]["f"] == b"raw"


# ---------------------------------------------------------------------- hostile and broken inputs
class _RunsCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _WritesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize(("payload", "global_name"), [(_RunsCommand, "system"), (_WritesFile, "builtins.exec")])
def test_hostile_plans_pickle_is_refused_and_runs_nothing(tmp_path, capsys, payload, global_name):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(payload(proof)))  # the standard unpickler does run the payload
    assert proof.exists()
    model = _tiny(out_channels=3, feature_size=8)
    ckpt = write_official(tmp_path, model, None, pkl=False)
    marker = tmp_path / "pwned"
    info = v1_info((2.0, 1.5, 1.5), classes=2)
    info["plans"]["dataset_properties"]["evil"] = payload(marker)
    (tmp_path / "model_final_checkpoint.model.pkl").write_bytes(pickle.dumps(info))
    err = _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out.zip"],
                          "model_final_checkpoint.model.pkl", global_name, "refused")
    assert "nothing was executed" in err
    assert not marker.exists() and not (tmp_path / "out.zip").exists()
    with pytest.raises(ValueError, match=global_name):
        safe_unpickle(tmp_path / "model_final_checkpoint.model.pkl")
    assert not marker.exists()


def test_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    model = _tiny(out_channels=3, feature_size=8)
    write_official(tmp_path, model, v1_info((2.0, 1.5, 1.5), classes=2))
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "state_dict": official_state_dict(model), "plot_stuff": _RunsCommand(marker)},
               tmp_path / "model_final_checkpoint.model")
    _one_line_error(capsys, ["import-official", tmp_path / "model_final_checkpoint.model", "-o", tmp_path / "out"],
                    "model_final_checkpoint.model", "system", "refused")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_damaged_and_misshapen_plans_pickles(tmp_path, capsys):
    model = _tiny(out_channels=3, feature_size=8)
    ckpt = write_official(tmp_path, model, None, pkl=False)
    pkl = tmp_path / "model_final_checkpoint.model.pkl"
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out"], str(pkl), "no such file")
    _one_line_error(capsys, ["import-official", tmp_path / "nothing.model", "-o", tmp_path / "out"],
                    "nothing.model", "no such file")
    pkl.write_bytes(np.random.default_rng(0).bytes(3000))
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out"], str(pkl), "not a readable pickle")
    pkl.write_bytes(pickle.dumps(info := v1_info((2.0, 1.5, 1.5), classes=2))[:200])  # truncated
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out"], str(pkl), "not a readable pickle")
    pkl.write_bytes(pickle.dumps([1, 2, 3]))
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out"], str(pkl),
                    "not nnU-Net v1 checkpoint info", "list")
    info["plans"]["normalization_schemes"] = {0: "CT2"}
    pkl.write_bytes(pickle.dumps(info))
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out"], str(pkl), "CT2")
    info = v1_info((2.0, 1.5, 1.5), classes=5)  # the weights predict 3 classes
    pkl.write_bytes(pickle.dumps(info))
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out"], str(pkl), "5 foreground classes")
    info = v1_info((2.0, 1.5, 1.5), patch=(32, 32, 32), classes=2)  # not the patch the weights were trained at
    pkl.write_bytes(pickle.dumps(info))
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out"], "first-stage tokens", "--patch-size")
    ckpt.write_bytes(b"not a checkpoint at all")
    _one_line_error(capsys, ["import-official", ckpt, str(pkl), "-o", tmp_path / "out"], str(ckpt))
    assert not (tmp_path / "out").exists()


def test_pickles_that_would_allocate_or_shadow_methods_are_refused_and_outputs_are_not_overwritten(tmp_path, capsys):
    model = _tiny(out_channels=3, feature_size=8)
    ckpt = write_official(tmp_path, model, v1_info((2.0, 1.5, 1.5), classes=2))
    pkl = tmp_path / "model_final_checkpoint.model.pkl"
    good = pkl.read_bytes()
    huge = (2_000_000_000).to_bytes(8, "little")
    bombs = {  # 40-byte pickles asking for gigabytes before any data: refused before the allocation
        "ndarray": b"\x80\x02cnumpy\nndarray\n\x8a\x08" + huge + b"\x85X\x01\x00\x00\x00b\x86R.",
        "object dtype": b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R.",
        "bytearray": b"\x80\x02cbuiltins\nbytearray\n\x8a\x08" + huge + b"\x85R.",
    }
    for what, blob in bombs.items():
        pkl.write_bytes(blob)
        _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out.zip"], str(pkl))
        assert not (tmp_path / "out.zip").exists(), what
    # an OrderedDict whose state gives it an attribute named like a dict method: read as a plain dict
    od = b"\x80\x02ccollections\nOrderedDict\n)R}X\x03\x00\x00\x00getccollections\nOrderedDict\nsb."
    pkl.write_bytes(od)
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "out.zip"], str(pkl), "not a readable pickle")
    # the output: never an input, never replaced without --overwrite, never something that is not a package
    pkl.write_bytes(good)
    _one_line_error(capsys, ["import-official", ckpt, "-o", pkl], "one of the inputs")
    assert pkl.read_bytes() == good
    (tmp_path / "other.zip").write_bytes(b"not mine")
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "other.zip"], "exists; --overwrite")
    _one_line_error(capsys, ["import-official", ckpt, "-o", tmp_path / "other.zip", "--overwrite"],
                    "not a model package")
    assert (tmp_path / "other.zip").read_bytes() == b"not mine"
    assert main(["import-official", str(ckpt), "-o", str(tmp_path / "pkg.zip")]) == 0
    assert main(["import-official", str(ckpt), "-o", str(tmp_path / "pkg.zip"), "--overwrite"]) == 0
