"""Saving, loading and converting weights: our format, official checkpoints, unsafe pickles."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.official_fixture import draw_official_state_dict, fixture_input, load_fixture
from unetrpp import UNETRPP, create_model
from unetrpp.cli.main import main
from unetrpp.network.weights import CheckpointError, load_official, read_checkpoint


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("acdc", img_size=(8, 64, 64), out_channels=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())["config"]
    assert config["kv_proj"] == "separate" and config["img_size"] == [8, 64, 64] and config["out_channels"] == 5
    again = UNETRPP.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(1, 1, 8, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), again(x), strict=True):
            assert torch.equal(a, b)


def test_from_pretrained_reports_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json: missing"):
        UNETRPP.from_pretrained(tmp_path)
    create_model("synapse", img_size=(16, 32, 32)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"model.safetensors: unreadable safetensors file"):
        UNETRPP.from_pretrained(tmp_path)


def _official_checkpoint(state: dict, path, prefix: str = "module.") -> None:
    """Save like the official (nnU-Net v1) trainer: numpy scalars in the logs, optimizer state."""
    torch.save({
        "epoch": 1000,
        "state_dict": {prefix + k: v for k, v in state.items()},
        "optimizer_state_dict": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                 "param_groups": [{"lr": 1e-2, "momentum": 0.99, "nesterov": True, "params": [0]}]},
        "lr_scheduler_state_dict": None,
        "plot_stuff": ([1.2, 0.9], [1.1, 1.0], [np.float64(0.5), np.float64(0.61)], [0.55]),
        "best_stuff": (998, np.float64(0.873), np.float64(0.871), 1e-5),
        "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0},
    }, path)


def test_official_checkpoint_file_converts_and_reproduces_the_digest(tmp_path):
    fx = load_fixture("synapse")
    _official_checkpoint(draw_official_state_dict(fx), tmp_path / "model_final_checkpoint.model")
    rc = main(["convert-weights", str(tmp_path / "model_final_checkpoint.model"), str(tmp_path / "out"),
               "--preset", "synapse"])
    assert rc == 0
    model = UNETRPP.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        out = model(fixture_input(fx))[0]
    ref = fx["outputs"][0]
    samples = np.asarray(ref["sample_value"])
    np.testing.assert_allclose(out.reshape(-1).numpy()[ref["sample_index"]], samples,
                               rtol=0, atol=1e-4 * np.abs(samples).max())


def test_shared_projection_keys_must_be_equal():
    fx = load_fixture("synapse")
    state = draw_official_state_dict(fx)
    key = "unetr_pp_encoder.stages.1.2.epa_block.F.bias"
    state[key] = state[key] + 1
    with pytest.raises(CheckpointError, match=r"'unetr_pp_encoder.stages.1.2.epa_block.F.bias' differs from"):
        load_official(state, "synapse")


def test_wrong_preset_names_the_first_wrong_key():
    state = draw_official_state_dict(load_fixture("acdc"))
    # ACDC's stem kernel is (1, 4, 4): the very first key already differs from Synapse's (2, 4, 4)
    with pytest.raises(CheckpointError, match=r"key 'unetr_pp_encoder.downsample_layers.0.0.conv.weight' has "
                                              r"shape \(32, 1, 1, 4, 4\), the model expects \(32, 1, 2, 4, 4\)"):
        load_official(state, "synapse")
    # a key of another variant (a second conv block) is named
    synapse = draw_official_state_dict(load_fixture("synapse"))
    synapse["unetr_pp_encoder.stages.0.0.conv52.conv1.conv.weight"] = torch.zeros(32, 32, 3, 3, 3)
    extra = r"key 'unetr_pp_encoder.stages.0.0.conv52.conv1.conv.weight' .* has no place in this model"
    with pytest.raises(CheckpointError, match=extra):
        load_official(synapse, "synapse")
    # and a missing one too
    del synapse["unetr_pp_encoder.stages.0.0.conv52.conv1.conv.weight"], synapse["out1.conv.conv.bias"]
    with pytest.raises(CheckpointError, match=r"no weights for 'heads.0.bias'"):
        load_official(synapse, "synapse")


def test_wrong_patch_size_names_key_and_shapes(capsys, tmp_path):
    state = draw_official_state_dict(load_fixture("tumor"))
    torch.save({"state_dict": state}, tmp_path / "ckpt.model")
    rc = main(["convert-weights", str(tmp_path / "ckpt.model"), str(tmp_path / "out"), "--preset", "tumor",
               "--patch-size", "64", "64", "64"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1
    want = "key 'unetr_pp_encoder.stages.0.0.pos_embed' has shape (1, 32768, 32), the model expects (1, 4096, 32)"
    assert want in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    torch.save({"state_dict": {}, "payload": Exploit()}, tmp_path / "evil.model")
    with pytest.raises(CheckpointError, match=r"evil.model: refused to load: it contains the global os"):
        read_checkpoint(tmp_path / "evil.model")
    assert not marker.exists()
    rc = main(["convert-weights", str(tmp_path / "evil.model"), str(tmp_path / "out"),
               "--preset", "synapse"])
    assert rc == 2 and not marker.exists()


def test_truncated_and_missing_checkpoints(tmp_path):
    good = tmp_path / "good.model"
    torch.save({"state_dict": {"a": torch.zeros(3)}}, good)
    (tmp_path / "cut.model").write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"cut.model: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.model")
    with pytest.raises(CheckpointError, match=r"nothere.model: no such file"):
        read_checkpoint(tmp_path / "nothere.model")
