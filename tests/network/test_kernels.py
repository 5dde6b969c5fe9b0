"""The network's hand-written kernels against plain PyTorch: statistics, head, dropout mask, convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unetrpp.network.blocks import TokenHead
from unetrpp.network.kernels import conv as conv_mod
from unetrpp.network.kernels.attention import dropout_keep_mask
from unetrpp.network.kernels.norm import _InstanceNormAct
from unetrpp.network.kernels.tokens import _CHUNK_ELEMENTS, token_var_mean

CL = torch.channels_last_3d


CHUNK = _CHUNK_ELEMENTS // (2 * 16)  # tokens per chunk at batch 2, 16 channels


@pytest.mark.parametrize("tokens", [1000, 3 * CHUNK + 777])  # one chunk; several chunks and a remainder
def test_token_var_mean_matches_float64(tokens):
    torch.manual_seed(0)
    # a mean far from zero relative to the spread: the case where a one-pass E[x^2] - E[x]^2 fails
    x = torch.randn(2, tokens, 16) * torch.linspace(0.01, 3, 16) + torch.linspace(-50, 50, 16)
    var, mean = token_var_mean(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=1, keepdim=True, correction=0)
    assert var.shape == mean.shape == (2, 1, 16)
    assert ((var.double() - ref_var) / ref_var).abs().max() < 1e-5
    assert (mean.double() - ref_mean).abs().max() < 1e-5 * 50


@pytest.mark.parametrize("with_res", [False, True])
def test_instance_norm_act_gradients_over_several_chunks(with_res):
    """The custom backward (chunked dot product, in-place temporaries) against autograd through the
    plain ops, in float64."""
    torch.manual_seed(0)
    tokens = 2 * CHUNK + 123  # several chunks (of the dot product) and a remainder
    x = (torch.randn(2, tokens, 16, dtype=torch.float64) * 2 + 1).requires_grad_()
    res = torch.randn(2, tokens, 16, dtype=torch.float64, requires_grad=True) if with_res else None
    gy = torch.randn(2, tokens, 16, dtype=torch.float64)

    def plain(x, res):
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        y = (x - mean) / torch.sqrt(var + 1e-5)
        return F.leaky_relu(y + res if res is not None else y, 0.01)

    inputs = (x,) if res is None else (x, res)
    y = _InstanceNormAct.apply(x, res)
    assert torch.allclose(y, plain(x, res), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(y, inputs, gy)
    want = torch.autograd.grad(plain(x, res), inputs, gy)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    small = (torch.randn(1, 40, 3, dtype=torch.float64, requires_grad=True),
             torch.randn(1, 40, 3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(_InstanceNormAct.apply, small if with_res else (small[0], None))


def test_token_head_matches_a_1x1_conv_and_returns_a_token_layout_gradient():
    torch.manual_seed(0)
    head = TokenHead(8, 5).double()
    t = torch.randn(2, 4 * 6 * 6, 8, dtype=torch.float64, requires_grad=True)
    out = head(t, (4, 6, 6))
    vol = t.detach().view(2, 4, 6, 6, 8).permute(0, 4, 1, 2, 3)
    assert torch.allclose(out, F.conv3d(vol, head.weight, head.bias), rtol=1e-12)
    assert torch.autograd.gradcheck(_head_apply, (t, head.weight, head.bias))
    (g,) = torch.autograd.grad(out.square().sum(), t)
    # channels innermost, as every other full-resolution tensor (autograd's bmm gives channel-major)
    assert g.stride() == (t.shape[1] * 8, 8, 1)
    with torch.no_grad():
        assert torch.equal(head(t, (4, 6, 6)), out.detach())


def _head_apply(t, w, b):
    from unetrpp.network.kernels.tokens import _TokenHeadFn

    return _TokenHeadFn.apply(t, w, b)


def test_dropout_keep_mask_rate_and_independence():
    torch.manual_seed(0)
    n = 1 << 21
    for p in (0.1, 0.5):
        mask = dropout_keep_mask((2, n // 2), p, torch.device("cpu"))
        assert mask.shape == (2, n // 2) and mask.dtype == torch.bool
        rate = mask.double().mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
        # the two 32-bit halves of each 64-bit draw are independent: neighbours uncorrelated
        m = mask.flatten().double()
        corr = torch.corrcoef(torch.stack([m[0::2], m[1::2]]))[0, 1].item()
        assert abs(corr) < 5 / (n / 2) ** 0.5
    assert dropout_keep_mask((3, 5), 0.0, torch.device("cpu")).all()
    assert not torch.equal(dropout_keep_mask((1000,), 0.5, torch.device("cpu")),
                           dropout_keep_mask((1000,), 0.5, torch.device("cpu")))


@pytest.mark.parametrize(("cin", "shape"), [(16, (2, 16, 32, 48)), (1, (1, 24, 40, 72)), (8, (1, 64, 16, 64))])
def test_slab_weight_gradient_equals_onednn(cin, shape):
    torch.manual_seed(0)
    b, z, y, x = shape
    inp = torch.randn(b, cin, z, y, x).contiguous(memory_format=CL)
    grad = torch.randn(b, 16, z, y, x).contiguous(memory_format=CL)
    w = torch.randn(16, cin, 3, 3, 3)
    ref = conv_mod._onednn_weight_grad(grad, inp, w)
    for group_bytes in (1, 1 << 40):  # smallest groups (two slabs each) and all slabs at once
        got = conv_mod.slab_weight_grad(grad, inp, w, group_bytes=group_bytes)
        assert got.shape == w.shape
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_conv3d_autograd_matches_f_conv3d_and_records_its_choice(monkeypatch):
    monkeypatch.setattr(conv_mod, "WEIGHT_GRAD_CHOICES", {})
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 64, 64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(8, 8, 3, 3, 3, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    gy = torch.randn(2, 8, 16, 64, 64)
    outs, grads = [], []
    for fn in (lambda: conv_mod.conv3d(x, w, bias, padding=1), lambda: F.conv3d(x, w, bias, padding=1)):
        y = fn()
        outs.append(y)
        grads.append(torch.autograd.grad(y, (x, w, bias), gy))
    assert outs[0].is_contiguous(memory_format=CL)
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert list(conv_mod.WEIGHT_GRAD_CHOICES) == [(2, 8, 8, 16, 64, 64)]
    assert set(conv_mod.WEIGHT_GRAD_CHOICES.values()) <= {"slabs", "onednn"}
    for choice in ("slabs", "onednn"):  # either method, once chosen, gives the same gradient
        conv_mod.WEIGHT_GRAD_CHOICES[(2, 8, 8, 16, 64, 64)] = choice
        (gw,) = torch.autograd.grad(conv_mod.conv3d(x, w, bias, padding=1), (w,), gy)
        assert (gw - grads[1][1]).abs().max() <= 1e-4 * grads[1][1].abs().max()


def test_one_channel_input_gets_channels_last_strides():
    from unetrpp.network.unetrpp import _channels_last

    x = torch.randn(1, 1, 4, 6, 8)
    y = _channels_last(x)
    assert y.stride(1) == 1 and y.is_contiguous(memory_format=CL) and torch.equal(y, x)
    z = torch.randn(1, 3, 4, 6, 8)
    assert _channels_last(z).stride(1) == 1
