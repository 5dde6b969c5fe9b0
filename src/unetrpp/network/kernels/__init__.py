"""Numerical kernels of the network: custom autograd functions, oneDNN calls and layout tricks.

Every kernel computes what a plain PyTorch expression computes (the modules' ``forward_reference``
spells that expression out); ``tests/network/test_fast_vs_reference.py`` holds each block's fast
forward, which calls these kernels, to its reference forward.
"""

from .attention import block_diagonal, dropout_keep_mask, spatial_attention, token_l2_norms
from .conv import WEIGHT_GRAD_CHOICES, conv3d, slab_weight_grad
from .norm import LEAKY_SLOPE, NORM_EPS, fold_batch_norm, instance_norm_lrelu, normalized_projection
from .tokens import (
    channel_dropout,
    inplace_ok,
    shuffle_up,
    token_dot,
    token_head,
    token_var_mean,
    tokens_to_volume,
    volume_to_tokens,
)

__all__ = [
    "LEAKY_SLOPE",
    "NORM_EPS",
    "WEIGHT_GRAD_CHOICES",
    "block_diagonal",
    "channel_dropout",
    "conv3d",
    "dropout_keep_mask",
    "fold_batch_norm",
    "inplace_ok",
    "instance_norm_lrelu",
    "normalized_projection",
    "shuffle_up",
    "slab_weight_grad",
    "spatial_attention",
    "token_dot",
    "token_head",
    "token_l2_norms",
    "token_var_mean",
    "tokens_to_volume",
    "volume_to_tokens",
]
