"""The baselines' configs and topology: nnU-Net's rule, validation, deep supervision, missing extras."""

import sys

import pytest
import torch

from unetrpp.errors import UserError
from unetrpp.network.baselines import BaselineConfig, BaselineNet, require, unet_multiple, unet_topology
from unetrpp.network.registry import (
    ARCHITECTURES,
    arch_of,
    build_checked,
    build_network,
    network_config,
    parameter_count,
)
from unetrpp.network.unetrpp import UNETRPPConfig


def test_unet_topology_follows_nnunets_rule():
    # MSD hippocampus: median 36 x 50 x 35 at 1 mm -> multiples of 8 -> nnU-Net's patch 40 x 56 x 40, 3 poolings
    strides, _ = unet_topology([36, 50, 35], [1, 1, 1], whole=False)
    assert unet_multiple(strides) == [8, 8, 8]
    strides, kernels = unet_topology([40, 56, 40], [1, 1, 1])
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]  # 5 x 7 x 5 at the bottom: no 4th pooling
    assert kernels == [[3, 3, 3]] * 4
    # 5 mm slices: the fine axes pool first, the coarse axis convolves with 1 until it is within 2x
    strides, kernels = unet_topology([8, 64, 32], [5, 1, 1])
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 1]]
    assert kernels[:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    # an odd axis is not pooled on the final patch
    assert unet_topology([12, 64, 64], [1, 1, 1])[0][1:] == [[2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2]]


def test_network_dicts_dispatch_and_keep_unetrpp_files_unchanged():
    plain = UNETRPPConfig(img_size=(32, 64, 64), feature_size=8).to_dict()
    assert "arch" not in plain and arch_of(plain) == "unetrpp"
    assert isinstance(network_config(plain), UNETRPPConfig)
    assert isinstance(network_config({**plain, "arch": "unetrpp"}), UNETRPPConfig)
    swin = {"arch": "swinunetr", "img_size": [64, 64, 64], "feature_size": 12, "deep_supervision": False}
    assert isinstance(network_config(swin), BaselineConfig)
    with pytest.raises(UserError, match="unknown architecture 'vnet'"):
        network_config({"arch": "vnet"})
    with pytest.raises(UserError, match="unknown keys banana"):
        network_config({**swin, "banana": 1})
    assert set(ARCHITECTURES) == {"unetrpp", "nnunet", "resenc", "swinunetr", "unetr"}


@pytest.mark.parametrize(("bad", "message"), [
    ({"arch": "swinunetr", "feature_size": 16, "deep_supervision": False}, "multiple of 12"),
    ({"arch": "swinunetr", "feature_size": 12, "deep_supervision": True}, "no deep supervision"),
    ({"arch": "swinunetr", "feature_size": 12, "deep_supervision": False, "img_size": [32, 32, 32]},
     "one voxel at the lowest resolution"),
    ({"arch": "unetr", "feature_size": 8, "deep_supervision": False, "img_size": [24, 32, 32]}, "not a multiple of 16"),
    ({"arch": "nnunet", "strides": [[2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2}, "first stage"),
    ({"arch": "nnunet", "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2},
     "3 strides but 2 kernel sizes"),
    ({"arch": "nnunet", "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3], [5, 3, 3]]}, "1 or 3"),
    ({"arch": "nnunet", "strides": None}, "strides must list"),
    ({"arch": "resenc", "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2, "img_size": [63, 64, 64]},
     "axis 0: 63 is not a multiple of 2"),
    ({"arch": "nnunet", "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2, "feature_size": True},
     "feature_size must be a positive int"),
    ({"arch": "unetr", "deep_supervision": False, "strides": [[1, 1, 1]]}, "for the U-Nets"),
])
def test_bad_baseline_configs_are_one_line(bad, message):
    with pytest.raises(UserError, match=message):
        network_config(bad)


def test_unet_deep_supervision_gives_the_recipes_three_heads():
    cfg = {"arch": "nnunet", "in_channels": 2, "out_channels": 3, "img_size": [16, 32, 32], "feature_size": 4,
           "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 3}
    torch.manual_seed(0)
    net = build_network(cfg)
    assert isinstance(net, BaselineNet) and not net.has_unused_parameters  # 3 decoder heads, all supervised
    x = torch.randn(2, 2, 16, 32, 32)
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 32, 32), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    net.deep_supervision = False
    assert torch.equal(net(x), outs[0])  # the same full-resolution head
    deeper = build_network({**cfg, "strides": cfg["strides"] + [[1, 2, 2]], "kernel_sizes": cfg["kernel_sizes"] +
                            [[3, 3, 3]], "img_size": [16, 64, 64]})
    assert deeper.has_unused_parameters and len(deeper(torch.randn(1, 2, 16, 64, 64))) == 3
    swin = build_network({"arch": "swinunetr", "img_size": [64, 64, 64], "feature_size": 12,
                          "deep_supervision": False})
    with pytest.raises(UserError, match="no deep supervision heads"):
        swin.deep_supervision = True


def test_parameter_count_matches_the_built_network():
    for cfg in ({"arch": "swinunetr", "img_size": [64, 64, 64], "feature_size": 12, "deep_supervision": False},
                {"arch": "resenc", "img_size": [16, 32, 32], "feature_size": 4,
                 "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2}):
        assert parameter_count(cfg) == sum(p.numel() for p in build_network(cfg).parameters())
    with pytest.raises(UserError, match=r"^ckpt.pt: model_config: unknown keys x"):
        build_checked({"arch": "unetr", "x": 1}, "ckpt.pt")


@pytest.mark.parametrize(("arch", "extra"), [("nnunet", "nnunet"), ("swinunetr", "monai")])
def test_a_missing_library_names_the_extra(monkeypatch, arch, extra):
    module = "dynamic_network_architectures" if extra == "nnunet" else "monai"
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(UserError, match=rf"needs the optional package\(s\) .*pip install 'unetrpp\[{extra}\]'") as e:
        require(arch)
    assert "\n" not in str(e.value)


def test_state_dict_names_each_tensor_once_and_loads_back():
    cfg = {"arch": "nnunet", "img_size": [16, 32, 32], "feature_size": 4, "strides": [[1, 1, 1], [2, 2, 2]],
           "kernel_sizes": [[3, 3, 3]] * 2}
    torch.manual_seed(0)
    a = build_network(cfg)
    state = a.state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)  # no tensor under two names
    assert not any(k.startswith("net.decoder.encoder.") or ".all_modules." in k for k in state)
    torch.manual_seed(1)
    b = build_network(cfg)
    b.load_state_dict(state)  # strict: the aliases are filled from their first name
    x = torch.randn(1, 1, 16, 32, 32)
    a.deep_supervision = b.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert torch.equal(b.net.decoder.encoder.stages[0][0].convs[0].conv.weight, state[
        "net.encoder.stages.0.0.convs.0.conv.weight"])


def test_plan_without_the_library_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from unetrpp.cli.main import main
    from unetrpp.data import make_phantom_dataset

    make_phantom_dataset(tmp_path / "ds", cases=2, seed=3)
    before = sorted(p.name for p in (tmp_path / "ds").iterdir())
    monkeypatch.setitem(sys.modules, "monai", None)
    assert main(["plan", str(tmp_path / "ds"), "--arch", "unetr"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'unetrpp[monai]'" in err
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == before  # no plans, fingerprint or splits
    assert main(["plan", str(tmp_path / "ds"), "--arch", "vnet"]) == 2
    assert "unknown architecture 'vnet'" in capsys.readouterr().err
