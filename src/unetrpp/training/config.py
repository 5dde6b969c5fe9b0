"""Everything that defines a training run, saved as ``train_config.json`` beside its checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UserError, refuse_unknown_fields
from ..runtime import AMP_MODES

if TYPE_CHECKING:
    from .augment import AugmentConfig

#: The device types training runs on (``TrainConfig.device`` is one of them, ``cuda:N``, or ``"auto"``).
TRAIN_DEVICES = ("cpu", "cuda")
#: The paper's SGD learning rate (``TrainConfig.lr`` None with the SGD optimizer). The rest of the
#: recipe (momentum, Nesterov, weight decay, poly exponent, gradient clipping) is ``TrainConfig``'s
#: defaults; the trainer and the benchmarks read them from there.
PAPER_LR = 1e-2


@dataclass
class TrainConfig:
    """The official recipe (spec section 3) as defaults; every field can be changed and is recorded.

    ``time_budget_min`` is the whole job's budget (training, per-epoch and final validation): the
    run stops inside an epoch when the next step would not fit, the poly schedule runs on the
    fraction of the budget used, and with ``recipe="auto"`` a run too short for the paper's recipe
    gets the short-run recipe of :mod:`unetrpp.training.budget` (network width, patch, optimizer,
    schedule), recorded in ``recipe_notes``.
    """

    preset: str | None = None  # None: the plans' network; a name must agree with the plans'
    recipe: str = "auto"  # "auto" (short-run recipe when the budget is short), "paper" or "short"
    fold: int | str = 0  # an index into splits.json, or "all" (train on every case, no validation)
    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    batch_size: int | None = None  # None: the plans' (per step, summed over processes)
    patch_size: list[int] | None = None  # None: the plans'
    optimizer: str | None = None  # "sgd" (the paper's: Nesterov) or "adamw"; None: the recipe's
    lr: float | None = None  # None: the recipe's (sgd PAPER_LR 1e-2, short runs adamw 3e-3)
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    batch_dice: bool | None = None  # None: the plans' (the recipe of data.plan.RECIPES)
    oversample_foreground: float = 0.33
    augment: dict = field(default_factory=dict)  # AugmentConfig fields overriding the defaults
    amp: str = "off"
    device: str = "auto"
    seed: int = 42
    workers: int = 2  # background processes drawing augmented batches (per training process)
    ema_alpha: float = 0.9
    online_eval_classes: list[int] | None = None  # None: the plans' eval_classes, else all
    time_budget_min: float | None = None
    final_validation: bool = True
    final_validation_tta: bool = True
    model_overrides: dict = field(default_factory=dict)  # extra UNETRPP constructor arguments
    activation_checkpointing: bool = False  # recompute the EPA stages in backward (memory for time)
    log_every_s: float = 60.0  # a progress line at least this often, in log.txt and on stdout
    checkpoint_every_min: float = 10.0  # checkpoint_latest.pt at least this often, inside epochs too
    recipe_notes: list[str] = field(default_factory=list)  # what the budget measured and chose
    spacing_scale: list[float] | None = None  # short runs: train at the plans' spacing times this (budget rule 2)
    pretrained: str | None = None  # fine-tune: a checkpoint, run folder or model package (its first member)
    pretrained_report: dict | None = None  # what was loaded, resized and re-initialised from it

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise UserError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        for name in ("epochs", "iters_per_epoch"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.recipe not in ("auto", "paper", "short"):
            raise UserError(f"recipe must be auto, paper or short, got {self.recipe!r}")
        if self.lr is not None and not (self.lr > 0 and self.lr < 10):
            raise UserError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.log_every_s > 0 and self.checkpoint_every_min > 0):
            raise UserError("log_every_s and checkpoint_every_min must be positive")
        if self.optimizer not in (None, "sgd", "adamw"):
            raise UserError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.val_iters < 0 or self.workers < 0:
            raise UserError("val_iters and workers must be >= 0")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise UserError(f"time budget must be positive, got {self.time_budget_min} min")
        if not (isinstance(self.fold, int) or self.fold == "all"):
            raise UserError(f"fold must be an int or 'all', got {self.fold!r}")
        from .augment import AugmentConfig  # scipy: not at import, so the CLI reads the defaults cheaply

        refuse_unknown_fields(self.augment, AugmentConfig, "unknown augmentation fields: ")

    def augment_config(self, dummy_2d: bool) -> AugmentConfig:
        from .augment import AugmentConfig

        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in self.augment.items()}
        kw.setdefault("dummy_2d", dummy_2d)
        return AugmentConfig(**kw)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        refuse_unknown_fields(d, cls, "unknown training config fields: ")
        return cls(**d)
