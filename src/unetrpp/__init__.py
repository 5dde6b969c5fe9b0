"""unetrpp: UNETR++ for 3D medical image segmentation."""

from .errors import UserError
from .network import PRESETS, UNETRPP, UNETRPPConfig, create_model

__version__ = "0.1.0"
__all__ = ["PRESETS", "UNETRPP", "UNETRPPConfig", "UserError", "__version__", "create_model"]
