"""ONNX export at the patch size, compared with torch through onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from unetrpp.checkpoint import save_checkpoint
from unetrpp.cli.main import main
from unetrpp.network.presets import create_model


@pytest.mark.parametrize("preset", ["synapse", "acdc"])
def test_onnx_output_equals_torch(tmp_path, preset):
    torch.manual_seed(0)
    size = (16, 32, 32) if preset == "synapse" else (8, 32, 32)
    model = create_model(preset, img_size=size, feature_size=8, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1),
                         proj_size=16, decoder_proj_size=16, out_channels=3).eval()
    save_checkpoint({"model_config": model.config.to_dict(), "plans": {}, "state_dict": model.state_dict()},
                    tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")]) == 0
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, *size)  # a batch of two: the batch axis is dynamic
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    model.deep_supervision = False
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == expected.shape == (2, 3, *size)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_export_refuses_bad_output_name(tmp_path, capsys):
    model = create_model("synapse", img_size=(16, 32, 32), feature_size=8, out_channels=2)
    save_checkpoint({"model_config": model.config.to_dict(), "plans": {}, "state_dict": model.state_dict()},
                    tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.bin")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert not (tmp_path / "m.bin").exists()
