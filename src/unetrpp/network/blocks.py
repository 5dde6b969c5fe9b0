"""Building blocks of UNETR++: residual conv blocks, the EPA transformer block, up-sampling, heads.

Every block has a ``forward_reference`` (the official op order in plain PyTorch, spec section 1)
and a ``forward_fast`` (the same function through :mod:`unetrpp.network.kernels`); see
:mod:`unetrpp.network.dual`. Between blocks, activations are ``(B, N, C)`` tokens in C-order over
``(Z, Y, X)``, whose memory is the channels-last layout of the ``(B, C, Z, Y, X)`` volume
(:func:`~unetrpp.network.kernels.tokens_to_volume` and ``volume_to_tokens`` are free views).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .dual import DualForward
from .epa import EPA
from .kernels import (
    LEAKY_SLOPE,
    NORM_EPS,
    channel_dropout,
    conv3d,
    fold_batch_norm,
    instance_norm_lrelu,
    normalized_projection,
    shuffle_up,
    token_head,
    tokens_to_volume,
    volume_to_tokens,
)


class ResConvBlock(DualForward):
    """MONAI-style ``UnetResBlock`` (kernel 3, stride 1), on ``(B, C, Z, Y, X)`` volumes.

    ``conv3x3 -> norm -> LeakyReLU -> conv3x3 -> norm -> (+ skip) -> LeakyReLU``, where the skip
    is the identity, or a 1x1 conv followed by the norm when the channel count changes.
    ``norm="batch"`` uses BatchNorm3d; ``norm="instance"`` uses instance norm without affine
    parameters. The fast forward folds BatchNorm into the convolutions in eval mode (same outputs,
    one pass fewer) and fuses instance norm with the activation.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", fast: bool = True) -> None:
        super().__init__()
        if norm not in ("batch", "instance"):
            raise UserError(f"norm must be 'batch' or 'instance', got {norm!r}")
        self.fast = fast
        self.norm_kind = norm
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        if norm == "batch":
            self.norm1 = nn.BatchNorm3d(out_channels, eps=NORM_EPS)
            self.norm2 = nn.BatchNorm3d(out_channels, eps=NORM_EPS)
        self.skip = nn.Conv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        if self.skip is not None and norm == "batch":
            self.skip_norm = nn.BatchNorm3d(out_channels, eps=NORM_EPS)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The block's norm ``name`` (``norm1``, ``norm2``, ``skip_norm``) applied to ``x``."""
        if self.norm_kind == "batch":
            return getattr(self, name)(x)
        return F.instance_norm(x, eps=NORM_EPS)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self._norm(self.conv1(x), "norm1"), LEAKY_SLOPE)
        h = self._norm(self.conv2(h), "norm2")
        res = x if self.skip is None else self._norm(self.skip(x), "skip_norm")
        return F.leaky_relu(h + res, LEAKY_SLOPE)

    def _conv_bn(self, x: torch.Tensor, conv: nn.Conv3d, bn: nn.BatchNorm3d | None) -> torch.Tensor:
        pad = conv.padding[0]
        if bn is None:
            return conv3d(x, conv.weight, None, padding=pad)
        if not self.training and bn.track_running_stats and bn.running_var is not None:
            w, b = fold_batch_norm(conv, bn)
            return conv3d(x, w, b, padding=pad)
        return bn(conv3d(x, conv.weight, None, padding=pad))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "instance":
            h = instance_norm_lrelu(self._conv_bn(x, self.conv1, None))
            res = volume_to_tokens(x) if self.skip is None else normalized_projection(x, self.skip.weight)
            return instance_norm_lrelu(self._conv_bn(h, self.conv2, None), res=res)
        h = F.leaky_relu(self._conv_bn(x, self.conv1, self.norm1), LEAKY_SLOPE, inplace=True)
        h = self._conv_bn(h, self.conv2, self.norm2)
        res = volume_to_tokens(x if self.skip is None else self._conv_bn(x, self.skip, self.skip_norm))
        t = volume_to_tokens(h).add_(res)  # BN/conv backward needs neither h nor res
        return tokens_to_volume(F.leaky_relu(t, LEAKY_SLOPE, inplace=True), tuple(x.shape[2:]))


class TransformerBlock(DualForward):
    """The EPA block of UNETR++ (official ``TransformerBlock``), on ``(B, N, C)`` tokens.

    ``t = x + pos``; ``a = t + gamma * EPA(LN(t))``; ``h = ResConv^k(a)``;
    ``out = a + Conv1x1(Dropout3d(h))`` (the 1x1 conv is :attr:`proj`, a ``Linear`` on tokens).
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
        fast: bool = True,
    ) -> None:
        super().__init__()
        self.fast = fast
        self.spatial = tuple(spatial)
        tokens = math.prod(self.spatial)
        self.proj_dropout = proj_dropout
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = EPA(dim, tokens, proj_size, num_heads, kv_proj, fusion, attn_dropout, head_merge,
                        trunc_normal_linears, fast=fast)
        self.convs = nn.ModuleList(ResConvBlock(dim, dim, "batch", fast=fast) for _ in range(conv_blocks))
        self.proj = nn.Linear(dim, dim)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Spec section 1.3, steps 2-6."""
        t = x + self.pos_embed
        a = t + self.gamma * self.attn(self.norm(t))
        s = tokens_to_volume(a, self.spatial)
        h = s
        for conv in self.convs:
            h = conv(h)
        h = F.dropout3d(h, self.proj_dropout, self.training)
        conv8 = self.proj.weight.view(*self.proj.weight.shape, 1, 1, 1)
        return volume_to_tokens(s + F.conv3d(h, conv8, self.proj.bias))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        t = x + self.pos_embed
        a = torch.addcmul(t, self.gamma, self.attn(F.layer_norm(t, t.shape[-1:], self.norm.weight,
                                                                self.norm.bias, self.norm.eps)))
        h = tokens_to_volume(a, self.spatial)
        for conv in self.convs:
            h = conv(h)
        h = channel_dropout(volume_to_tokens(h), self.proj_dropout, self.training)
        # the 1x1 conv as one GEMM on tokens, accumulated onto the residual
        return torch.addmm(a.reshape(-1, a.shape[-1]), h.reshape(-1, h.shape[-1]), self.proj.weight.t(),
                           beta=1, alpha=1).add_(self.proj.bias).view_as(a)


class UpBlock(DualForward):
    """Decoder stage (official ``UnetrUpBlock``): transposed conv (k = s = 2) -> add encoder skip -> EPA blocks.

    Takes and returns tokens; ``skip`` is tokens at the output resolution ``spatial``.
    """

    def __init__(self, in_dim: int, out_dim: int, spatial: tuple[int, int, int], depth: int,
                 fast: bool = True, **block_kwargs) -> None:
        super().__init__()
        self.fast = fast
        self.in_spatial = tuple(s // 2 for s in spatial)
        self.up = nn.ConvTranspose3d(in_dim, out_dim, 2, stride=2, bias=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(out_dim, spatial, fast=fast, **block_kwargs) for _ in range(depth)
        )

    def forward_reference(self, t: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        t = volume_to_tokens(self.up(tokens_to_volume(t, self.in_spatial))) + skip
        for blk in self.blocks:
            t = blk(t)
        return t

    def forward_fast(self, t: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        t = shuffle_up(t, self.up.weight, self.in_spatial, skip)  # the transposed conv and the addition
        for blk in self.blocks:
            t = blk(t)
        return t


class Downsample(DualForward):
    """Patch embedding / downsampling: conv with kernel == stride (no bias) -> GroupNorm, on volumes."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int], groups: int,
                 fast: bool = True) -> None:
        super().__init__()
        self.fast = fast
        self.conv = nn.Conv3d(in_channels, out_channels, stride, stride=stride, bias=False)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(conv3d(x, self.conv.weight, None, stride=self.conv.stride))


class OutputStage(DualForward):
    """Full-resolution decoder stage (official ``decoder2``): transposed conv (k = s = stem stride)
    -> add skip -> ResConvBlock (instance norm).

    Tokens at the first stage's resolution + full-resolution skip tokens -> full-resolution tokens.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: tuple[int, int, int], spatial: tuple[int, int, int],
                 fast: bool = True) -> None:
        super().__init__()
        self.fast = fast
        self.in_spatial = tuple(spatial)
        self.out_spatial = tuple(s * k for s, k in zip(spatial, stride, strict=True))
        self.up = nn.ConvTranspose3d(in_dim, out_dim, stride, stride=stride, bias=False)
        self.block = ResConvBlock(out_dim, out_dim, "instance", fast=fast)

    def forward_reference(self, t: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(tokens_to_volume(t, self.in_spatial)) + tokens_to_volume(skip, self.out_spatial)
        return volume_to_tokens(self.block(x))

    def forward_fast(self, t: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        t = shuffle_up(t, self.up.weight, self.in_spatial, skip)  # the transposed conv and the addition
        return volume_to_tokens(self.block(tokens_to_volume(t, self.out_spatial)))


class TokenHead(DualForward, nn.Conv3d):
    """1x1x1 output conv (official ``UnetOutBlock``) applied to tokens; returns ``(B, K, Z, Y, X)`` logits."""

    def __init__(self, in_channels: int, out_channels: int, fast: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1)
        self.fast = fast

    def forward_reference(self, t: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:
        return F.conv3d(tokens_to_volume(t, spatial), self.weight, self.bias)

    def forward_fast(self, t: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:
        return token_head(t, self.weight, self.bias).view(t.shape[0], -1, *spatial)
