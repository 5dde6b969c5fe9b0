"""Everything that defines a training run, saved as ``train_config.json`` beside its checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .augment import AugmentConfig

AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class TrainConfig:
    """The official recipe (spec section 3) as defaults; every field can be changed and is recorded.

    ``time_budget_min`` caps the training time: the run stops before an epoch that would not fit,
    and the poly schedule then runs on the fraction of the budget used when that is ahead of the
    fraction of epochs done, so the learning rate still decays to near zero at the end.
    """

    preset: str = "synapse"
    fold: int | str = 0  # an index into splits.json, or "all" (train on every case, no validation)
    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    batch_size: int | None = None  # None: the plans' (per step, summed over processes)
    patch_size: list[int] | None = None  # None: the plans'
    optimizer: str = "sgd"  # "sgd" (the recipe: Nesterov) or "adamw"
    lr: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    batch_dice: bool | None = None  # None: the preset's
    oversample_foreground: float = 0.33
    augment: dict = field(default_factory=dict)  # AugmentConfig fields overriding the defaults
    amp: str = "off"
    device: str = "auto"
    seed: int = 42
    workers: int = 2  # background processes drawing augmented batches (per training process)
    ema_alpha: float = 0.9
    online_eval_classes: list[int] | None = None  # None: the preset's (synapse: the 8 organs), else all
    time_budget_min: float | None = None
    final_validation: bool = True
    final_validation_tta: bool = True
    model_overrides: dict = field(default_factory=dict)  # extra UNETRPP constructor arguments
    activation_checkpointing: bool = False  # recompute the EPA stages in backward (memory for time)

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        for name in ("epochs", "iters_per_epoch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.val_iters < 0 or self.workers < 0:
            raise ValueError("val_iters and workers must be >= 0")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise ValueError(f"time budget must be positive, got {self.time_budget_min} min")
        if not (isinstance(self.fold, int) or self.fold == "all"):
            raise ValueError(f"fold must be an int or 'all', got {self.fold!r}")
        bad = set(self.augment) - {f.name for f in dataclasses.fields(AugmentConfig)}
        if bad:
            raise ValueError(f"unknown augmentation fields: {', '.join(sorted(bad))}")

    def augment_config(self, dummy_2d: bool) -> AugmentConfig:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in self.augment.items()}
        kw.setdefault("dummy_2d", dummy_2d)
        return AugmentConfig(**kw)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config fields: {', '.join(unknown)}")
        return cls(**d)
