"""The UNETR++ network: presets, shapes at any valid patch size, argument checks, fast == reference."""

from __future__ import annotations

import pytest
import torch

from unetrpp import UNETRPP, UNETRPPConfig, create_model
from unetrpp.network import PRESETS, reference_math
from unetrpp.network.epa import EPA

OFFICIAL_PARAMS = {"synapse": 42_952_850, "btcv": 42_952_850, "acdc": 66_796_404,
                   "tumor": 42_647_604, "lung": 121_174_798}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_preset_parameter_count_equals_official(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_btcv_preset_at_its_patch_size():
    model = create_model("btcv").eval()
    assert model.config.out_channels == 14 and model.config.img_size == (64, 128, 128)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 128, 128))
    assert [tuple(o.shape) for o in out] == [(1, 14, 64, 128, 128), (1, 14, 32, 32, 32), (1, 14, 16, 16, 16)]
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize(
    ("preset", "size", "expected"),
    [
        # synapse stem (2, 4, 4): needs multiples of (16, 32, 32)
        ("synapse", (32, 96, 160), [(32, 96, 160), (16, 24, 40), (8, 12, 20)]),
        # acdc stem (1, 4, 4): needs multiples of (8, 32, 32)
        ("acdc", (24, 64, 96), [(24, 64, 96), (24, 16, 24), (12, 8, 12)]),
        # tumor stem (4, 4, 4): needs multiples of 32
        ("tumor", (64, 32, 96), [(64, 32, 96), (16, 8, 24), (8, 4, 12)]),
        ("lung", (8, 32, 64), [(8, 32, 64), (8, 8, 16), (4, 4, 8)]),
    ],
)
def test_custom_patch_sizes(preset, size, expected):
    model = create_model(preset, img_size=size, out_channels=3).eval()
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, *size)
    with torch.no_grad():
        outs = model(x)
    assert [tuple(o.shape[2:]) for o in outs] == expected
    assert all(o.shape[:2] == (2, 3) for o in outs)
    # token counts derive from the patch size
    z, y, w = (s // k for s, k in zip(size, cfg.stem_stride, strict=True))
    assert cfg.stage_tokens[0] == z * y * w and cfg.stage_tokens[3] == z * y * w // 512
    assert model.stages[0][0].pos_embed.shape == (1, z * y * w, cfg.dims[0])


def test_deep_supervision_switch():
    model = create_model("synapse", img_size=(16, 32, 32)).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        full_ds = model(x)[0]
        model.deep_supervision = False
        single = model(x)
    assert isinstance(single, torch.Tensor) and torch.equal(single, full_ds)
    plain = create_model("synapse", img_size=(16, 32, 32), deep_supervision=False)
    assert len(plain.heads) == 1
    with pytest.raises(ValueError, match="no extra heads"):
        plain.deep_supervision = True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": (60, 128, 128)}, r"axis 0: 60 is not a multiple of 16 \(try 48 or 64\)"),
        ({"img_size": (64, 100, 128)}, r"axis 1: 100 is not a multiple of 32 \(try 96 or 128\)"),
        ({"img_size": (64, 128)}, "3 positive ints"),
        ({"img_size": (0, 128, 128)}, "3 positive ints"),
        ({"num_heads": 3}, "num_heads=3 must divide"),
        ({"in_channels": 3}, "stem GroupNorm uses 3 groups"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"out_channels": 2.5}, "out_channels must be a positive int"),
        ({"kv_proj": "tied"}, "kv_proj must be one of"),
        ({"fusion": "mean"}, "fusion must be one of"),
        ({"head_merge": "fixed"}, "head_merge must be one of"),
        ({"attn_dropout": 1.0}, r"attn_dropout must be in \[0, 1\)"),
        ({"depths": (3, 3, 3)}, "depths must be 4 positive ints"),
        ({"proj_size": (64, 0, 64, 32)}, "proj_size must be"),
        ({"feature_size": 0}, "feature_size must be a positive int"),
        ({"bogus": 1}, "unexpected keyword|bogus"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        UNETRPP(**kwargs)


def test_stem_norm_groups_allows_three_channels():
    model = UNETRPP(in_channels=3, out_channels=2, img_size=(16, 32, 32), stem_norm_groups=1)
    assert model.downsample[0].norm.num_groups == 1


def test_wrong_input_shape_is_a_clear_error():
    model = create_model("synapse", img_size=(16, 32, 32))
    with pytest.raises(ValueError, match=r"built for patches of \(16, 32, 32\), got \(16, 32, 64\)"):
        model(torch.zeros(1, 1, 16, 32, 64))
    with pytest.raises(ValueError, match="1 input channels, got 2"):
        model(torch.zeros(1, 2, 16, 32, 32))


def test_config_round_trip():
    cfg = PRESETS["tumor"].config(img_size=(64, 64, 64))
    again = UNETRPPConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown UNETR\\+\\+ config fields: nope"):
        UNETRPPConfig.from_dict({**cfg.to_dict(), "nope": 1})


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter and BN buffer off its initial value so all paths shape the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.02
                if "running_var" in name:
                    t.copy_(1 + noise.abs())
                elif name.endswith("gamma"):
                    t.copy_(0.1 + noise)  # layer scale far from 1e-6 so attention shapes the output
                else:
                    t.add_(noise)
    return model


# A 2x2x2 bottleneck at least: with one voxel, GroupNorm/BatchNorm statistics of 2 values are
# ill-conditioned and amplify rounding. feature_size 4 keeps float64 quick with the same code paths.
VARIANTS = {
    "synapse": dict(img_size=(32, 64, 64)),
    "acdc": dict(img_size=(16, 64, 64)),
    "tumor": dict(img_size=(32, 64, 64), stem_stride=(2, 4, 4)),  # its shared_nobias K/V and sum fusion
}


@pytest.mark.parametrize(("preset", "head_merge"),
                         [("synapse", "official"), ("synapse", "standard"), ("acdc", "official"),
                          ("tumor", "official")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_path_equals_reference_forward_and_gradients(preset, head_merge, dtype):
    """The fused fast path computes the official function: exactly in float64 (so the algebra,
    train and eval, is right), and within rounding in float32, which also runs the oneDNN kernels.
    (Float32 training-mode gradients are left out: BatchNorm batch statistics of a small batch
    amplify rounding to ~1 % there, in the reference as much as in the fast path.)"""
    torch.manual_seed(0)
    model = create_model(preset, feature_size=4, out_channels=3, attn_dropout=0.0, proj_dropout=0.0,
                         head_merge=head_merge, **VARIANTS[preset])
    model = _perturbed(model).to(dtype)
    x = torch.randn(2, model.config.in_channels, *model.config.img_size, dtype=dtype)
    target = torch.randn(3, dtype=dtype)
    out_tol, grad_tol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-4, 5e-3)

    def run(train: bool):
        model.train(train)
        model.zero_grad(set_to_none=True)
        outs = model(x)
        loss = sum((o.mean(dim=(2, 3, 4)) * target).sum() for o in outs)
        loss.backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}

    for train in (False, True):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        fast_out, fast_grad = run(train)
        model.load_state_dict(state)  # BN running stats moved in train mode
        with reference_math():
            ref_out, ref_grad = run(train)
        model.load_state_dict(state)
        for a, b in zip(fast_out, ref_out, strict=True):
            assert (a - b).abs().max() <= out_tol * b.abs().max()
        if train and dtype == torch.float32:
            continue
        for name, g in ref_grad.items():
            rel = (fast_grad[name] - g).norm() / g.norm().clamp_min(1e-30)
            assert rel <= grad_tol, (name, train, rel.item())


@pytest.mark.parametrize("kv_proj", ["shared", "separate", "shared_nobias"])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_epa_fast_equals_reference(kv_proj, fusion):
    torch.manual_seed(1)
    epa = EPA(32, 4 * 8 * 8, 16, 4, kv_proj, fusion, 0.0, "official")
    with torch.no_grad():
        for p in epa.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 256, 32)
    fast = epa(x)
    with reference_math():
        ref = epa(x)
    assert fast.shape == (2, 256, 32)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)


def test_initialisation_follows_the_official_code():
    model = create_model("tumor", img_size=(32, 32, 32))
    enc = model.stages[0][0]
    assert torch.all(enc.gamma == 1e-6) and torch.all(enc.pos_embed == 0)
    assert torch.all(enc.attn.temperature_channel == 1) and torch.all(enc.attn.temperature_spatial == 1)
    # encoder linears: truncated normal, std 0.02, zero bias
    w = torch.cat([blk.attn.qkvv.weight.flatten() for stage in model.stages for blk in stage])
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    # bias-free shared projection: uniform in +-1/sqrt(p)
    ef = enc.attn.proj_kv.weight
    bound = 1 / model.config.proj_size[0] ** 0.5
    assert ef.abs().max() <= bound and ef.abs().max() > 0.9 * bound and enc.attn.proj_kv.bias is None


def test_token_norm_matches_vector_norm_with_exact_gradients():
    from unetrpp.network.kernels.attention import _TokenNorm

    torch.manual_seed(0)
    x = torch.randn(2, 300, 16, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(_TokenNorm.apply(x), torch.linalg.vector_norm(x, dim=1), rtol=1e-12)
    assert torch.autograd.gradcheck(_TokenNorm.apply, (x,))
    strided = torch.randn(1, 4096, 64)[..., :32]  # as in EPA: a slice of the qkv projection
    assert torch.allclose(_TokenNorm.apply(strided), torch.linalg.vector_norm(strided, dim=1), rtol=1e-6)
    zero = torch.zeros(1, 5, 3, requires_grad=True)
    _TokenNorm.apply(zero).sum().backward()
    assert torch.equal(zero.grad, torch.zeros_like(zero))  # like F.normalize: no NaN at a zero column


def test_training_step_under_bf16_autocast_runs_with_finite_gradients():
    """The custom autograd functions (spatial attention, token norms, instance norm) under autocast:
    backward runs outside autocast, so mixed dtypes there must be cast explicitly (it used to raise)."""
    model = UNETRPP(in_channels=1, out_channels=3, img_size=(16, 32, 32), feature_size=8, depths=[1, 1, 1, 1],
                    decoder_depths=[1, 1, 1], proj_size=[16, 16, 16, 8], decoder_proj_size=16).train()
    x = torch.randn(2, 1, 16, 32, 32)  # batch 2: BatchNorm at the 1x1x1 bottleneck needs 2 values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out[0].dtype == torch.bfloat16
    sum(o.float().square().mean() for o in out).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_create_model_builds_reference_forwards_on_request():
    from unetrpp.network.dual import DualForward

    torch.manual_seed(0)
    fast = create_model("acdc", img_size=(16, 64, 64))
    torch.manual_seed(0)
    ref = create_model("acdc", img_size=(16, 64, 64), fast=False)
    blocks = [m for m in ref.modules() if isinstance(m, DualForward)]
    assert len(blocks) > 20 and not any(m.fast for m in blocks)
    assert all(m.fast for m in fast.modules() if isinstance(m, DualForward))
    for (k, a), (k2, b) in zip(fast.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k  # the same network, only the forwards differ
