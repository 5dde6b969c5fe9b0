"""Building blocks of UNETR++: residual conv blocks, the EPA transformer block, up-sampling.

Activations inside the network are kept in *token layout* ``(B, N, C)`` with tokens in C-order
over ``(Z, Y, X)``. Viewed as a 5-D tensor, that memory is exactly PyTorch's ``channels_last_3d``
layout, so switching between the attention view (tokens) and the convolution view (5-D) is free:
:func:`tokens_to_volume` and :func:`volume_to_tokens` return views, never copies, for tensors
produced inside the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ._mode import reference_enabled
from .conv import conv3d
from .epa import EPA

LEAKY_SLOPE = 0.01
NORM_EPS = 1e-5


def tokens_to_volume(t: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:
    """``(B, N, C)`` tokens -> ``(B, C, Z, Y, X)`` (a channels-last view when ``t`` is contiguous)."""
    b, _, c = t.shape
    return t.view(b, *spatial, c).permute(0, 4, 1, 2, 3)


def volume_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, Z, Y, X)`` -> ``(B, N, C)`` tokens (a view when ``x`` is channels-last)."""
    b, c = x.shape[:2]
    return x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)


_CHUNK_ELEMENTS = 1 << 19  # 2 MB of float32: a chunk and its temporaries stay in the L2/L3 caches


def _chunk_tokens(v: torch.Tensor) -> int:
    """Tokens per cache-sized chunk of ``(B, N, C)`` (all samples of a chunk together)."""
    return max(1, _CHUNK_ELEMENTS // max(1, v.shape[0] * v.shape[2]))


def token_var_mean(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population variance and mean over the tokens of ``(B, N, C)``, each ``(B, 1, C)``.

    ``torch.var_mean(v, dim=1)`` reduces across the strided token axis element by element: about
    70 ms for 16 channels at 64 x 128 x 128 on two cores, against 28 ms here. Each cache-sized chunk of
    tokens gets its mean (a fast ``sum``) and its sum of squared deviations while still in cache,
    and the chunks are combined exactly (Chan et al.'s pairwise update): one pass over memory,
    as accurate as the two-pass formula.
    """
    n = v.shape[1]
    size = _chunk_tokens(v)
    if n <= size:
        mean = v.sum(dim=1, keepdim=True).div_(n)
        return F.mse_loss(v, mean.expand_as(v), reduction="none").sum(dim=1, keepdim=True).div_(n), mean
    means, m2s, counts = [], [], []
    for chunk in v.split(size, dim=1):
        k = chunk.shape[1]
        m = chunk.sum(dim=1, keepdim=True).div_(k)
        means.append(m)
        m2s.append(F.mse_loss(chunk, m.expand_as(chunk), reduction="none").sum(dim=1, keepdim=True))
        counts.append(k)
    chunk_means = torch.cat(means, dim=1)  # (B, chunks, C)
    weights = torch.tensor(counts, dtype=v.dtype, device=v.device).view(1, -1, 1)
    mean = (chunk_means * weights).sum(dim=1, keepdim=True).div_(n)
    m2 = torch.cat(m2s, dim=1).sum(dim=1, keepdim=True)
    m2 += (chunk_means - mean).square_().mul_(weights).sum(dim=1, keepdim=True)
    return m2.div_(n), mean


def _token_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_n a[:, n, c] * b[:, n, c]`` as ``(B, 1, C)``, chunk by chunk (the strided reduction of
    ``linalg.vecdot`` over the token axis is 1.5x slower, a full-size product costs memory)."""
    size = _chunk_tokens(a)
    parts = [(x * y).sum(dim=1, keepdim=True) for x, y in zip(a.split(size, dim=1), b.split(size, dim=1), strict=True)]
    return torch.stack(parts).sum(dim=0)


def _inplace_ok(*tensors: torch.Tensor) -> bool:
    """True when autograd does not need these tensors' values (inference), so they may be overwritten."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


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
        mean_gx = _token_dot(g, xhat).div_(n)
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
    if not _inplace_ok(v, *(() if res is None else (res,))):
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


class ResConvBlock(nn.Module):
    """MONAI-style ``UnetResBlock`` (kernel 3, stride 1).

    ``conv3x3 -> norm -> LeakyReLU -> conv3x3 -> norm -> (+ skip) -> LeakyReLU``, where the skip
    is the identity, or a 1x1 conv followed by the norm when the channel count changes.
    ``norm="batch"`` uses BatchNorm3d, folded into the convolutions in eval mode (same outputs,
    one pass fewer); ``norm="instance"`` uses instance norm without affine parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "instance"):
            raise UserError(f"norm must be 'batch' or 'instance', got {norm!r}")
        self.norm_kind = norm
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        if norm == "batch":
            self.norm1 = nn.BatchNorm3d(out_channels, eps=NORM_EPS)
            self.norm2 = nn.BatchNorm3d(out_channels, eps=NORM_EPS)
        self.skip = nn.Conv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        if self.skip is not None and norm == "batch":
            self.skip_norm = nn.BatchNorm3d(out_channels, eps=NORM_EPS)

    @staticmethod
    def _folded(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _conv_bn(self, x: torch.Tensor, conv: nn.Conv3d, bn: nn.BatchNorm3d | None) -> torch.Tensor:
        pad = conv.padding[0]
        if bn is None:
            return conv3d(x, conv.weight, None, padding=pad)
        if not self.training and bn.track_running_stats and bn.running_var is not None:
            w, b = self._folded(conv, bn)
            return conv3d(x, w, b, padding=pad)
        return bn(conv3d(x, conv.weight, None, padding=pad))

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.norm_kind == "batch"
        norm = (lambda t, bn: bn(t)) if batch else (lambda t, bn: F.instance_norm(t, eps=NORM_EPS))
        h = F.leaky_relu(norm(F.conv3d(x, self.conv1.weight, padding=1), getattr(self, "norm1", None)), LEAKY_SLOPE)
        h = norm(F.conv3d(h, self.conv2.weight, padding=1), getattr(self, "norm2", None))
        res = x if self.skip is None else norm(F.conv3d(x, self.skip.weight), getattr(self, "skip_norm", None))
        return F.leaky_relu(h + res, LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reference_enabled():
            return self._forward_reference(x)
        if self.norm_kind == "instance":
            h = instance_norm_lrelu(self._conv_bn(x, self.conv1, None))
            res = volume_to_tokens(x) if self.skip is None else normalized_projection(x, self.skip.weight)
            return instance_norm_lrelu(self._conv_bn(h, self.conv2, None), res=res)
        h = F.leaky_relu(self._conv_bn(x, self.conv1, self.norm1), LEAKY_SLOPE, inplace=True)
        h = self._conv_bn(h, self.conv2, self.norm2)
        res = volume_to_tokens(x if self.skip is None else self._conv_bn(x, self.skip, self.skip_norm))
        t = volume_to_tokens(h).add_(res)  # BN/conv backward needs neither h nor res
        return tokens_to_volume(F.leaky_relu(t, LEAKY_SLOPE, inplace=True), tuple(x.shape[2:]))


def channel_dropout(t: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``nn.Dropout3d`` on token layout: drops whole channels per sample."""
    if not training or p == 0.0:
        return t
    keep = torch.empty(t.shape[0], 1, t.shape[2], dtype=t.dtype, device=t.device).bernoulli_(1.0 - p)
    return t * keep.div_(1.0 - p)


class TransformerBlock(nn.Module):
    """The EPA block of UNETR++ (official ``TransformerBlock``), on ``(B, N, C)`` tokens.

    ``t = x + pos``; ``a = t + gamma * EPA(LN(t))``; ``h = ResConv^k(a)``;
    ``out = a + Conv1x1(Dropout3d(h))``.
    """

    def __init__(
        self,
        dim: int,
        spatial: tuple[int, int, int],
        proj_size: int,
        num_heads: int,
        kv_proj: str,
        fusion: str,
        conv_blocks: int,
        attn_dropout: float,
        proj_dropout: float,
        head_merge: str,
        trunc_normal_linears: bool,
    ) -> None:
        super().__init__()
        self.spatial = tuple(spatial)
        tokens = math.prod(self.spatial)
        self.proj_dropout = proj_dropout
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = EPA(dim, tokens, proj_size, num_heads, kv_proj, fusion, attn_dropout, head_merge,
                        trunc_normal_linears)
        self.convs = nn.ModuleList(ResConvBlock(dim, dim, "batch") for _ in range(conv_blocks))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x + self.pos_embed
        a = torch.addcmul(t, self.gamma, self.attn(F.layer_norm(t, t.shape[-1:], self.norm.weight,
                                                                self.norm.bias, self.norm.eps)))
        h = tokens_to_volume(a, self.spatial)
        for conv in self.convs:
            h = conv(h)
        h = channel_dropout(volume_to_tokens(h), self.proj_dropout, self.training)
        return torch.addmm(a.reshape(-1, a.shape[-1]), h.reshape(-1, h.shape[-1]), self.proj.weight.t(),
                           beta=1, alpha=1).add_(self.proj.bias).view_as(a)


def shuffle_up(t: torch.Tensor, weight: torch.Tensor, spatial: tuple[int, int, int],
               skip: torch.Tensor | None = None) -> torch.Tensor:
    """Transposed convolution with kernel == stride, bias-free, on tokens.

    ``weight`` is ``(C_in, C_out, kz, ky, kx)`` as in ``nn.ConvTranspose3d``. Computed as one matmul
    ``(B*N, C_in) @ (C_in, C_out*kz*ky*kx)`` and one rearrangement into the finer raster, fused with
    the addition of ``skip`` (tokens at the output resolution) when given. Returns output tokens.
    """
    b = t.shape[0]
    cin, cout, kz, ky, kx = weight.shape
    z, y, x = spatial
    # Columns ordered (kz, ky, kx, C_out): the rearrangement then reads runs of C_out contiguous values.
    m = torch.matmul(t, weight.permute(0, 2, 3, 4, 1).reshape(cin, -1))
    m = m.view(b, z, y, x, kz, ky, kx, cout).permute(0, 1, 4, 2, 5, 3, 6, 7)
    out_shape = (b, z * kz * y * ky * x * kx, cout)
    if skip is None:
        return m.reshape(out_shape)
    s = skip.view(b, z, kz, y, ky, x, kx, cout)
    if _inplace_ok(skip, m) and skip.is_contiguous():
        return s.add_(m).view(out_shape)
    return torch.add(s, m).view(out_shape)


class UpBlock(nn.Module):
    """Decoder stage: transposed conv (k = s = 2) -> add encoder skip -> EPA blocks."""

    def __init__(self, in_dim: int, out_dim: int, spatial: tuple[int, int, int], depth: int,
                 **block_kwargs) -> None:
        super().__init__()
        self.in_spatial = tuple(s // 2 for s in spatial)
        self.up = nn.ConvTranspose3d(in_dim, out_dim, 2, stride=2, bias=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(out_dim, spatial, **block_kwargs) for _ in range(depth)
        )

    def forward(self, t: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        t = shuffle_up(t, self.up.weight, self.in_spatial, skip)
        for blk in self.blocks:
            t = blk(t)
        return t


class Downsample(nn.Module):
    """Patch embedding / downsampling: conv with kernel == stride (no bias) -> GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int], groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, stride, stride=stride, bias=False)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(conv3d(x, self.conv.weight, None, stride=self.conv.stride))


class OutputStage(nn.Module):
    """Full-resolution decoder stage: transposed conv (k = s = stem stride) -> add skip -> ResConvBlock."""

    def __init__(self, in_dim: int, out_dim: int, stride: tuple[int, int, int], spatial: tuple[int, int, int]) -> None:
        super().__init__()
        self.in_spatial = tuple(spatial)
        self.out_spatial = tuple(s * k for s, k in zip(spatial, stride, strict=True))
        self.up = nn.ConvTranspose3d(in_dim, out_dim, stride, stride=stride, bias=False)
        self.block = ResConvBlock(out_dim, out_dim, "instance")

    def forward(self, t: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Tokens at the first stage's resolution + full-resolution skip tokens -> full-resolution tokens."""
        t = shuffle_up(t, self.up.weight, self.in_spatial, skip)
        return volume_to_tokens(self.block(tokens_to_volume(t, self.out_spatial)))


class _TokenHeadFn(torch.autograd.Function):
    """``bias + W t^T``: ``(B, N, C)`` tokens to ``(B, K, N)`` logits, with a token-layout gradient.

    Autograd's own ``bmm`` backward returns the gradient of ``t`` channel-major (the transpose of
    a ``(B, C, N)`` product). Every full-resolution op of the backward pass after it would then
    mix that layout with the channels-last activations: strided, several times slower. Here the
    input gradient is one GEMM written ``(B, N, C)``.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        device = t.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype
        ctx.in_dtypes = (t.dtype, weight.dtype, bias.dtype)
        ctx.weight_shape = weight.shape
        t, w, bias = t.to(dt), weight.flatten(1).to(dt), bias.to(dt)
        b, n = t.shape[0], t.shape[1]
        ctx.save_for_backward(t, w)
        return torch.baddbmm(bias.view(1, -1, 1).expand(b, w.shape[0], n), w.expand(b, *w.shape), t.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t, w = ctx.saved_tensors
        grad = grad.to(t.dtype)
        dt, dw, db = ctx.in_dtypes
        grad_t = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_t = torch.bmm(grad.transpose(1, 2), w.expand(t.shape[0], *w.shape)).to(dt)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(grad, t).sum(dim=0).to(dw).view(ctx.weight_shape)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2)).to(db)
        return grad_t, grad_w, grad_b


class TokenHead(nn.Conv3d):
    """1x1x1 output conv applied to tokens; returns ``(B, K, Z, Y, X)`` logits in standard layout."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, t: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:  # type: ignore[override]
        # bias + (K, C) @ (C, N) per sample: the result is already (B, K, N) contiguous, and the
        # bias is the GEMM's initial output instead of a pass of its own.
        b = t.shape[0]
        if torch.is_grad_enabled() and (t.requires_grad or self.weight.requires_grad):
            out = _TokenHeadFn.apply(t, self.weight, self.bias)
        else:
            w = self.weight.flatten(1)
            bias = self.bias.view(1, -1, 1).expand(b, w.shape[0], t.shape[1])
            out = torch.baddbmm(bias, w.expand(b, *w.shape), t.transpose(1, 2))
        return out.view(b, -1, *spatial)
