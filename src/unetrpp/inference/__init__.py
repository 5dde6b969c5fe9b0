"""Sliding-window inference, whole-case prediction, ensembles and model packages."""

from .model import Model, load_model, read_package, write_package
from .predictor import Prediction, Predictor
from .sliding_window import gaussian_importance, sliding_window_probabilities, window_starts

__all__ = ["Model", "Prediction", "Predictor", "gaussian_importance", "load_model", "read_package",
           "sliding_window_probabilities", "window_starts", "write_package"]
