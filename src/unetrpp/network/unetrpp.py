"""UNETR++: one parameterised implementation of every official variant.

The blocks are in ``blocks.py`` and ``epa.py``; persistence (``save_pretrained``,
``from_pretrained``, official checkpoints) in ``weights.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError, refuse_unknown_fields
from .blocks import Downsample, OutputStage, ResConvBlock, TokenHead, TransformerBlock, UpBlock
from .dual import set_fast
from .epa import FUSIONS, HEAD_MERGES, KV_PROJECTIONS
from .kernels import tokens_to_volume, volume_to_tokens


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value,) * 3
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an int or 3 ints, got {value!r}") from None
    if len(out) != 3 or any(v <= 0 for v in out):
        raise UserError(f"{name} must be 3 positive ints (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


def valid_sizes_near(size: int, multiple: int) -> tuple[int, int]:
    """The multiples of ``multiple`` just below (at least ``multiple``) and just above ``size``."""
    below = max(multiple, (size // multiple) * multiple)
    above = -(-size // multiple) * multiple
    if above == below:
        above += multiple
    return below, above


@dataclass
class UNETRPPConfig:
    """Every constructor argument of :class:`UNETRPP` but ``fast``; serialised as ``config.json``.

    The fields below ``num_heads`` are the real differences between the official variants.
    """

    in_channels: int = 1
    out_channels: int = 14
    img_size: tuple[int, int, int] = (64, 128, 128)
    feature_size: int = 16
    depths: tuple[int, int, int, int] = (3, 3, 3, 3)
    decoder_depths: tuple[int, int, int] = (3, 3, 3)
    num_heads: int = 4
    proj_size: tuple[int, int, int, int] = (64, 64, 64, 32)
    decoder_proj_size: int = 64
    stem_stride: tuple[int, int, int] = (2, 4, 4)
    stem_norm_groups: int | None = None
    kv_proj: str = "shared"
    fusion: str = "concat"
    conv_blocks: int = 1
    attn_dropout: float = 0.15
    proj_dropout: float = 0.1
    head_merge: str = "official"
    deep_supervision: bool = True

    def __post_init__(self) -> None:
        self.img_size = _triple(self.img_size, "img_size")
        self.stem_stride = _triple(self.stem_stride, "stem_stride")
        if isinstance(self.proj_size, int):
            self.proj_size = (self.proj_size,) * 4
        self.proj_size = tuple(int(p) for p in self.proj_size)
        self.depths = tuple(int(v) for v in self.depths)
        self.decoder_depths = tuple(int(v) for v in self.decoder_depths)
        self.validate()

    @property
    def dims(self) -> tuple[int, int, int, int]:
        f = self.feature_size
        return (2 * f, 4 * f, 8 * f, 16 * f)

    @property
    def stage_shapes(self) -> list[tuple[int, int, int]]:
        """Spatial shape (z, y, x) of each encoder stage."""
        base = tuple(s // k for s, k in zip(self.img_size, self.stem_stride, strict=True))
        return [tuple(s // 2**i for s in base) for i in range(4)]  # type: ignore[misc]

    @property
    def deepest_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the lowest-resolution stage (batch norm there needs two values per channel)."""
        return self.stage_shapes[3]

    @property
    def stage_tokens(self) -> list[int]:
        return [math.prod(s) for s in self.stage_shapes]

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """Each axis of ``img_size`` must be a multiple of this (stem stride x 2**3)."""
        return tuple(k * 8 for k in self.stem_stride)  # type: ignore[return-value]

    def validate(self) -> None:
        def positive_int(name: str, v: object) -> None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{name} must be a positive int, got {v!r}")

        positive_int("in_channels", self.in_channels)
        positive_int("out_channels", self.out_channels)
        positive_int("feature_size", self.feature_size)
        positive_int("num_heads", self.num_heads)
        positive_int("decoder_proj_size", self.decoder_proj_size)
        positive_int("conv_blocks", self.conv_blocks)
        if len(self.depths) != 4 or any(d < 1 for d in self.depths):
            raise UserError(f"depths must be 4 positive ints (one per encoder stage), got {self.depths}")
        if len(self.decoder_depths) != 3 or any(d < 1 for d in self.decoder_depths):
            raise UserError(f"decoder_depths must be 3 positive ints, got {self.decoder_depths}")
        if len(self.proj_size) != 4 or any(p < 1 for p in self.proj_size):
            raise UserError(f"proj_size must be an int or 4 positive ints, got {self.proj_size}")
        for name, allowed in (("kv_proj", KV_PROJECTIONS), ("fusion", FUSIONS), ("head_merge", HEAD_MERGES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("attn_dropout", "proj_dropout"):
            v = getattr(self, name)
            if not 0.0 <= float(v) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {v!r}")
        for dim in self.dims:
            if dim % self.num_heads:
                raise UserError(
                    f"num_heads={self.num_heads} must divide every stage width {self.dims} "
                    f"(feature_size={self.feature_size} x 2, 4, 8, 16)"
                )
        if self.fusion == "concat" and self.dims[0] % 2:
            raise UserError("fusion='concat' needs even stage widths")
        groups = self.stem_norm_groups if self.stem_norm_groups is not None else self.in_channels
        positive_int("stem_norm_groups", groups)
        if self.dims[0] % groups:
            raise UserError(
                f"the stem GroupNorm uses {groups} groups (in_channels by default) over {self.dims[0]} "
                f"channels, which does not divide; set stem_norm_groups to a divisor of {self.dims[0]}"
            )
        bad = []
        for axis, (s, m) in enumerate(zip(self.img_size, self.size_multiple, strict=True)):
            if s % m:
                lo, hi = valid_sizes_near(s, m)
                bad.append(f"axis {axis}: {s} is not a multiple of {m} (try {lo} or {hi})")
        if bad:
            raise UserError(
                f"img_size {self.img_size} does not fit stem_stride {self.stem_stride} and three "
                f"2x downsamplings: " + "; ".join(bad)
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNETRPPConfig:
        refuse_unknown_fields(d, cls, "unknown UNETR++ config fields: ")
        return cls(**d)


class UNETRPP(nn.Module):
    """UNETR++ (Shaker et al., 2022) for 3D segmentation, with every official variant as a switch.

    Args:
        in_channels: input channels (modalities).
        out_channels: classes including background.
        img_size: patch size (z, y, x) the network is built for; token counts and positional
            embeddings derive from it. Each axis must be a multiple of ``stem_stride * 8``.
        feature_size: width unit; the four stages have ``feature_size * (2, 4, 8, 16)`` channels.
        depths: EPA blocks per encoder stage.
        decoder_depths: EPA blocks per decoder stage (coarse to fine).
        num_heads: attention heads in every EPA block.
        proj_size: projected token count p of the spatial branch, per encoder stage.
        decoder_proj_size: p in the decoder's EPA blocks.
        stem_stride: kernel = stride of the patch-embedding convolution.
        stem_norm_groups: groups of the stem GroupNorm (official: ``in_channels``).
        kv_proj: ``"shared"`` | ``"separate"`` | ``"shared_nobias"`` token projection of K and V.
        fusion: ``"concat"`` | ``"sum"`` fusion of the spatial and channel branches.
        conv_blocks: residual conv blocks after attention in each EPA block (1 or 2 officially).
        attn_dropout: dropout on the attention maps.
        proj_dropout: channel dropout before each block's 1x1 conv (official ``Dropout3d(0.1)``).
        head_merge: ``"official"`` (reproduces the official spatial-branch reshape, needed for
            official weights) or ``"standard"``.
        deep_supervision: build the two extra heads; ``forward`` then returns
            ``[full, 1/2-stage, 1/4-stage]`` logits while :attr:`deep_supervision` is True.
        fast: run every block's fast forward (kernels; the default) or its reference forward (the
            official op order in plain PyTorch, the same function); see :meth:`set_fast`. Not part
            of the config: it changes no weight and no output beyond float rounding.

    The arguments other than ``fast`` are the fields of :class:`UNETRPPConfig`, with its defaults
    (:meth:`from_config` builds from one); they are kept as :attr:`config`.

    Examples:
        >>> import torch
        >>> from unetrpp import UNETRPP
        >>> net = UNETRPP(in_channels=1, out_channels=3, img_size=(32, 64, 64)).eval()
        >>> with torch.no_grad():
        ...     full, half, quarter = net(torch.zeros(1, 1, 32, 64, 64))
        >>> tuple(full.shape), tuple(half.shape), tuple(quarter.shape)
        ((1, 3, 32, 64, 64), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8))
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        img_size: int | Sequence[int] = (64, 128, 128),
        *,
        feature_size: int = 16,
        depths: Sequence[int] = (3, 3, 3, 3),
        decoder_depths: Sequence[int] = (3, 3, 3),
        num_heads: int = 4,
        proj_size: int | Sequence[int] = (64, 64, 64, 32),
        decoder_proj_size: int = 64,
        stem_stride: int | Sequence[int] = (2, 4, 4),
        stem_norm_groups: int | None = None,
        kv_proj: str = "shared",
        fusion: str = "concat",
        conv_blocks: int = 1,
        attn_dropout: float = 0.15,
        proj_dropout: float = 0.1,
        head_merge: str = "official",
        deep_supervision: bool = True,
        fast: bool = True,
    ) -> None:
        super().__init__()
        cfg = UNETRPPConfig(
            in_channels=in_channels, out_channels=out_channels, img_size=img_size, feature_size=feature_size,
            depths=depths, decoder_depths=decoder_depths, num_heads=num_heads, proj_size=proj_size,
            decoder_proj_size=decoder_proj_size, stem_stride=stem_stride, stem_norm_groups=stem_norm_groups,
            kv_proj=kv_proj, fusion=fusion, conv_blocks=conv_blocks, attn_dropout=attn_dropout,
            proj_dropout=proj_dropout, head_merge=head_merge, deep_supervision=deep_supervision,
        )
        self.config = cfg
        d0, d1, d2, d3 = cfg.dims
        f = cfg.feature_size
        shapes = cfg.stage_shapes
        block = dict(
            num_heads=cfg.num_heads, kv_proj=cfg.kv_proj, fusion=cfg.fusion, conv_blocks=cfg.conv_blocks,
            attn_dropout=cfg.attn_dropout, proj_dropout=cfg.proj_dropout, head_merge=cfg.head_merge,
        )
        groups = cfg.stem_norm_groups or cfg.in_channels
        # Encoder: patch embedding, three 2x downsamplings, EPA stages.
        self.downsample = nn.ModuleList([
            Downsample(cfg.in_channels, d0, cfg.stem_stride, groups),
            Downsample(d0, d1, (2, 2, 2), d0),
            Downsample(d1, d2, (2, 2, 2), d1),
            Downsample(d2, d3, (2, 2, 2), d2),
        ])
        self.stages = nn.ModuleList(
            nn.ModuleList(
                TransformerBlock(dim, shapes[i], proj_size=cfg.proj_size[i], trunc_normal_linears=True, **block)
                for _ in range(cfg.depths[i])
            )
            for i, dim in enumerate(cfg.dims)
        )
        # Full-resolution conv branch (official ``encoder1``).
        self.stem_block = ResConvBlock(cfg.in_channels, f, "instance")
        # Decoder: three EPA up-blocks, then the conv-only full-resolution stage.
        self.decoder = nn.ModuleList(
            UpBlock(cin, cout, shapes[i], cfg.decoder_depths[j], proj_size=cfg.decoder_proj_size,
                    trunc_normal_linears=False, **block)
            for j, (cin, cout, i) in enumerate(((d3, d2, 2), (d2, d1, 1), (d1, d0, 0)))
        )
        self.final = OutputStage(d0, f, cfg.stem_stride, shapes[0])
        self.heads = nn.ModuleList([TokenHead(f, cfg.out_channels)])
        if cfg.deep_supervision:
            self.heads.extend([TokenHead(d0, cfg.out_channels), TokenHead(d1, cfg.out_channels)])
        self._deep_supervision = cfg.deep_supervision
        #: Recompute the EPA stages in backward instead of keeping their activations (training
        #: memory for time; the full-resolution conv stages are always kept). Outputs and gradients
        #: are unchanged: dropout masks are replayed from the saved RNG state.
        self.activation_checkpointing = False
        self.set_fast(fast)

    @classmethod
    def from_config(cls, config: UNETRPPConfig | dict, fast: bool = True) -> UNETRPP:
        """Build from a :class:`UNETRPPConfig` (or its :meth:`~UNETRPPConfig.to_dict`)."""
        cfg = config if isinstance(config, UNETRPPConfig) else UNETRPPConfig.from_dict(config)
        return cls(**cfg.to_dict(), fast=fast)

    # ------------------------------------------------------------------ implementation choice
    def set_fast(self, fast: bool = True) -> UNETRPP:
        """Make every block run its fast forward (True) or its reference forward (False); returns ``self``.

        Both compute the same function (``tests/network/test_fast_vs_reference.py``). The reference
        is the official op order in plain PyTorch: edit a block's ``forward_reference`` and a model
        with ``set_fast(False)`` trains with the edit. :func:`~unetrpp.network.reference_math`
        forces the reference for the duration of a ``with`` block instead.
        """
        return set_fast(self, fast)

    # ------------------------------------------------------------------ behaviour switches
    @property
    def deep_supervision(self) -> bool:
        """Whether ``forward`` returns all heads (True) or only the full-resolution logits."""
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value and len(self.heads) == 1:
            raise UserError("this model was built with deep_supervision=False: it has no extra heads")
        self._deep_supervision = bool(value)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.dim() != 5:
            raise UserError(f"UNETRPP expects a (B, C, Z, Y, X) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise UserError(f"UNETRPP was built for {cfg.in_channels} input channels, got {x.shape[1]}")
        if tuple(x.shape[2:]) != cfg.img_size:
            raise UserError(
                f"UNETRPP was built for patches of {cfg.img_size}, got {tuple(x.shape[2:])}; use "
                "sliding-window inference for larger volumes or build the model with this img_size"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        cfg = self.config
        shapes = cfg.stage_shapes
        x = _channels_last(x)
        full = self.stem_block(x)  # official encoder1: the full-resolution skip

        # Encoder (spec 1.1): patch embedding / downsampling, then EPA blocks on tokens.
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        feats = []
        h = x
        for i in range(4):
            t = volume_to_tokens(self.downsample[i](h))
            for blk in self.stages[i]:
                t = checkpoint(blk, t, use_reentrant=False) if recompute else blk(t)
            feats.append(t)
            h = tokens_to_volume(t, shapes[i])

        # Decoder: upsample, add the encoder skip, EPA blocks (decoder5/4/3); then the conv-only
        # full-resolution stage (decoder2) and the 1x1x1 heads.
        t = feats[3]
        decoded = []
        for j, up in enumerate(self.decoder):
            t = checkpoint(up, t, feats[2 - j], use_reentrant=False) if recompute else up(t, feats[2 - j])
            decoded.append(t)
        logits = self.heads[0](self.final(t, volume_to_tokens(full)), cfg.img_size)
        if not self._deep_supervision:
            return logits
        return [logits, self.heads[1](decoded[2], shapes[0]), self.heads[2](decoded[1], shapes[1])]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path`` (atomically per file)."""
        from .weights import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> UNETRPP:
        """Rebuild a model saved by :meth:`save_pretrained` (no pickle is read)."""
        from .weights import from_pretrained

        return from_pretrained(path, map_location, cls=cls)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory with channels-last strides.

    With one channel, NCDHW memory already counts as channels-last, so ``contiguous`` keeps the
    NCDHW strides, and oneDNN then writes the first convolutions' outputs in NCDHW: a full-resolution
    copy each to bring them back. A one-channel copy (small) gives the strides it recognises.
    """
    x = x.contiguous(memory_format=torch.channels_last_3d)
    if x.stride(1) != 1 and x.shape[1] == 1:
        x = torch.empty_like(x, memory_format=torch.channels_last_3d).copy_(x)
    return x
