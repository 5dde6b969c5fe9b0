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

:meth:`EPA.forward_reference` is the official op order, literally. :meth:`EPA.forward_fast`
computes the same function (equal up to float rounding) another way:

* the L2 normalisation is never materialised: the channel Gram matrix is divided by the outer
  product of the token norms (one GEMM), and the spatial-branch query norm and temperature are
  folded into the (small) projected keys;
* the spatial branch runs through :func:`~unetrpp.network.kernels.spatial_attention` (the fused
  ``scaled_dot_product_attention`` in inference; in training a function that keeps no N x p
  attention matrix for backward);
* the channel attention is applied as one block-diagonal C x C GEMM, fused with the output linear.

``head_merge="official"`` reproduces the official code's ``permute(0, 3, 1, 2).reshape(B, N, C)``
  of the spatial output, which interleaves tokens and channels; it is what the official weights
  were trained with. ``"standard"`` is the usual ``(B, h, N, d) -> (B, N, h*d)`` merge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .dual import DualForward
from .kernels import block_diagonal, spatial_attention, token_l2_norms

KV_PROJECTIONS = ("shared", "separate", "shared_nobias")
FUSIONS = ("concat", "sum")
HEAD_MERGES = ("official", "standard")
_L2_EPS = 1e-12


class EPA(DualForward):
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
        fast: run :meth:`forward_fast` (True) or :meth:`forward_reference` (see
            :mod:`unetrpp.network.dual`).
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
        fast: bool = True,
    ) -> None:
        super().__init__()
        self.fast = fast
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.tokens:
            raise UserError(f"EPA built for {self.tokens} tokens got {x.shape[1]}")
        return super().forward(x)

    def _kv_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The token projections of keys and of spatial values (one module twice when shared)."""
        if self.kv_proj == "separate":
            return self.proj_k, self.proj_v
        return self.proj_kv, self.proj_kv

    def _merge_spatial(self, y: torch.Tensor) -> torch.Tensor:
        """Spatial-branch output ``(B, h, N, d)`` -> ``(B, N, C)`` (``head_merge``, module docstring)."""
        b, _, n, _ = y.shape
        if self.head_merge == "official":
            return y.permute(0, 3, 1, 2).reshape(b, n, self.dim)
        return y.transpose(1, 2).reshape(b, n, self.dim)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official op order, literally (spec section 1.4; used for MAC counting and ONNX export)."""
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        # 1-2: one projection to [q | k | v_channel | v_spatial], each (B, h, d, N)
        qkvv = self.qkvv(x).reshape(b, n, 4, h, d).permute(2, 0, 3, 1, 4)
        q, k, v_c, v_s = (t.transpose(-2, -1) for t in qkvv)
        # 3: project the un-normalised keys and the spatial values along the tokens, N -> p
        proj_k, proj_v = self._kv_projections()
        k_p, v_p = proj_k(k), proj_v(v_s)  # (B, h, d, p)
        # 4: L2-normalise queries and keys along the tokens
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        # 5: channel attention, d x d per head
        attn_c = (q @ k.transpose(-2, -1)) * self.temperature_channel.view(h, 1, 1)
        attn_c = F.dropout(attn_c.softmax(dim=-1), self.attn_dropout, self.training)
        x_c = (attn_c @ v_c).permute(0, 3, 1, 2).reshape(b, n, c)
        # 6: spatial attention, N x p per head
        attn_s = (q.permute(0, 1, 3, 2) @ k_p) * self.temperature_spatial.view(h, 1, 1)
        attn_s = F.dropout(attn_s.softmax(dim=-1), self.attn_dropout, self.training)
        x_s = self._merge_spatial(attn_s @ v_p.transpose(-2, -1))
        # 7: fusion
        if self.fusion == "sum":
            return x_s + x_c
        return torch.cat([self.out_spatial(x_s), self.out_channel(x_c)], dim=-1)

    @staticmethod
    def _project_tokens(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """``(B, N, C) -> (B, p, C)``: the token-axis ``Linear(N, p)``."""
        out = torch.matmul(linear.weight, x)
        if linear.bias is not None:
            out = out + linear.bias.view(-1, 1)
        return out

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_reference` re-associated (module docstring, implementation notes)."""
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
        qk_norm = token_l2_norms(qkvv[..., : 2 * c]).clamp_min(_L2_EPS)
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
        y = spatial_attention(qh, kh, vh, self.attn_dropout if self.training else 0.0)  # (B, h, N, d)
        x_s = self._merge_spatial(y)

        # Channel branch: one C x C Gram GEMM, keep the diagonal d x d head blocks.
        gram = torch.bmm(q.transpose(1, 2), k).view(b, h, d, h, d).diagonal(dim1=1, dim2=3)  # (B, d, d, h)
        gram = gram.permute(0, 3, 1, 2)  # (B, h, d, d)
        logits = gram / (q_norm.view(b, h, d, 1) * k_norm.view(b, h, 1, d))
        attn = (logits * self.temperature_channel.view(1, h, 1, 1)).softmax(dim=-1)
        attn = F.dropout(attn, self.attn_dropout, self.training)
        # x_c[n, (h, i)] = sum_j v[n, (h, j)] attn[h, i, j]: a block-diagonal C x C right factor.
        mix = block_diagonal(attn.transpose(-1, -2), dtype=x.dtype)

        if self.fusion == "sum":
            return x_s + torch.bmm(v_c, mix)
        # out_channel(x_c) = v_c @ (mix @ W^T) + bias: fuse the projection into the small factor.
        w2 = self.out_channel.weight.t()
        x_c = torch.baddbmm(self.out_channel.bias, v_c, torch.matmul(mix, w2))
        return torch.cat([self.out_spatial(x_s), x_c], dim=-1)
