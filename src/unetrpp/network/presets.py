"""Named presets: the official UNETR++ configurations, and ``create_model``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .unetrpp import UNETRPP, UNETRPPConfig


@dataclass(frozen=True)
class Preset:
    """A named network: constructor arguments plus the parameter count of the official one.

    The training recipe of each (batch, batch Dice, evaluated labels) is planning's:
    :data:`unetrpp.data.plan.RECIPES`.
    """

    name: str
    description: str
    kwargs: dict = field(default_factory=dict)
    official_params: int | None = None

    def config(self, **overrides) -> UNETRPPConfig:
        return UNETRPPConfig(**{**self.kwargs, **overrides})


_COMMON = dict(feature_size=16, depths=(3, 3, 3, 3), num_heads=4, proj_size=(64, 64, 64, 32), decoder_proj_size=64)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "synapse",
            "Synapse multi-organ CT (paper: 8 organs evaluated, 14 classes trained)",
            dict(_COMMON, in_channels=1, out_channels=14, img_size=(64, 128, 128), stem_stride=(2, 4, 4),
                 kv_proj="shared", fusion="concat", conv_blocks=1, attn_dropout=0.15),
            official_params=42_952_850,
        ),
        Preset(
            "btcv",
            "BTCV 13-organ CT: the Synapse network, 14 classes (official: same model and data)",
            dict(_COMMON, in_channels=1, out_channels=14, img_size=(64, 128, 128), stem_stride=(2, 4, 4),
                 kv_proj="shared", fusion="concat", conv_blocks=1, attn_dropout=0.15),
            official_params=42_952_850,
        ),
        Preset(
            "acdc",
            "ACDC cardiac cine MRI (RV, myocardium, LV)",
            dict(_COMMON, in_channels=1, out_channels=4, img_size=(16, 160, 160), stem_stride=(1, 4, 4),
                 kv_proj="separate", fusion="concat", conv_blocks=2, attn_dropout=0.1),
            official_params=66_796_404,
        ),
        Preset(
            "tumor",
            "BraTS brain tumour MRI, 4 modalities (MSD Task01)",
            dict(_COMMON, in_channels=4, out_channels=4, img_size=(128, 128, 128), stem_stride=(4, 4, 4),
                 kv_proj="shared_nobias", fusion="sum", conv_blocks=1, attn_dropout=0.1),
            official_params=42_647_604,
        ),
        Preset(
            "lung",
            "MSD Task06 lung tumour CT",
            dict(_COMMON, in_channels=1, out_channels=2, img_size=(32, 192, 192), stem_stride=(1, 4, 4),
                 kv_proj="separate", fusion="concat", conv_blocks=2, attn_dropout=0.1),
            official_params=121_174_798,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def create_model(name: str, fast: bool = True, **overrides) -> UNETRPP:
    """Build a preset, optionally overriding constructor arguments; ``fast=False`` runs every block's
    reference forward (:mod:`unetrpp.network.dual`).

    Examples:
        >>> from unetrpp import create_model
        >>> net = create_model("synapse")                       # the paper's Synapse network
        >>> custom = create_model("synapse", img_size=(32, 96, 96), out_channels=9)
    """
    return UNETRPP.from_config(get_preset(name).config(**overrides), fast=fast)
