"""The UNETR++ network: pure ``nn.Module``s (this package imports torch, and of ours only ``unetrpp.errors``)."""

from ._mode import reference_math
from .epa import EPA
from .presets import PRESETS, Preset, create_model, get_preset
from .unetrpp import UNETRPP, UNETRPPConfig

__all__ = ["EPA", "PRESETS", "UNETRPP", "Preset", "UNETRPPConfig", "create_model", "get_preset", "reference_math"]
