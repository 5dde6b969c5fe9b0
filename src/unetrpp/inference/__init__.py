"""Sliding-window inference and whole-case prediction from a checkpoint."""

from .predictor import Prediction, Predictor
from .sliding_window import gaussian_importance, sliding_window_probabilities, window_starts

__all__ = ["Prediction", "Predictor", "gaussian_importance", "sliding_window_probabilities", "window_starts"]
