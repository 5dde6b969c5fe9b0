"""Efficient Paired Attention (EPA), the attention of UNETR++.

One ``Linear(C, 4C)`` gives queries, keys and two values ``[q | k | v_channel | v_spatial]``,
each head-major. Queries and keys are shared by two branches:

* channel branch: per head, ``A = softmax(tau_c * q^ k^T)`` over the ``d x d`` channel pairs
  (q^, k^ L2-normalised along the tokens), applied to ``v_channel``. Cost O(N d^2).
* spatial branch: keys and ``v_spatial`` are projected along the token axis from N to p tokens
  (``Linear(N, p)``), ``A = softmax(tau_s * q^T k_p)`` over the p projected tokens, applied to
  the projected values. Cost O(N p), linear in N.

The two branch outputs are fused by two half-width linears and a concatenation (spatial half
first) or by a sum.

Implementation notes (outputs equal the textbook formulation up to float rounding):

* the L2 normalisation is never materialised: the channel Gram matrix is divided by the outer
  product of the token norms (one GEMM), and the spatial-branch query norm and temperature are
  folded into the (small) projected keys;
* the spatial branch runs through ``scaled_dot_product_attention`` (fused kernel, no N x p
  attention matrix kept for backward);
* ``head_merge="official"`` reproduces the official code's ``permute(0, 3, 1, 2).reshape(B, N, C)``
  of the spatial output, which interleaves tokens and channels; it is what the official weights
  were trained with. ``"standard"`` is the usual ``(B, h, N, d) -> (B, N, h*d)`` merge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ._mode import reference_enabled

KV_PROJECTIONS = ("shared", "separate", "shared_nobias")
FUSIONS = ("concat", "sum")
HEAD_MERGES = ("official", "standard")
_L2_EPS = 1e-12


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


class EPA(nn.Module):
    """Efficient Paired Attention on ``(B, N, C)`` tokens.

    Args:
        dim: channels C.
        tokens: number of tokens N (fixed: the token projections are ``Linear(N, p)``).
        proj_size: projected token count p of the spatial branch.
        num_heads: heads h; ``dim`` must be divisible by it.
        kv_proj: ``"shared"`` one ``Linear(N, p)`` for keys and values (official Synapse),
            ``"separate"`` two (official ACDC, Lung), ``"shared_nobias"`` one bias-free
            projection (official BraTS ``EF``).
        fusion: ``"concat"`` (two ``Linear(C, C/2)``, spatial half first) or ``"sum"``.
        attn_dropout: dropout on both attention maps.
        head_merge: ``"official"`` or ``"standard"`` (see module docstring).
        trunc_normal_linears: initialise the linears with truncated normal (std 0.02), as the
            official encoder does; otherwise PyTorch's default, as its decoder does.
    """

    def __init__(
        self,
        dim: int,
        tokens: int,
        proj_size: int,
        num_heads: int,
        kv_proj: str = "shared",
        fusion: str = "concat",
        attn_dropout: float = 0.0,
        head_merge: str = "official",
        trunc_normal_linears: bool = True,
    ) -> None:
        super().__init__()
        if kv_proj not in KV_PROJECTIONS:
            raise UserError(f"kv_proj must be one of {KV_PROJECTIONS}, got {kv_proj!r}")
        if fusion not in FUSIONS:
            raise UserError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if head_merge not in HEAD_MERGES:
            raise UserError(f"head_merge must be one of {HEAD_MERGES}, got {head_merge!r}")
        if dim % num_heads:
            raise UserError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.tokens, self.proj_size, self.num_heads = dim, tokens, proj_size, num_heads
        self.kv_proj, self.fusion, self.head_merge = kv_proj, fusion, head_merge
        self.attn_dropout = attn_dropout
        self.qkvv = nn.Linear(dim, 4 * dim, bias=False)
        self.temperature_channel = nn.Parameter(torch.ones(num_heads))
        self.temperature_spatial = nn.Parameter(torch.ones(num_heads))
        if kv_proj == "separate":
            self.proj_k = nn.Linear(tokens, proj_size)
            self.proj_v = nn.Linear(tokens, proj_size)
        else:
            self.proj_kv = nn.Linear(tokens, proj_size, bias=kv_proj == "shared")
        if fusion == "concat":
            if dim % 2:
                raise UserError(f"fusion='concat' needs an even dim, got {dim}")
            self.out_spatial = nn.Linear(dim, dim // 2)
            self.out_channel = nn.Linear(dim, dim // 2)
        self._init(trunc_normal_linears)

    def _init(self, trunc_normal_linears: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear) and trunc_normal_linears:
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.kv_proj == "shared_nobias":
            bound = 1.0 / math.sqrt(self.proj_size)
            nn.init.uniform_(self.proj_kv.weight, -bound, bound)

    def _project_tokens(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """``(B, N, C) -> (B, p, C)``: the token-axis ``Linear(N, p)``."""
        out = torch.matmul(linear.weight, x)
        if linear.bias is not None:
            out = out + linear.bias.view(-1, 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.tokens:
            raise UserError(f"EPA built for {self.tokens} tokens got {x.shape[1]}")
        if reference_enabled():
            return self._forward_reference(x)
        return self._forward_fast(x)

    def _kv_projections(self) -> tuple[nn.Linear, nn.Linear]:
        if self.kv_proj == "separate":
            return self.proj_k, self.proj_v
        return self.proj_kv, self.proj_kv

    def _merge_spatial(self, y: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = y.shape
        if self.head_merge == "official":
            return y.permute(0, 3, 1, 2).reshape(b, n, self.dim)
        return y.transpose(1, 2).reshape(b, n, self.dim)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        # Output columns [q | k | v_spatial | v_channel] (weights stored in the official order
        # [q | k | v_channel | v_spatial]): with one shared token projection, keys and spatial values
        # are then adjacent and projected by one GEMM.
        w = self.qkvv.weight
        shared = self.kv_proj != "separate"
        if shared:
            w = torch.cat([w[: 2 * c], w[3 * c:], w[2 * c: 3 * c]])
        qkvv = F.linear(x, w)
        if shared:
            q, k, v_s, v_c = qkvv.split(c, dim=-1)
        else:
            q, k, v_c, v_s = qkvv.split(c, dim=-1)

        # Token-axis L2 norms of q and k in one reduction (F.normalize: divide by max(norm, eps)).
        qk_norm = _TokenNorm.apply(qkvv[..., : 2 * c]).clamp_min(_L2_EPS)
        q_norm, k_norm = qk_norm[:, :c], qk_norm[:, c:]

        # Spatial branch: project un-normalised keys and spatial values along the tokens, then fold
        # the query normalisation and the temperature into the (p x C) projected keys.
        proj_k, proj_v = self._kv_projections()
        if shared:
            k_p, v_p = self._project_tokens(qkvv[..., c: 3 * c], proj_k).split(c, dim=-1)
        else:
            k_p, v_p = self._project_tokens(k, proj_k), self._project_tokens(v_s, proj_v)
        p = k_p.shape[1]
        k_p = k_p * (self.temperature_spatial.repeat_interleave(d) / q_norm).unsqueeze(1)
        qh, kh, vh = (q.view(b, n, h, d).transpose(1, 2), k_p.view(b, p, h, d).transpose(1, 2),
                      v_p.view(b, p, h, d).transpose(1, 2))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (qh, kh, vh)):
            y = _SpatialAttention.apply(qh, kh, vh, self.attn_dropout if self.training else 0.0)
        else:  # inference: the fused kernel
            y = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)  # (B, h, N, d)
        x_s = self._merge_spatial(y)

        # Channel branch: one C x C Gram GEMM, keep the diagonal d x d head blocks.
        gram = torch.bmm(q.transpose(1, 2), k).view(b, h, d, h, d).diagonal(dim1=1, dim2=3)  # (B, d, d, h)
        gram = gram.permute(0, 3, 1, 2)  # (B, h, d, d)
        logits = gram / (q_norm.view(b, h, d, 1) * k_norm.view(b, h, 1, d))
        attn = (logits * self.temperature_channel.view(1, h, 1, 1)).softmax(dim=-1)
        attn = F.dropout(attn, self.attn_dropout, self.training)
        # x_c[n, (h, i)] = sum_j v[n, (h, j)] attn[h, i, j]: a block-diagonal C x C right factor.
        mix = x.new_zeros(b, h, d, h, d)
        mix.diagonal(dim1=1, dim2=3).copy_(attn.permute(0, 3, 2, 1))
        mix = mix.view(b, c, c)

        if self.fusion == "sum":
            return x_s + torch.bmm(v_c, mix)
        # out_channel(x_c) = v_c @ (mix @ W^T) + bias: fuse the projection into the small factor.
        w2 = self.out_channel.weight.t()
        x_c = torch.baddbmm(self.out_channel.bias, v_c, torch.matmul(mix, w2))
        return torch.cat([self.out_spatial(x_s), x_c], dim=-1)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official op order, literally (used for MAC counting and as the readable spec)."""
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        qkvv = self.qkvv(x).reshape(b, n, 4, h, d).permute(2, 0, 3, 1, 4)
        q, k, v_c, v_s = (t.transpose(-2, -1) for t in qkvv)  # (B, h, d, N)
        proj_k, proj_v = self._kv_projections()
        k_p, v_p = proj_k(k), proj_v(v_s)  # (B, h, d, p)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn_c = (q @ k.transpose(-2, -1)) * self.temperature_channel.view(h, 1, 1)
        attn_c = F.dropout(attn_c.softmax(dim=-1), self.attn_dropout, self.training)
        x_c = (attn_c @ v_c).permute(0, 3, 1, 2).reshape(b, n, c)
        attn_s = (q.permute(0, 1, 3, 2) @ k_p) * self.temperature_spatial.view(h, 1, 1)
        attn_s = F.dropout(attn_s.softmax(dim=-1), self.attn_dropout, self.training)
        x_s = self._merge_spatial(attn_s @ v_p.transpose(-2, -1))
        if self.fusion == "sum":
            return x_s + x_c
        return torch.cat([self.out_spatial(x_s), self.out_channel(x_c)], dim=-1)

