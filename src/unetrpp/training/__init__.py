"""Training: the config, the trainer, the budgeted short-run recipe, fine-tuning.

``TrainConfig`` and ``Trainer`` are imported on first use, so ``import unetrpp.training.budget``
does not load the whole trainer.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {"TrainConfig": "config", "Trainer": "trainer", "transfer_weights": "pretrained"}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
