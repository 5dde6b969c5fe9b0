"""Sliding-window inference with Gaussian importance weighting and mirroring (spec section 4).

Windows of the training patch size tile the (padded) volume with a step of ``step * patch``;
each window's softmax is multiplied by a Gaussian centred on the patch (sigma = patch / 8,
maximum 1, zeros replaced by the smallest non-zero value) and accumulated together with the
weights; the result is the weighted mean. Mirroring test-time augmentation averages the softmax
of the window and its flips over every subset of the three spatial axes (8 passes).

Memory: only the accumulator ``(k, z, y, x)`` and one weight volume are held, in float32, on the
accumulation device (the compute device unless it cannot hold them, then the CPU); windows are
computed ``batch`` at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch

MIRROR_AXES = (0, 1, 2)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """The importance map of a window: a Gaussian, sigma = ``patch * sigma_scale``, maximum 1, no zeros."""
    axes = []
    for n in patch_size:
        centre, sigma = n // 2, n * sigma_scale
        x = np.arange(n, dtype=np.float64) - centre
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g /= g.max()
    g = g.astype(np.float32)
    nonzero = g[g > 0]
    g[g == 0] = nonzero.min()
    return torch.from_numpy(g)


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """Start offsets along one axis: ``ceil((S - P) / (step P)) + 1`` positions evenly spaced from 0 to ``S - P``."""
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}; pad first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    n = math.ceil((size - patch) / (step * patch)) + 1
    if n == 1:
        return [0]
    spacing = (size - patch) / (n - 1)
    return [round(i * spacing) for i in range(n)]


def window_grid(shape: Sequence[int], patch: Sequence[int], step: float) -> list[tuple[int, int, int]]:
    return list(itertools.product(*(window_starts(s, p, step) for s, p in zip(shape, patch, strict=True))))


def _pad_to(image: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad ``(c, z, y, x)`` with zeros (centred) so every axis is at least the patch; the slices undo it."""
    shape = image.shape[1:]
    pads, region = [], []
    for s, p in zip(shape, patch, strict=True):
        total = max(p - s, 0)
        lo = total // 2
        pads.append((lo, total - lo))
        region.append(slice(lo, lo + s))
    if not any(sum(p) for p in pads):
        return image, tuple(region)
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad wants the last axis first
    return torch.nn.functional.pad(image, flat), tuple(region)


def autocast_for(device: torch.device, amp: str) -> object:
    """An autocast context for ``amp`` in ``off | bf16 | fp16`` (fp16 only on CUDA)."""
    if amp == "off":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be off, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use --amp bf16 or off on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def sliding_window_probabilities(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = MIRROR_AXES,
    batch: int = 2,
    device: str | torch.device = "cpu",
    amp: str = "off",
    accumulate_on: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Class probabilities ``(k, z, y, x)`` (float32) of a ``(c, z, y, x)`` volume.

    Args:
        network: maps ``(b, c, *patch)`` to logits ``(b, k, *patch)`` (one head, no deep supervision).
        step: window step as a fraction of the patch (0.5: half-overlapping windows).
        mirror_axes: spatial axes (0 = z) for mirroring TTA; ``()`` turns TTA off.
        batch: windows per forward pass.
        accumulate_on: device of the accumulator (default: ``device``, or the CPU if it does not fit).
    """
    device = torch.device(device)
    patch = tuple(int(p) for p in patch_size)
    image = torch.as_tensor(image)
    if image.dim() != 4:
        raise ValueError(f"image must be (c, z, y, x), got shape {tuple(image.shape)}")
    image, region = _pad_to(image.float(), patch)
    shape = tuple(image.shape[1:])
    acc_device = torch.device(accumulate_on) if accumulate_on is not None else device
    try:
        acc = torch.zeros((num_classes, *shape), dtype=torch.float32, device=acc_device)
        weight = torch.zeros(shape, dtype=torch.float32, device=acc_device)
    except torch.OutOfMemoryError:
        acc_device = torch.device("cpu")
        acc = torch.zeros((num_classes, *shape), dtype=torch.float32)
        weight = torch.zeros(shape, dtype=torch.float32)
    g = gaussian_importance(patch).to(device)
    g_acc = g.to(acc_device)
    flips = [list(a) for r in range(len(mirror_axes) + 1) for a in itertools.combinations(mirror_axes, r)]
    windows = window_grid(shape, patch, step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), desc="windows", unit="win", leave=False)
    try:
        for i in range(0, len(windows), batch):
            starts = windows[i : i + batch]
            boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in starts]
            x = torch.stack([image[(slice(None), *b)] for b in boxes]).to(device, non_blocking=True)
            probs = None
            for axes in flips:
                dims = [a + 2 for a in axes]
                xi = torch.flip(x, dims) if dims else x
                with autocast_for(device, amp):
                    logits = network(xi)
                p = torch.softmax(logits.float(), dim=1)
                if dims:
                    p = torch.flip(p, dims)
                probs = p if probs is None else probs.add_(p)
            probs.mul_(g / len(flips))
            probs = probs.to(acc_device)
            for b, box in enumerate(boxes):
                acc[(slice(None), *box)] += probs[b]
                weight[box] += g_acc
            if bar:
                bar.update(len(starts))
    finally:
        if bar:
            bar.close()
    acc /= weight
    return acc[(slice(None), *region)]
