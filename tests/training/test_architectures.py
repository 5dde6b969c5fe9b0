"""Every architecture of the registry through the same pipeline: planned, trained a few steps,
saved and reloaded with identical outputs (checkpoint and model package), exported to ONNX, and
predicted on a case with the same commands as UNETR++."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import SimpleITK as sitk
import torch

from unetrpp.checkpoint import Checkpoint, build_model
from unetrpp.cli.main import main
from unetrpp.data import make_phantom_dataset, preprocess_dataset
from unetrpp.data.plan import plan_dataset
from unetrpp.data.plans import Plans
from unetrpp.inference.model import load_model
from unetrpp.network.registry import ARCHITECTURES, smallest_width
from unetrpp.training.config import TrainConfig
from unetrpp.training.trainer import Trainer

PATCH = (32, 64, 64)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch") / "ds"
    make_phantom_dataset(root, cases=3, seed=5)
    plan_dataset(root, patch_size=PATCH)
    preprocess_dataset(root, workers=1)  # the same for every architecture: each test's preprocess finds it done
    # one small case to predict: a block of a phantom's image, about one window at the target spacing
    img = sitk.ReadImage(str(root / "imagesTr" / "phantom_000_0000.nii.gz"))
    size = img.GetSize()  # x, y, z
    block = img[size[0] // 4: size[0] // 4 + 48, size[1] // 4: size[1] // 4 + 48, : min(size[2], 24)]
    (root.parent / "one").mkdir()
    sitk.WriteImage(block, str(root.parent / "one" / "case_0000.nii.gz"))
    return root


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_plans_trains_reloads_exports_and_predicts(phantom, tmp_path, capsys, arch):
    root = tmp_path / "ds"
    shutil.copytree(phantom, root)
    plans = plan_dataset(root, patch_size=PATCH, arch=arch)
    assert plans.arch == arch and Plans.load(root).network == plans.network
    if arch != "unetrpp":
        assert json.loads((root / "plans.json").read_text())["network"]["arch"] == arch
    assert preprocess_dataset(root, workers=1)["skipped"] == 3  # the architecture changes no preprocessing
    width = smallest_width(plans.network)
    small = {"feature_size": width}
    if arch == "unetrpp":
        small.update(depths=[1, 1, 1, 1], decoder_depths=[1, 1, 1], proj_size=[16, 16, 16, 8], decoder_proj_size=16)
    cfg = TrainConfig(fold=0, epochs=1, iters_per_epoch=2, val_iters=1, workers=0, device="cpu",
                      model_overrides=small, final_validation=False, recipe="short")
    run = root / "results" / f"{arch}_fold0"
    Trainer(root, cfg, progress=False).run()
    ckpt = Checkpoint.load(run / "checkpoint_final.pt")
    assert ckpt.network.get("arch", "unetrpp") == arch and ckpt.network["feature_size"] == width

    # saved and reloaded: the checkpoint, and the model package made from the run, give identical outputs
    net = build_model(ckpt)
    net.deep_supervision = False
    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x)
    assert expected.shape == (1, plans.num_classes, *PATCH) and torch.isfinite(expected).all()
    assert main(["export-model", str(run), str(tmp_path / "model.zip")]) == 0
    member = load_model(tmp_path / "model.zip").members[0]
    member.network.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(member.network(x), expected)

    # ONNX at the patch, checked against torch by the exporter and here
    assert main(["export", str(run / "checkpoint_final.pt"), str(tmp_path / "m.onnx")]) == 0
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-3, rtol=0)

    # the same predict and info commands as UNETR++
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(phantom.parent / "one"), "-o", str(out), "-m", str(tmp_path / "model.zip"),
                 "--no-tta", "--device", "cpu"]) == 0
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom.parent / "one" / "case_0000.nii.gz")))
    assert label.shape == source.shape and label.max() < plans.num_classes
    capsys.readouterr()
    assert main(["info", str(run), "--no-memory", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == arch and info["params"] == sum(p.numel() for p in net.parameters())
    assert info["macs"] > 0 and info["config"]["img_size"] == list(PATCH)
