"""Sliding-window inference, whole-case prediction, ensembles, model packages and ONNX export.

The names below are imported on first use, so ``import unetrpp.inference.sliding_window`` (what the
command line reads its defaults from) does not load the whole prediction stack.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {
    "Model": "model", "load_model": "model", "read_package": "model", "write_package": "model",
    "Prediction": "predictor", "Predictor": "predictor",
    "gaussian_importance": "sliding_window", "sliding_window_probabilities": "sliding_window",
    "window_starts": "sliding_window", "Shortcuts": "sliding_window", "EXACT": "sliding_window",
    "DEFAULT_SHORTCUTS": "sliding_window",
    "export_onnx": "export",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
