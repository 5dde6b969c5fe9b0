"""The architectures one pipeline plans, trains, predicts and evaluates: UNETR++ and its baselines.

A network is described by a dict (the plans' ``network``, a checkpoint's ``model_config``):
UNETR++'s :class:`UNETRPPConfig` fields, or a baseline's :class:`BaselineConfig` fields with its
``arch``. A dict without ``arch`` is UNETR++ (every file written before the baselines existed).
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError, refuse_unknown_fields
from .baselines import SMALLEST_WIDTH, BaselineConfig, BaselineNet

#: Every architecture ``plan --arch`` accepts; UNETR++ is the default.
ARCHITECTURES = ("unetrpp", "nnunet", "resenc", "swinunetr", "unetr")
#: What each is, for help texts and tables.
DESCRIPTIONS = {
    "unetrpp": "UNETR++ (this package)",
    "nnunet": "nnU-Net's plain convolutional U-Net (dynamic-network-architectures)",
    "resenc": "nnU-Net's residual-encoder U-Net, ResEnc (dynamic-network-architectures)",
    "swinunetr": "Swin-UNETR (MONAI)",
    "unetr": "UNETR (MONAI)",
}


def arch_of(network: dict) -> str:
    """The architecture of a network dict (``unetrpp`` when it names none)."""
    arch = network.get("arch", "unetrpp") if isinstance(network, dict) else "unetrpp"
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; one of: {', '.join(ARCHITECTURES)}")
    return arch


def network_config(network: dict, **overrides):
    """The typed config of a network dict (with ``overrides``): :class:`UNETRPPConfig` or :class:`BaselineConfig`."""
    from .unetrpp import UNETRPPConfig

    if not isinstance(network, dict):
        raise UserError(f"a network must be a JSON object, got {type(network).__name__}")
    d = {**network, **overrides}
    arch = arch_of(d)
    if arch == "unetrpp":
        d.pop("arch", None)
    cls = UNETRPPConfig if arch == "unetrpp" else BaselineConfig
    refuse_unknown_fields(d, cls, "unknown keys ", " (written by a newer unetrpp, or edited?)")
    return cls(**d)


def build_network(network: dict, fast: bool = True) -> nn.Module:
    """The network of a dict, freshly initialised (``fast``: UNETR++'s fast forward; baselines have one)."""
    from .unetrpp import UNETRPP

    cfg = network_config(network)
    if isinstance(cfg, BaselineConfig):
        return BaselineNet(cfg)
    return UNETRPP(**cfg.to_dict(), fast=fast)


def smallest_width(network: dict) -> int:
    """The narrowest width the time budget tries for this architecture."""
    arch = arch_of(network)
    return 8 if arch == "unetrpp" else SMALLEST_WIDTH[arch]


def build_checked(network: dict, source: str, meta: bool = False) -> nn.Module:
    """:func:`build_network` for a dict read from ``source``: a bad or unknown config is one line naming it.

    ``meta``: on the meta device (shapes only, no memory), where the library allows it."""
    import torch

    if not isinstance(network, dict):
        raise UserError(f"{source}: model_config must be a dict, got {type(network).__name__}")
    try:
        if meta:
            try:
                with torch.device("meta"):
                    return build_network(network)
            except RuntimeError:  # a library that reads values while building (MONAI's SwinUNETR)
                pass
        return build_network(network)
    except (TypeError, ValueError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{source}: model_config: {text}") from None


def parameter_count(network: dict) -> int:
    """Parameters of the network a dict describes, without allocating them where possible."""
    return sum(p.numel() for p in build_checked(network, "network", meta=True).parameters())
