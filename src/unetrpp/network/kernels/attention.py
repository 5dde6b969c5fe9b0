"""Attention kernels of EPA: token-axis L2 norms, memory-lean spatial attention, a fast dropout mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats to float32; float32 and float64 unchanged (no copy)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def dropout_keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask, each element kept with probability ``1 - p`` (independently).

    On the CPU, ``rand >= p`` costs one Mersenne-Twister draw and a float conversion per element:
    about 130 ms for the 16.8 M attention weights of one first-stage block at batch 2. Here each
    64-bit draw gives two independent uniform 32-bit integers, compared with ``p * 2^32``: half
    the draws, and P(keep) exact to 2^-32 (float uniforms: 2^-24).
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    n = math.prod(shape)
    draws = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits
    threshold = -(2**31) + round(p * 2**32)  # signed view: uniform on [-2^31, 2^31)
    return (draws.view(torch.int32)[:n] >= threshold).view(shape)


class _SpatialAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T)) v`` for the spatial branch (few keys: p), memory-lean in training.

    Keeps q, k, v and the dropout mask as booleans for backward, and recomputes the N x p softmax
    there instead of keeping it (SDPA's training path keeps several N x p float tensors per block).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float):
        # Under autocast the products run in its dtype and the softmax in float32, in forward and in
        # backward alike (backward runs outside autocast, so the casts are explicit). In float32 every
        # cast below is a no-op.
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        device = q.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        attn = _upcast(torch.matmul(q, k.transpose(-1, -2))).softmax(dim=-1)
        mask = None
        if dropout > 0:
            mask = dropout_keep_mask(tuple(attn.shape), dropout, attn.device)
            attn.mul_(mask).mul_(1.0 / (1.0 - dropout))
        ctx.dropout = dropout
        ctx.save_for_backward(q, k, v, mask)
        return torch.matmul(attn.to(dt), v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, mask = ctx.saved_tensors
        dt = q.dtype
        grad = grad.to(dt)
        attn = _upcast(torch.matmul(q, k.transpose(-1, -2))).softmax(dim=-1)
        grad_attn = _upcast(torch.matmul(grad, v.transpose(-1, -2)))
        if mask is not None:
            scale = 1.0 / (1.0 - ctx.dropout)
            kept = attn * mask * scale
            grad_attn.mul_(mask).mul_(scale)
        else:
            kept = attn
        # (p, N) @ (N, d) products are written as ((d, N) @ (N, p))^T: BLAS is ~4x faster that way round
        grad_v = torch.matmul(grad.transpose(-1, -2), kept.to(dt)).transpose(-1, -2)
        # softmax backward: a * (g - sum(g * a))
        grad_logits = grad_attn.sub_((grad_attn * attn).sum(dim=-1, keepdim=True)).mul_(attn).to(dt)
        grad_q = torch.matmul(grad_logits, k)
        grad_k = torch.matmul(q.transpose(-1, -2), grad_logits).transpose(-1, -2)
        dq, dk, dv = ctx.in_dtypes
        return grad_q.to(dq), grad_k.to(dk), grad_v.to(dv), None


def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """``dropout(softmax(q k^T)) v`` (no scaling) over ``(B, h, N, d)`` queries and ``(B, h, p, d)`` keys/values.

    With autograd, :class:`_SpatialAttention`; in inference, the fused ``scaled_dot_product_attention``.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _SpatialAttention.apply(q, k, v, dropout)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


class _TokenNorm(torch.autograd.Function):
    """L2 norms over the token axis, ``(B, N, C) -> (B, C)``, as one GEMM with a row of ones.

    ``linalg.vector_norm(x, dim=1)`` reduces across the strided token axis element by element:
    3-7x slower here, and one of the largest costs of an EPA block at N = 32k. The GEMM
    accumulates blockwise (relative error ~1e-7). Backward keeps only ``x`` (a view of the qkv
    projection, already kept) and the norms.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        # float32 under autocast too, as autocast runs vector_norm: the norms divide every logit
        with torch.autocast(x.device.type, enabled=False):
            xf = _upcast(x)
            norm = torch.bmm(xf.new_ones(x.shape[0], 1, x.shape[1]), xf.square()).squeeze(1).sqrt_()
        ctx.save_for_backward(x, norm)
        return norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, torch.zeros_like(norm))  # d|x|/dx = x/|x|; 0 at 0
        return (x * scale.unsqueeze(1)).to(x.dtype)


def token_l2_norms(x: torch.Tensor) -> torch.Tensor:
    """``linalg.vector_norm(x, dim=1)`` of ``(B, N, C)`` tokens, as ``(B, C)`` (see :class:`_TokenNorm`)."""
    return _TokenNorm.apply(x)


def block_diagonal(blocks: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, h, d, d)`` per-head matrices -> ``(B, h*d, h*d)`` block-diagonal matrix (zeros elsewhere).

    ``x @ block_diagonal(A^T)`` applies every head's ``A`` to its own ``d`` channels of ``x`` in one
    GEMM (multiplying ``(h - 1) / h`` zeros, still faster than ``h`` small GEMMs).
    """
    b, h, d, _ = blocks.shape
    out = blocks.new_zeros(b, h, d, h, d, dtype=dtype)
    out.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
    return out.view(b, h * d, h * d)
