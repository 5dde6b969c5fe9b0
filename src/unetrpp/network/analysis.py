"""Model profile: parameters, multiply-adds per stage, token counts, activation memory.

Multiply-adds are counted with ``torch.utils.flop_counter`` on the reference op order
(:func:`~unetrpp.network.reference_math`), eval mode, deep supervision on, batch 1: the setting of
the paper's fvcore count (its "47.98 GFLOPs" are multiply-adds). Convolutions, linears and
matmuls count one MAC per multiply-add; normalisation layers count as fvcore estimates them per
element (layer/group/instance norm 4, plus 1 with affine; eval BatchNorm 2), so the total is
comparable with the paper's. FLOPs are reported as 2 x MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from .dual import reference_math
from .unetrpp import UNETRPP

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


# Custom formulas return 2 x the fvcore per-element estimate: FlopCounterMode counts FLOPs
# (2 per MAC for matmuls), and everything is divided by 2 at the end.
def _batch_norm_train_flops(x, weight, bias, *args, out_shape=None, **kwargs):
    # _native_batch_norm_legit(x, w, b, [running_mean, running_var,] training, momentum, eps);
    # instance norm arrives here too (no stats, training=True).
    training = next(a for a in args if isinstance(a, bool))
    per = (5 if weight is not None else 4) if training else (2 if weight is not None else 1)
    return 2 * per * _numel(x)


def _batch_norm_eval_flops(x, weight, bias, *args, out_shape=None, **kwargs):
    return 2 * (2 if weight is not None else 1) * _numel(x)


def _layer_norm_flops(x, normalized_shape, weight, bias, *args, out_shape=None, **kwargs):
    return 2 * (5 if weight is not None else 4) * _numel(x)


def _group_norm_flops(x, weight, bias, *args, out_shape=None, **kwargs):
    return 2 * (5 if weight is not None else 4) * _numel(x)


NORM_FORMULAS = {
    aten._native_batch_norm_legit: _batch_norm_train_flops,
    aten._native_batch_norm_legit_no_training: _batch_norm_eval_flops,
    aten.native_layer_norm: _layer_norm_flops,
    aten.native_group_norm: _group_norm_flops,
}

_GROUPS = (
    ("stem_block", "full-res conv branch (official encoder1)"),
    ("downsample.0", "patch embedding"),
    ("stages.0", "encoder stage 1"),
    ("downsample.1", "downsample 1"),
    ("stages.1", "encoder stage 2"),
    ("downsample.2", "downsample 2"),
    ("stages.2", "encoder stage 3"),
    ("downsample.3", "downsample 3"),
    ("stages.3", "encoder stage 4 (bottleneck)"),
    ("decoder.0", "decoder stage 3 (official decoder5)"),
    ("decoder.1", "decoder stage 2 (official decoder4)"),
    ("decoder.2", "decoder stage 1 (official decoder3)"),
    ("final", "full-res decoder (official decoder2)"),
    ("heads", "output heads"),
)


@dataclass
class StageCost:
    name: str
    description: str
    params: int
    macs: int
    tokens: int | None = None
    shape: tuple[int, ...] | None = None


@dataclass
class ModelProfile:
    config: dict
    params: int
    macs: int
    macs_by_kind: dict[str, int]
    stages: list[StageCost] = field(default_factory=list)
    activation_bytes: int | None = None

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _kind(op) -> str:
    name = str(op)
    if "convolution" in name:
        return "conv"
    if "norm" in name:
        return "norm"
    return "matmul/linear"


def count_macs(model, batch: int = 1, groups: tuple | list = _GROUPS) -> tuple[int, dict[str, int], dict[str, int]]:
    """MACs of one forward pass of UNETR++ or a baseline (any module with ``config.in_channels``,
    ``config.img_size`` and ``deep_supervision``): total, per operator kind, per group of modules
    (``groups``: (module path, description) pairs; UNETR++'s stages by default)."""
    cfg = model.config
    x = torch.zeros(batch, cfg.in_channels, *cfg.img_size)
    was_training, ds = model.training, model.deep_supervision
    model.eval()
    try:
        with torch.no_grad(), reference_math(), FlopCounterMode(display=False, depth=None,
                                                                 custom_mapping=NORM_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
        model.deep_supervision = ds
    counts = counter.get_flop_counts()
    by_kind: dict[str, int] = {}
    for op, n in counts.get("Global", {}).items():
        by_kind[_kind(op)] = by_kind.get(_kind(op), 0) + n // 2
    root = type(model).__name__
    by_group = {}
    for key, _ in groups:
        # Counts are recorded for every module on the stack: take the shallowest modules under the
        # group (containers without a forward of their own, such as ModuleLists, are not recorded).
        prefix = f"{root}.{key}"
        names = [n for n in counts if n == prefix or n.startswith(prefix + ".")]
        depth = min((n.count(".") for n in names), default=0)
        by_group[key] = sum(sum(counts[n].values()) for n in names if n.count(".") == depth) // 2
    return sum(by_kind.values()), by_kind, by_group


def activation_bytes(model, batch: int = 1) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward (unique storages)."""
    cfg = model.config
    x = torch.zeros(batch, cfg.in_channels, *cfg.img_size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr():
            seen[ptr] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        model.train(was_training)
    return sum(seen.values())


def _baseline_groups(model) -> list[tuple[str, str]]:
    """A baseline's cost groups: the wrapped library network's top-level modules."""
    return [(f"net.{name}", type(module).__name__) for name, module in model.net.named_children()]


def profile_model(model, with_memory: bool = True) -> ModelProfile:
    """Parameters, MACs (total, by kind, by group), activation memory of UNETR++ or a baseline."""
    if not isinstance(model, UNETRPP):
        total, by_kind, by_group = count_macs(model, groups=_baseline_groups(model))
        seen: set[int] = set()  # a library's decoder may hold its encoder: count each parameter once
        stages = []
        for key, desc in _baseline_groups(model):
            params = [p for p in model.get_submodule(key).parameters() if id(p) not in seen]
            seen.update(map(id, params))
            stages.append(StageCost(key, desc, sum(p.numel() for p in params), by_group[key]))
        return ModelProfile(config=model.config.to_dict(), params=sum(p.numel() for p in model.parameters()),
                            macs=total, macs_by_kind=by_kind, stages=stages,
                            activation_bytes=activation_bytes(model) if with_memory else None)
    cfg = model.config
    total, by_kind, by_group = count_macs(model)
    shapes = cfg.stage_shapes
    stages = []
    for key, desc in _GROUPS:
        module = model.get_submodule(key)
        params = sum(p.numel() for p in module.parameters())
        tokens = shape = None
        if key.startswith("stages."):
            shape = shapes[int(key[-1])]
        elif key.startswith("decoder."):
            shape = shapes[2 - int(key[-1])]
        if shape is not None:
            tokens = math.prod(shape)
        stages.append(StageCost(key, desc, params, by_group[key], tokens, shape))
    return ModelProfile(
        config=cfg.to_dict(),
        params=sum(p.numel() for p in model.parameters()),
        macs=total,
        macs_by_kind=by_kind,
        stages=stages,
        activation_bytes=activation_bytes(model) if with_memory else None,
    )
