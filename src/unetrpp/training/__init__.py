"""Training: the config, the trainer, the budgeted short-run recipe, fine-tuning.

``TrainConfig`` and ``Trainer`` are imported on first use, so ``import unetrpp.training.budget``
does not load the whole trainer.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "Trainer", "transfer_weights"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name == "transfer_weights":
        from .pretrained import transfer_weights

        return transfer_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
