"""Soft Dice + cross-entropy with deep supervision (nnU-Net's ``DC_and_CE_loss``, as UNETR++ trains)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

DEEP_SUPERVISION_WEIGHTS = (4 / 7, 2 / 7, 1 / 7)


def _dice_terms(probs: torch.Tensor, labels: torch.Tensor, batch_dice: bool):
    """Per (sample, class) or per class: ``tp`` and ``|P| + |G|`` without a one-hot tensor."""
    b, k = probs.shape[:2]
    flat_p = probs.reshape(b, k, -1)
    flat_t = labels.reshape(b, 1, -1).long()
    p_true = flat_p.gather(1, flat_t)[:, 0]  # probability of the true class at each voxel
    tp = probs.new_zeros(b, k).scatter_add_(1, flat_t[:, 0], p_true)
    size_p = flat_p.sum(-1)
    size_g = torch.zeros(b, k, dtype=probs.dtype, device=probs.device).scatter_add_(
        1, flat_t[:, 0], torch.ones_like(p_true))
    if batch_dice:
        tp, size_p, size_g = tp.sum(0), size_p.sum(0), size_g.sum(0)
    return tp, size_p + size_g


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = False,
                   include_background: bool = False, smooth: float = 1e-5,
                   probs: torch.Tensor | None = None) -> torch.Tensor:
    """``-mean(Dice)`` of softmax probabilities against integer labels (nnU-Net's ``SoftDiceLoss``).

    ``Dice = (2 tp + smooth) / (2 tp + fp + fn + smooth + 1e-8)`` with ``2 tp + fp + fn = |P| + |G|``.

    Args:
        logits: ``(B, K, *spatial)``.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels in ``[0, K)``.
        batch_dice: sum over the batch as well as space (one Dice per class) instead of one
            Dice per sample and class.
        include_background: include class 0 in the mean.
        smooth: added to numerator and denominator (nnU-Net: 1e-5).
        probs: the softmax of ``logits`` if already computed.
    """
    if target.dim() == logits.dim():
        target = target[:, 0]
    if probs is None:
        probs = logits.float().softmax(dim=1)
    tp, sizes = _dice_terms(probs, target, batch_dice)
    dice = (2 * tp + smooth) / (sizes + smooth + 1e-8)
    if not include_background:
        dice = dice[..., 1:]
    return -dice.mean()


class DiceCELoss(nn.Module):
    """``CE + soft Dice`` (weights 1:1), the UNETR++ training loss."""

    def __init__(self, batch_dice: bool = False, include_background: bool = False,
                 weight_ce: float = 1.0, weight_dice: float = 1.0) -> None:
        super().__init__()
        self.batch_dice, self.include_background = batch_dice, include_background
        self.weight_ce, self.weight_dice = weight_ce, weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, 0] if target.dim() == logits.dim() else target
        log_probs = logits.float().log_softmax(dim=1)
        ce = F.nll_loss(log_probs, labels.long())
        dice = soft_dice_loss(logits, labels, self.batch_dice, self.include_background, probs=log_probs.exp())
        return self.weight_ce * ce + self.weight_dice * dice


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of integer labels ``(B, *spatial)`` to ``shape``."""
    if tuple(target.shape[-len(shape):]) == tuple(shape):
        return target
    out = F.interpolate(target.unsqueeze(1).float(), size=tuple(shape), mode="nearest")
    return out[:, 0].to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the heads, targets downsampled by nearest neighbour.

    Weights default to the official ``1, 1/2, 1/4`` normalised: ``4/7, 2/7, 1/7``.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] = DEEP_SUPERVISION_WEIGHTS) -> None:
        super().__init__()
        self.loss = loss
        total = float(sum(weights))
        self.weights = tuple(float(w) / total for w in weights)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        if len(outputs) > len(self.weights):
            raise UserError(f"{len(outputs)} outputs but only {len(self.weights)} deep-supervision weights")
        labels = target[:, 0] if target.dim() == outputs[0].dim() else target
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.weights, outputs, strict=False):
            total = total + w * self.loss(out, downsample_target(labels, out.shape[2:]))
        return total
