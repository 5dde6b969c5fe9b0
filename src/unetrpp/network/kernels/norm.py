"""Normalisation kernels of the residual conv blocks: fused instance norm + LeakyReLU, closed-form
normalised 1x1 projection, BatchNorm folded into a convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import inplace_ok, token_dot, token_var_mean, tokens_to_volume, volume_to_tokens

LEAKY_SLOPE = 0.01
NORM_EPS = 1e-5


class _InstanceNormAct(torch.autograd.Function):
    """``lrelu(instance_norm(x) [+ res])`` on ``(B, N, C)`` tokens, saving only its output.

    Instance norm has no affine parameters, so the normalised input is recovered in backward from
    the output (LeakyReLU is invertible), minus ``res`` when one was added. Autograd through the
    plain ops would keep the convolution output as well: one full-resolution tensor per norm.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, res: torch.Tensor | None):
        var, mean = token_var_mean(x)
        rstd = torch.rsqrt(var + NORM_EPS)
        y = torch.addcmul(-mean * rstd, x, rstd)
        if res is not None:
            y.add_(res)
        F.leaky_relu(y, LEAKY_SLOPE, inplace=True)
        ctx.save_for_backward(y, rstd, res)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, rstd, res = ctx.saved_tensors
        # Two full-size temporaries, updated in place: this runs at the training step's memory peak.
        slope = (y > 0).to(y.dtype).mul_(1.0 - LEAKY_SLOPE).add_(LEAKY_SLOPE)  # from the output's sign
        g = grad * slope  # the gradient through the LeakyReLU (also that of res)
        xhat = torch.div(y, slope, out=slope)  # the normalised input (+ res)
        if res is not None:
            xhat.sub_(res)
        n = y.shape[1]
        mean_g = g.sum(dim=1, keepdim=True).div_(n)
        mean_gx = token_dot(g, xhat).div_(n)
        dx = xhat.mul_(mean_gx).sub_(g).add_(mean_g).mul_(-rstd)  # (g - mean_g - xhat mean_gx) rstd
        return dx, (g.to(res.dtype) if res is not None else None)


def instance_norm_lrelu(x: torch.Tensor, res: torch.Tensor | None = None) -> torch.Tensor:
    """Instance norm without affine parameters (MONAI's ``"instance"``) [+ res], then LeakyReLU(0.01).

    ``res`` (tokens) is added after the norm and before the activation. Channels-last inputs use
    one statistics pass and one fused pass (in place in inference; with autograd, a custom function
    that keeps only the output); ``F.instance_norm`` is several times slower on that layout.
    """
    spatial = tuple(x.shape[2:])
    if not x.is_contiguous(memory_format=torch.channels_last_3d):
        y = F.instance_norm(x, eps=NORM_EPS)
        if res is not None:
            y = y + tokens_to_volume(res, spatial)
        return F.leaky_relu(y, LEAKY_SLOPE, inplace=True)
    v = volume_to_tokens(x)
    if v.dtype in (torch.float16, torch.bfloat16):
        # under autocast, in float32 as autocast runs PyTorch's own norms: statistics over N voxels,
        # and a backward that subtracts two means of size-N products, need more than 16 bits
        v = v.float()
    if not inplace_ok(v, *(() if res is None else (res,))):
        return tokens_to_volume(_InstanceNormAct.apply(v, res), spatial)
    var, mean = token_var_mean(v)
    rstd = torch.rsqrt(var + NORM_EPS)
    y = torch.addcmul(-mean * rstd, v, rstd, out=v)
    if res is not None:
        y.add_(res)
    return tokens_to_volume(F.leaky_relu(y, LEAKY_SLOPE, inplace=True), spatial)


def normalized_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``instance_norm(conv1x1(x, weight))`` in closed form, as tokens ``(B, N, C_out)``.

    For ``y = W x`` the per-sample statistics are ``mean(y) = W m`` and ``var(y) = diag(W S W^T)``
    with ``m, S`` the mean and covariance of the (few) input channels, so the normalised output is
    one small matmul ``(x - m) @ W'^T``: no full-resolution normalisation pass.
    """
    t = volume_to_tokens(x)  # (B, N, k), k = input channels
    t64 = t.double()
    mean = t64.mean(dim=1, keepdim=True)
    centred = t64 - mean
    cov = centred.transpose(1, 2) @ centred / t.shape[1]  # (B, k, k)
    w = weight.flatten(1).double()  # (C, k)
    var = torch.einsum("ck,bkl,cl->bc", w, cov, w)
    w_scaled = (w.unsqueeze(0) * torch.rsqrt(var + NORM_EPS).unsqueeze(-1))  # (B, C, k)
    bias = -(w_scaled @ mean.transpose(1, 2)).transpose(1, 2)  # (B, 1, C)
    w_scaled = w_scaled.to(t.dtype)
    return torch.baddbmm(bias.to(t.dtype), t, w_scaled.transpose(1, 2))


def fold_batch_norm(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (eval) folded into the conv: weight and bias.

    The weight is written channels-last, the layout oneDNN reads with channels-last inputs
    (it would otherwise copy it on every call: 2 ms for a 256-channel conv).
    """
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    if torch.is_grad_enabled() and (scale.requires_grad or conv.weight.requires_grad):
        weight = conv.weight * scale.view(-1, 1, 1, 1, 1)  # out= has no autograd
    else:
        weight = torch.empty_like(conv.weight, memory_format=torch.channels_last_3d)
        torch.mul(conv.weight, scale.view(-1, 1, 1, 1, 1), out=weight)
    return weight, bn.bias - bn.running_mean * scale
