"""Every block's fast forward (kernels) against its reference forward (the official op order), and the switch.

A block is built once, copied, one copy set to its fast forward and the other to its reference
forward (``set_fast``), and both run on the same inputs: in training mode and in eval mode with
autograd (outputs, gradients of every input and parameter), and in inference (no autograd: the
in-place and fused kernels). In float64 the two must agree to rounding (the algebra is right); in
float32 within float tolerance (the oneDNN convolution and its slab weight gradient run then).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch

from unetrpp import UNETRPP, UNETRPPConfig, create_model
from unetrpp.network import PRESETS, reference_math
from unetrpp.network.blocks import Downsample, OutputStage, ResConvBlock, TokenHead, TransformerBlock, UpBlock
from unetrpp.network.dual import DualForward
from unetrpp.network.epa import EPA, FUSIONS, KV_PROJECTIONS

CL = torch.channels_last_3d
#: (output, gradient, floor) tolerances: output relative to its largest value; gradients as relative
#: norms, each norm at least ``floor`` x the largest gradient norm of the run (a gradient that is zero
#: in exact arithmetic, e.g. of a 1x1 conv from one channel into instance norm, is pure rounding)
TOLERANCES = {torch.float64: (1e-10, 1e-9, 0.0), torch.float32: (1e-4, 2e-3, 1e-3)}
MODES = [("train", True), ("eval", True), ("eval", False)]  # (mode, autograd)


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BN buffer moved off its initial value, so that every op shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.05
                if "running_var" in name:
                    t.copy_(1 + noise.abs())
                elif name.endswith("gamma"):
                    t.copy_(0.3 + noise)  # layer scale far from 1e-6 so that attention shapes the output
                else:
                    t.add_(noise)
    return module


def _run(module: torch.nn.Module, inputs: tuple, train: bool, grad: bool):
    """Outputs, and gradients of a fixed random projection of them w.r.t. tensor inputs and parameters."""
    module.train(train)
    module.zero_grad(set_to_none=True)
    args = [a.detach().clone(memory_format=torch.preserve_format).requires_grad_(grad)
            if isinstance(a, torch.Tensor) else a for a in inputs]  # fresh copies: fast kernels write in place
    with torch.set_grad_enabled(grad):
        out = module(*args)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    grads = {}
    if grad:
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        loss.backward()
        grads = {f"input {i}": a.grad for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return [o.detach() for o in outs], grads


def assert_fast_matches_reference(module: torch.nn.Module, *inputs, modes=MODES) -> None:
    """The fast and the reference forward of ``module`` agree: outputs and every gradient."""
    dtype = next(a.dtype for a in inputs if isinstance(a, torch.Tensor))
    out_tol, grad_tol, floor = TOLERANCES[dtype]
    fast = copy.deepcopy(module).set_fast(True)
    ref = copy.deepcopy(module).set_fast(False)
    for mode, grad in modes:
        fast_out, fast_grad = _run(fast, inputs, mode == "train", grad)
        ref_out, ref_grad = _run(ref, inputs, mode == "train", grad)
        assert len(fast_out) == len(ref_out)
        for a, b in zip(fast_out, ref_out, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            err = ((a - b).abs().max() / b.abs().max()).item()
            assert err <= out_tol, f"{type(module).__name__} output ({mode}, autograd={grad}): {err:.2e}"
        assert fast_grad.keys() == ref_grad.keys()
        largest = max((g.norm().item() for g in ref_grad.values()), default=0.0)
        for name, g in ref_grad.items():
            rel = ((fast_grad[name] - g).norm() / g.norm().clamp_min(max(floor * largest, 1e-30))).item()
            assert rel <= grad_tol, f"{type(module).__name__} gradient of {name} ({mode}): {rel:.2e}"
    for a, b in zip(fast.state_dict().values(), ref.state_dict().values(), strict=True):  # BN running stats
        assert torch.allclose(a.double(), b.double(), rtol=out_tol * 10, atol=out_tol)


def _tokens(b: int, n: int, c: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, c, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _volume(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = True, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=CL) if channels_last else x


DTYPES = [torch.float64, torch.float32]
#: the attention variants of the five presets (kv_proj, fusion, conv_blocks)
PRESET_VARIANTS = sorted({(p.config().kv_proj, p.config().fusion, p.config().conv_blocks) for p in PRESETS.values()})


# ---------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("cin", "cout", "norm", "shape"),
    [
        (1, 8, "instance", (2, 16, 64, 64)),  # the stem block (official encoder1); float32: slab weight gradient
        (4, 8, "instance", (1, 8, 16, 16)),  # four modalities, batch 1
        (8, 8, "instance", (2, 8, 16, 16)),  # the output stage's block: identity skip
        (16, 16, "batch", (2, 4, 8, 8)),  # inside every TransformerBlock
        (8, 16, "batch", (1, 4, 8, 8)),  # projection skip with BatchNorm
    ],
)
def test_res_conv_block(cin, cout, norm, shape, dtype):
    torch.manual_seed(0)
    block = _perturbed(ResConvBlock(cin, cout, norm).to(dtype))
    b, *spatial = shape
    assert_fast_matches_reference(block, _volume((b, cin, *spatial), dtype))


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_res_conv_block_on_a_standard_layout_volume(norm):
    block = _perturbed(ResConvBlock(4, 8, norm).double())
    assert_fast_matches_reference(block, _volume((2, 4, 8, 16, 16), torch.float64, channels_last=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("cin", "cout", "stride", "groups", "shape"),
    [
        (1, 8, (2, 4, 4), 1, (2, 16, 32, 32)),  # Synapse stem
        (1, 8, (1, 4, 4), 1, (1, 8, 32, 32)),  # ACDC / Lung stem
        (4, 8, (4, 4, 4), 4, (2, 16, 16, 16)),  # BraTS stem: GroupNorm over the four modalities' groups
        (8, 16, (2, 2, 2), 8, (2, 8, 8, 8)),  # downsampling between stages
    ],
)
def test_downsample(cin, cout, stride, groups, shape, dtype):
    block = _perturbed(Downsample(cin, cout, stride, groups).to(dtype))
    b, *spatial = shape
    assert_fast_matches_reference(block, _volume((b, cin, *spatial), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("head_merge", ["official", "standard"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kv_proj", KV_PROJECTIONS)
def test_epa(kv_proj, fusion, head_merge, batch, dtype):
    torch.manual_seed(0)
    epa = _perturbed(EPA(16, 4 * 8 * 8, 16, 4, kv_proj, fusion, 0.0, head_merge).to(dtype))
    assert_fast_matches_reference(epa, _tokens(batch, 256, 16, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_proj", "fusion", "conv_blocks"), PRESET_VARIANTS)
@pytest.mark.parametrize(("batch", "spatial"), [(2, (4, 8, 8)), (1, (2, 6, 10))])
def test_transformer_block(kv_proj, fusion, conv_blocks, batch, spatial, dtype):
    torch.manual_seed(0)
    block = TransformerBlock(16, spatial, 8, 4, kv_proj, fusion, conv_blocks, attn_dropout=0.0, proj_dropout=0.0,
                             head_merge="official", trunc_normal_linears=True)
    n = spatial[0] * spatial[1] * spatial[2]
    assert_fast_matches_reference(_perturbed(block.to(dtype)), _tokens(batch, n, 16, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_proj", "fusion", "conv_blocks"), PRESET_VARIANTS)
@pytest.mark.parametrize("depth", [1, 2])
def test_up_block(kv_proj, fusion, conv_blocks, depth, dtype):
    torch.manual_seed(0)
    spatial = (4, 8, 8)
    block = UpBlock(32, 16, spatial, depth, num_heads=4, proj_size=8, kv_proj=kv_proj, fusion=fusion,
                    conv_blocks=conv_blocks, attn_dropout=0.0, proj_dropout=0.0, head_merge="official",
                    trunc_normal_linears=False)
    block = _perturbed(block.to(dtype))
    assert_fast_matches_reference(block, _tokens(2, 2 * 4 * 4, 32, dtype), _tokens(2, 256, 16, dtype, seed=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("stride", "batch"), [((2, 4, 4), 2), ((1, 4, 4), 1), ((4, 4, 4), 2)])
def test_output_stage(stride, batch, dtype):
    torch.manual_seed(0)
    spatial = (2, 4, 4)
    block = _perturbed(OutputStage(16, 8, stride, spatial).to(dtype))
    n_out = 2 * 4 * 4 * stride[0] * stride[1] * stride[2]
    assert_fast_matches_reference(block, _tokens(batch, 32, 16, dtype), _tokens(batch, n_out, 8, dtype, seed=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_token_head(batch, dtype):
    torch.manual_seed(0)
    head = _perturbed(TokenHead(8, 3).to(dtype))
    assert_fast_matches_reference(head, _tokens(batch, 4 * 6 * 6, 8, dtype), (4, 6, 6))


# ---------------------------------------------------------------------------------------------- the model
#: patch sizes with a 2x2x2 bottleneck (BatchNorm statistics of one voxel amplify rounding)
PATCHES = {"synapse": (32, 64, 64), "btcv": (32, 64, 64), "acdc": (16, 64, 64), "tumor": (64, 64, 64),
           "lung": (16, 64, 64)}


def _small(name: str, **overrides) -> UNETRPP:
    return create_model(name, img_size=PATCHES[name], feature_size=4, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1),
                        proj_size=8, decoder_proj_size=8, out_channels=3, attn_dropout=0.0, proj_dropout=0.0,
                        **overrides)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PATCHES))
def test_whole_model_of_each_preset(name):
    """Every preset's variant end to end: float64 in training mode with gradients, float32 inference.
    (Float32 training gradients are left out here: BatchNorm statistics of a small batch amplify
    rounding to ~1 % at the bottleneck, in the reference as much as in the fast path.)"""
    assert name in PRESETS
    torch.manual_seed(0)
    model = _perturbed(_small(name))
    x = _volume((2, model.config.in_channels, *model.config.img_size), torch.float64)
    assert_fast_matches_reference(copy.deepcopy(model).double(), x, modes=[("train", True)])
    assert_fast_matches_reference(model, x.float(), modes=[("eval", False)])


# ---------------------------------------------------------------------------------------------- the switch
def _blocks(model: torch.nn.Module) -> list[DualForward]:
    return [m for m in model.modules() if isinstance(m, DualForward)]


def test_fast_is_chosen_per_instance_at_construction_and_by_set_fast():
    kw = dict(img_size=(16, 32, 32), feature_size=4, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1))
    fast, ref = UNETRPP(**kw), UNETRPP(**kw, fast=False)
    kinds = {type(m) for m in _blocks(fast)}
    assert kinds == {ResConvBlock, Downsample, EPA, TransformerBlock, UpBlock, OutputStage, TokenHead}
    assert all(m.fast for m in _blocks(fast)) and not any(m.fast for m in _blocks(ref))
    # the choice is no part of the config or the weights
    assert fast.config == ref.config and "fast" not in ref.config.to_dict()
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert ref.set_fast(True) is ref and all(m.fast for m in _blocks(ref))
    assert not any(m.fast for m in _blocks(UNETRPP.from_config(fast.config, fast=False)))
    fast.stages[0][0].set_fast(False)  # one block and what is inside it
    assert [m.fast for m in _blocks(fast.stages[0][0])] == [False] * len(_blocks(fast.stages[0][0]))
    assert fast.stages[0][0].fast is False and fast.decoder[0].fast is True


def test_reference_math_overrides_every_block_for_its_duration(monkeypatch):
    model = _perturbed(_small("synapse"))
    calls = []
    for kind in (ResConvBlock, Downsample, EPA, TransformerBlock, UpBlock, OutputStage, TokenHead):
        for which in ("forward_fast", "forward_reference"):
            original = getattr(kind, which)
            monkeypatch.setattr(kind, which, lambda self, *a, _o=original, _w=which: calls.append(_w) or _o(self, *a))
    x = torch.randn(1, 1, *model.config.img_size)
    with torch.no_grad():
        model.eval()(x)
        assert set(calls) == {"forward_fast"}
        calls.clear()
        with reference_math():
            model(x)
            assert set(calls) == {"forward_reference"}
            calls.clear()
            with reference_math(False):  # lifts the override: each block's own choice again
                model(x)
            assert set(calls) == {"forward_fast"}
        assert model.stages[0][0].fast is True  # the override changes no attribute


def test_constructor_lists_every_config_field_with_its_default():
    params = inspect.signature(UNETRPP).parameters
    fields = {f.name: f.default for f in dataclasses.fields(UNETRPPConfig)}
    assert [p for p in params if p != "fast"] == list(fields)
    assert {p: params[p].default for p in fields} == fields
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.slow
def test_an_edit_of_the_reference_epa_reaches_fast_false_models_and_fails_the_fast_check(monkeypatch):
    """Editing ``EPA.forward_reference`` changes what a ``fast=False`` model computes, in training
    too; a ``fast=True`` model keeps its kernels, and the check above then fails for it."""
    torch.manual_seed(0)
    model = _perturbed(_small("synapse")).double()
    x = _volume((2, 1, *model.config.img_size), torch.float64)
    ref = copy.deepcopy(model).set_fast(False)
    fast = copy.deepcopy(model)
    before_ref, before_ref_grad = _run(ref, (x,), train=True, grad=True)
    before_fast, _ = _run(fast, (x,), train=True, grad=True)
    assert_fast_matches_reference(model, x, modes=[("train", True)])

    original = EPA.forward_reference
    monkeypatch.setattr(EPA, "forward_reference", lambda self, t: 1.5 * original(self, t))
    after_ref, after_ref_grad = _run(ref, (x,), train=True, grad=True)
    after_fast, _ = _run(fast, (x,), train=True, grad=True)
    assert (after_ref[0] - before_ref[0]).abs().max() > 1e-3 * before_ref[0].abs().max()
    key = "stages.0.0.attn.qkvv.weight"
    assert not torch.allclose(after_ref_grad[key], before_ref_grad[key])
    assert all(torch.equal(a, b) for a, b in zip(after_fast, before_fast, strict=True))
    with pytest.raises(AssertionError, match="output"):
        assert_fast_matches_reference(model, x, modes=[("train", True)])
    with pytest.raises(AssertionError, match="output"):
        assert_fast_matches_reference(model.stages[0][0].attn, _tokens(2, 16 * 16 * 16, 8, torch.float64))
