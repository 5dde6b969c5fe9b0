"""What the measurements compare against or run on: standard multi-head self-attention, MONAI's
sliding-window driver, and a synthetic CT-like volume."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


class MultiHeadSelfAttention(nn.Module):
    """Standard MHSA on ``(B, N, C)`` tokens: one qkv linear, fused SDPA, output linear (the baseline)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


#: CT normalisation of the synthetic benchmark volume (a plans' ``normalization`` entry).
CT_NORMALISATION = {"channel": "CT", "scheme": "ct", "clip": [-175.0, 250.0], "mean": 50.0, "std": 60.0}


def ct_like_volume(shape: Sequence[int]):
    """A deterministic ``(z, y, x)`` float32 volume in Hounsfield units: air, a soft-tissue body, a bone bar."""
    import numpy as np

    rng = np.random.default_rng(0)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.48 * shape[2])) ** 2 < 1
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, tuple(shape))
    image[:, int(shape[1] * 0.7):int(shape[1] * 0.8), int(shape[2] * 0.45):int(shape[2] * 0.55)] = 700.0
    return image.astype(np.float32)


#: The eight mirrorings of a ``(B, C, z, y, x)`` tensor: none, each axis, each pair, all three.
MIRROR_COMBOS = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


def monai_inferer():
    """MONAI's ``sliding_window_inference`` (a :class:`UserError` without MONAI); import it before timing."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        raise UserError("--monai needs MONAI: pip install --no-deps monai") from None
    return sliding_window_inference


def monai_sliding_probabilities(model: nn.Module, x: torch.Tensor, patch: Sequence[int], batch: int, step: float,
                                flips: int, device, amp: str = "off", softmax_windows: bool = False) -> torch.Tensor:
    """MONAI's ``sliding_window_inference`` (Gaussian, sigma 1/8, overlap ``1 - step``) driving ``model`` on
    ``x`` ``(1, C, z, y, x)`` and its first ``flips`` mirrorings; the softmax probabilities averaged.

    ``softmax_windows``: blend each window's softmax (what our driver and the official protocol blend)
    instead of its logits (MONAI's usual use), so the answer is comparable voxel for voxel.
    """
    from ..runtime import autocast

    sliding_window_inference = monai_inferer()

    def windows(t: torch.Tensor) -> torch.Tensor:
        out = model(t)
        return torch.softmax(out.float(), 1) if softmax_windows else out

    acc = None
    with torch.inference_mode(), autocast(device, amp):
        for axes in MIRROR_COMBOS[:flips]:
            xi = torch.flip(x, axes) if axes else x
            blended = sliding_window_inference(xi, tuple(patch), batch, windows, overlap=1 - step,
                                               mode="gaussian", sigma_scale=0.125)
            p = blended.float() if softmax_windows else torch.softmax(blended.float(), 1)
            p = torch.flip(p, axes) if axes else p
            acc = p if acc is None else acc.add_(p)
    return acc[0] / flips
