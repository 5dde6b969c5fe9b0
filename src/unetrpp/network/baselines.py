"""The paper's baselines, from the libraries that maintain them, behind UNETR++'s interface.

``nnunet`` and ``resenc`` are nnU-Net's plain convolutional U-Net and its residual-encoder U-Net
(``PlainConvUNet``, ``ResidualEncoderUNet`` of dynamic-network-architectures, the code nnU-Net
itself builds them with); ``swinunetr`` and ``unetr`` are MONAI's ``SwinUNETR`` and ``UNETR``.
Nothing of them is re-written here: :class:`BaselineNet` builds the library's module and gives it
what the trainer, the predictor and the checkpoints expect of a network (``config``,
``deep_supervision``, logits of shape ``(B, classes, *patch)``).

One :class:`BaselineConfig` describes every baseline. ``feature_size`` is the width the time
budget scales (as UNETR++'s): nnU-Net's first-stage features (32 in nnU-Net; the stages double up
to 10x that, nnU-Net's 320 at 32), SwinUNETR's ``feature_size`` (48 in its paper, a multiple of
12) and UNETR's decoder ``feature_size`` (16 in its paper; its ViT is ``48 x feature_size`` wide,
ViT-B at 16). The U-Nets' topology (``strides``, ``kernel_sizes``) comes from the patch and the
spacing by nnU-Net's rule (:func:`unet_topology`).

Deep supervision: the U-Nets return their three highest-resolution outputs (full, 1/2, 1/4),
the heads UNETR++ has, so the recipe's loss and its weights are the same for every network; the
deeper heads nnU-Net also trains are not used. SwinUNETR and UNETR have no deep supervision.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError, refuse_unknown_fields

#: Architectures of this module, the import each needs, and the extra of unetrpp that installs it.
REQUIRES: dict[str, tuple[str, str, str]] = {
    "nnunet": ("dynamic_network_architectures", "dynamic-network-architectures", "nnunet"),
    "resenc": ("dynamic_network_architectures", "dynamic-network-architectures", "nnunet"),
    "swinunetr": ("monai", "monai einops", "monai"),  # MONAI's transformers import einops when built
    "unetr": ("monai", "monai einops", "monai"),
}
#: Width the ladder of the time budget starts from, per architecture (SwinUNETR's is a multiple of 12).
SMALLEST_WIDTH = {"nnunet": 8, "resenc": 8, "swinunetr": 12, "unetr": 8}
#: The width of each network in its paper (nnU-Net's 32 first-stage features).
DEFAULT_WIDTH = {"nnunet": 32, "resenc": 32, "swinunetr": 48, "unetr": 16}
#: nnU-Net's rule: pool an axis while its feature map keeps at least this many voxels.
MIN_FEATURE_MAP = 4
#: nnU-Net's U-Nets have at most this many resolution stages (3-D full resolution).
MAX_STAGES = 7
#: Residual blocks per encoder stage of nnU-Net's ResEnc presets (M and L share them).
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6)
#: Stages of a U-Net are this much wider than the first at most (nnU-Net: 320 / 32).
MAX_WIDTH_FACTOR = 10
#: Each axis of a SwinUNETR patch is a multiple of this (patch embedding 2 and four 2x mergings),
#: a UNETR patch of this (the ViT's 16-voxel patches).
SWIN_MULTIPLE, UNETR_MULTIPLE = 32, 16
#: UNETR's ViT: hidden size per unit of feature_size (768 at 16), heads, MLP ratio (ViT-B).
UNETR_HIDDEN_PER_WIDTH, UNETR_HEADS, UNETR_MLP_RATIO = 48, 12, 4
#: Heads of the deep supervision the recipe trains (full, 1/2, 1/4 resolution), as UNETR++.
SUPERVISED_HEADS = 3


def require(arch: str):
    """Import the library ``arch`` is built from, or one line naming the extra to install."""
    if arch not in REQUIRES:
        raise UserError(f"unknown architecture {arch!r}; one of: unetrpp, {', '.join(REQUIRES)}")
    module, package, extra = REQUIRES[arch]
    try:
        if extra == "monai":
            importlib.import_module("einops")
        return importlib.import_module(module)
    except ImportError:
        hint = " --no-deps" if extra == "nnunet" else ""
        raise UserError(f"architecture {arch!r} needs the optional package(s) {package}: "
                        f"pip install 'unetrpp[{extra}]' (or pip install{hint} {package})") from None


def unet_topology(patch: Sequence[float], spacing: Sequence[float], whole: bool = True,
                  min_feature_map: int = MIN_FEATURE_MAP, max_stages: int = MAX_STAGES
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's U-Net topology for ``patch`` at ``spacing``: per stage, the strides and conv kernels.

    Each downsampling halves the axes that keep ``min_feature_map`` voxels and are less than twice
    as coarse as the finest such axis, so an anisotropic volume pools its fine axes first; an axis
    more than twice as coarse as the finest convolves with a kernel of 1 until pooling has caught
    up. ``whole``: an axis is only pooled while it divides by two (the final patch); otherwise
    ``patch`` may be any size (the median shape, to choose the patch's multiples).
    """
    size = [float(s) for s in patch]
    sp = [float(s) for s in spacing]
    kernels = [[3 if s / min(sp) < 2 else 1 for s in sp]]
    strides = [[1, 1, 1]]
    while len(strides) < max_stages:
        can = [a for a in range(3) if size[a] / 2 >= min_feature_map and (not whole or size[a] % 2 == 0)]
        if not can:
            break
        finest = min(sp[a] for a in can)
        pool = [a for a in can if sp[a] / finest < 2]
        for a in pool:
            size[a] /= 2
            sp[a] *= 2
        strides.append([2 if a in pool else 1 for a in range(3)])
        kernels.append([3 if kernels[-1][a] == 3 or sp[a] / min(sp) < 2 else 1 for a in range(3)])
    return strides, kernels


def unet_multiple(strides: Sequence[Sequence[int]]) -> list[int]:
    """Each axis of the patch must be a multiple of the product of its strides."""
    return [math.prod(int(s[a]) for s in strides) for a in range(3)]


def _triple(v, name: str) -> tuple[int, int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v, v)
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in v)):
        raise UserError(f"{name} must be 3 positive integers, got {v!r}")
    return tuple(v)  # type: ignore[return-value]


@dataclass
class BaselineConfig:
    """Every argument of :class:`BaselineNet`; serialised, with ``arch``, as the plans' ``network``."""

    arch: str
    in_channels: int = 1
    out_channels: int = 2
    img_size: tuple[int, int, int] = (64, 64, 64)
    feature_size: int = 32
    deep_supervision: bool = True
    strides: list[list[int]] | None = None  # U-Nets: per stage, the first [1, 1, 1]
    kernel_sizes: list[list[int]] | None = None  # U-Nets: per stage
    dropout: float = 0.0  # MONAI's networks: dropout rate (UNETR), drop rate (SwinUNETR)
    extra: dict = field(default_factory=dict)  # reserved; must be empty in this version

    def __post_init__(self) -> None:
        self.img_size = _triple(self.img_size, "img_size")
        self.validate()

    @property
    def is_unet(self) -> bool:
        return self.arch in ("nnunet", "resenc")

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """Each axis of ``img_size`` must be a multiple of this."""
        if self.is_unet:
            return tuple(unet_multiple(self.strides))  # type: ignore[return-value, arg-type]
        m = SWIN_MULTIPLE if self.arch == "swinunetr" else UNETR_MULTIPLE
        return (m, m, m)

    @property
    def deepest_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the lowest-resolution features (instance norm there needs 2 voxels or more)."""
        return tuple(s // m for s, m in zip(self.img_size, self.size_multiple, strict=True))  # type: ignore

    @property
    def features_per_stage(self) -> list[int]:
        n = len(self.strides or ())
        return [min(self.feature_size * 2**i, MAX_WIDTH_FACTOR * self.feature_size) for i in range(n)]

    def validate(self) -> None:
        from .registry import ARCHITECTURES

        if self.arch not in REQUIRES:
            raise UserError(f"unknown architecture {self.arch!r}; one of: {', '.join(ARCHITECTURES)}")
        for name in ("in_channels", "out_channels", "feature_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.deep_supervision, bool):
            raise UserError(f"deep_supervision must be true or false, got {self.deep_supervision!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.extra:
            raise UserError(f"extra must be empty, got {self.extra!r}")
        if self.is_unet:
            for name in ("strides", "kernel_sizes"):
                v = getattr(self, name)
                if not (isinstance(v, list) and 2 <= len(v) <= MAX_STAGES):
                    raise UserError(f"{self.arch}: {name} must list 2 to {MAX_STAGES} stages, got {v!r}")
                setattr(self, name, [list(_triple(s, f"{name}[{i}]")) for i, s in enumerate(v)])
            if len(self.kernel_sizes) != len(self.strides):
                raise UserError(f"{self.arch}: {len(self.strides)} strides but {len(self.kernel_sizes)} kernel sizes")
            if self.strides[0] != [1, 1, 1] or any(s not in (1, 2) for st in self.strides for s in st):
                raise UserError(f"{self.arch}: strides must be 1 or 2 with the first stage [1, 1, 1], "
                                f"got {self.strides}")
            if any(k not in (1, 3) for ks in self.kernel_sizes for k in ks):
                raise UserError(f"{self.arch}: kernel sizes must be 1 or 3, got {self.kernel_sizes}")
        else:
            if self.strides is not None or self.kernel_sizes is not None:
                raise UserError(f"{self.arch}: strides and kernel_sizes are for the U-Nets (nnunet, resenc)")
            if self.arch == "swinunetr" and self.feature_size % 12:
                raise UserError(f"swinunetr: feature_size must be a multiple of 12, got {self.feature_size}")
            if self.arch == "unetr":
                hidden = UNETR_HIDDEN_PER_WIDTH * self.feature_size
                if hidden % UNETR_HEADS:
                    raise UserError(f"unetr: feature_size {self.feature_size} gives a ViT of {hidden}, not divisible "
                                    f"by its {UNETR_HEADS} heads")
            if self.deep_supervision:
                raise UserError(f"{self.arch} has no deep supervision heads (deep_supervision must be false)")
        bad = [f"axis {a}: {s} is not a multiple of {m}" for a, (s, m) in
               enumerate(zip(self.img_size, self.size_multiple, strict=True)) if s % m]
        if bad:
            raise UserError(f"{self.arch}: img_size {self.img_size} does not fit the network's downsamplings: "
                            + "; ".join(bad))
        if math.prod(self.deepest_shape) < 2:
            raise UserError(f"{self.arch}: img_size {self.img_size} leaves one voxel at the lowest resolution, "
                            "where instance norm needs two; use a larger patch")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BaselineConfig:
        refuse_unknown_fields(d, cls, f"unknown {d.get('arch', 'baseline')} config fields: ")
        return cls(**d)


def _build(cfg: BaselineConfig) -> nn.Module:
    lib = require(cfg.arch)
    if cfg.is_unet:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

        n = len(cfg.strides)
        common = dict(input_channels=cfg.in_channels, n_stages=n, features_per_stage=cfg.features_per_stage,
                      conv_op=nn.Conv3d, kernel_sizes=cfg.kernel_sizes, strides=cfg.strides,
                      num_classes=cfg.out_channels, conv_bias=True, norm_op=nn.InstanceNorm3d,
                      norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                      nonlin_kwargs={"inplace": True}, deep_supervision=cfg.deep_supervision)
        if cfg.arch == "nnunet":
            net = PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=[2] * (n - 1), **common)
        else:
            net = ResidualEncoderUNet(n_blocks_per_stage=list(RESENC_BLOCKS[:n]),
                                      n_conv_per_stage_decoder=[1] * (n - 1), **common)
        net.apply(net.initialize)  # nnU-Net's initialisation (He, slope 1e-2; residual branches' last norm at 0)
        return net
    nets = lib.networks.nets
    if cfg.arch == "swinunetr":
        return nets.SwinUNETR(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                              feature_size=cfg.feature_size, drop_rate=float(cfg.dropout), spatial_dims=3)
    hidden = UNETR_HIDDEN_PER_WIDTH * cfg.feature_size
    return nets.UNETR(in_channels=cfg.in_channels, out_channels=cfg.out_channels, img_size=cfg.img_size,
                      feature_size=cfg.feature_size, hidden_size=hidden, mlp_dim=UNETR_MLP_RATIO * hidden,
                      num_heads=UNETR_HEADS, proj_type="conv", norm_name="instance", res_block=True,
                      dropout_rate=float(cfg.dropout))


def _drop_aliases(module: BaselineNet, state_dict, prefix: str, local_metadata) -> None:
    for alias in module._aliases:
        state_dict.pop(prefix + alias, None)


class BaselineNet(nn.Module):
    """A baseline network of :class:`BaselineConfig`, with UNETR++'s interface.

    ``forward`` returns logits ``(B, classes, *patch)``; with :attr:`deep_supervision` on, the
    list ``[full, 1/2, 1/4]`` of the U-Nets' highest-resolution heads instead.
    """

    def __init__(self, config: BaselineConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = config if config is not None else BaselineConfig(**kwargs)
        self.net = _build(self.config)
        self._deep_supervision = self.config.deep_supervision
        self._sync()
        #: nnU-Net's heads below 1/4 resolution exist (the library builds one per stage) but get no gradient
        self.has_unused_parameters = self.config.is_unet and len(self.config.strides) - 1 > SUPERVISED_HEADS
        # The libraries reach one tensor by several names (nnU-Net's decoder holds the encoder, a conv block
        # lists its layers twice): the state_dict keeps the first name only (safetensors refuses shared
        # tensors), and loading gives the other names the same tensor.
        names: dict[int, list[str]] = {}
        for name, t in [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), []).append(name)
        self._aliases = {alias: group[0] for group in names.values() for alias in group[1:]}
        self._register_state_dict_hook(_drop_aliases)
        self._register_load_state_dict_pre_hook(self._fill_aliases)

    def _fill_aliases(self, state_dict, prefix, *args) -> None:
        for alias, name in self._aliases.items():
            if prefix + name in state_dict and prefix + alias not in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + name]

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value and not self.config.deep_supervision:
            raise UserError(f"this {self.config.arch} network has no deep supervision heads")
        self._deep_supervision = bool(value)
        self._sync()

    def _sync(self) -> None:
        if self.config.is_unet:
            self.net.decoder.deep_supervision = self._deep_supervision

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if self._deep_supervision:
            return list(out[:SUPERVISED_HEADS])
        return out

    def extra_repr(self) -> str:
        return f"arch={self.config.arch}"
