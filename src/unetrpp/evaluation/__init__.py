"""Dice, HD95 (mm) and surface Dice with an explicit empty-mask policy; the paper's protocols."""

from .evaluate import PROTOCOLS, evaluate_pairs, protocol_regions
from .metrics import compare_masks, dice_score, hd95

__all__ = ["PROTOCOLS", "compare_masks", "dice_score", "evaluate_pairs", "hd95", "protocol_regions"]
