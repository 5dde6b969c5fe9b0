"""The UNETR++ network: pure ``nn.Module``s (this package imports torch, and of ours only ``unetrpp.errors``).

``blocks.py``, ``epa.py`` and ``unetrpp.py`` are the model, each block with a reference forward
(the paper's op order) and a fast one (``dual.py``); ``kernels/`` holds the numerical kernels of
the fast forwards; ``weights.py`` reads and writes weights, ours and the official ones.
"""

from .dual import reference_math, set_fast
from .epa import EPA
from .presets import PRESETS, Preset, create_model, get_preset
from .unetrpp import UNETRPP, UNETRPPConfig
from .weights import load_official

__all__ = ["EPA", "PRESETS", "UNETRPP", "Preset", "UNETRPPConfig", "create_model", "get_preset", "load_official",
           "reference_math", "set_fast"]
