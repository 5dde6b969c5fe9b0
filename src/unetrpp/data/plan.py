"""``unetrpp plan``: the dataset fingerprint and the experiment plans (``plans.json``).

The fingerprint records per case the spacing, the shape before and after cropping to the
nonzero box, and a fixed-size random sample of foreground intensities per channel; from it we
derive dataset-wide intensity statistics. The plans decide, in a readable JSON:

* target spacing: the median spacing; for strongly anisotropic datasets (largest spacing > 3x the
  others and fewer than a third as many voxels along that axis) the low-resolution axis takes
  the 10th percentile of its spacings instead (nnU-Net's rule), but never finer than the others;
* normalisation per channel: ``ct`` (clip to the dataset's foreground 0.5/99.5 percentiles, then
  z-score with the foreground mean and sd) for channels named CT; ``zscore`` per image otherwise,
  inside the nonzero mask when cropping to it removes at least a quarter of the volume;
* the network (``plans.network``, every UNETR++ constructor argument): with ``--preset``, that
  preset's; otherwise the Synapse preset's blocks with a stem stride per axis from the spacing
  (about isotropic tokens at 4x the finest spacing: ``stem_stride_for``);
* ``--arch`` (``plan_baseline``): a baseline instead of UNETR++ (nnU-Net's U-Net or ResEnc, Swin-UNETR,
  UNETR), its patch from the median shape in its own multiples within the same voxel budget and,
  for the U-Nets, strides and kernels by nnU-Net's rule;
* patch size: a preset's, or the median resampled shape rounded to what the network strides
  divide (up when that pads by < 60 %), shrunk on its physically longest axis until it fits a
  voxel budget (64 x 128 x 128) and a first-stage token budget (32^3, the paper's): positional
  embeddings and token projections grow with the tokens, so the network stays near the paper's
  size whatever the data;
* the training recipe: batch size, batch Dice and the labels the online pseudo-Dice averages (the
  defaults, or the preset's :data:`RECIPES`).

``plans.decisions`` lists each decision in a sentence; ``unetrpp plan`` prints them.

All shapes, spacings and patch sizes are in array order ``(z, y, x)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import read_case, read_image, write_json
from ..parallel import parallel_map
from .layout import Case, Dataset
from .plans import Plans
from .resample import ANISOTROPY_THRESHOLD, nonzero_bbox

SAMPLES_PER_CASE = 10_000
#: Default patch-size budget: the voxels of the Synapse patch, 64 x 128 x 128.
DEFAULT_PATCH_VOXELS = 64 * 128 * 128
#: First-stage tokens of the paper's Synapse network (32 x 32 x 32): positional embeddings and the
#: K/V token projections grow with this, so bounding it keeps the network near the paper's size.
MAX_STAGE1_TOKENS = 32 * 32 * 32
#: An axis is rounded up to the network's multiple unless that pads it by more than this factor.
ROUND_UP_LIMIT = 1.6
#: The preset whose blocks an automatically planned network uses (only the stem and patch change).
AUTO_BLOCKS = "synapse"


@dataclass(frozen=True)
class Recipe:
    """A preset's training recipe (spec section 3), written into the plans by planning."""

    batch_size: int = 2  # the official training batch size
    batch_dice: bool = False  # Dice summed over the batch (spec section 3: 2-stage plans) or per sample
    protocol: str | None = None  # the evaluation protocol whose labels the paper scores (None: every label)


#: The recipe of each preset; a network planned without a preset takes the defaults.
RECIPES: dict[str, Recipe] = {
    "synapse": Recipe(batch_dice=True, protocol="synapse8"),
    "btcv": Recipe(batch_dice=True),
    "acdc": Recipe(batch_size=4),
    "tumor": Recipe(),
    "lung": Recipe(batch_dice=True),
}


def eval_classes_for(preset: str | None, num_classes: int) -> list[int] | None:
    """The labels the preset's paper evaluates (its protocol's), when the dataset has the preset's classes;
    None (every foreground label) otherwise."""
    from ..evaluation.evaluate import PROTOCOLS
    from ..network.presets import get_preset

    protocol = RECIPES.get(preset, Recipe()).protocol if preset is not None else None
    if protocol is None or num_classes != get_preset(preset).config().out_channels:
        return None
    return sorted({v for region in PROTOCOLS[protocol].values() for v in region})


def _fingerprint_case(case: Case, seed: int) -> dict:
    from .validate import check_case_label

    data, geometry = read_case(case.images)
    label, _ = read_image(case.label)
    check_case_label(case, label)  # values dataset.json does not declare: one line naming the file
    if label.shape != data.shape[1:]:
        raise UserError(f"{case.label}: label shape {label.shape} differs from image shape {data.shape[1:]}")
    bbox = nonzero_bbox(data)
    cropped = tuple(b - a for a, b in bbox)
    fg = label != 0
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(data.shape[0]):
        values = data[c][fg]
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float64))
    return {
        "name": case.name,
        "spacing": list(geometry.spacing_zyx),
        "shape": list(data.shape[1:]),
        "shape_after_crop": list(cropped),
        "samples": samples,
    }


def compute_fingerprint(dataset: Dataset, workers: int = 1, progress: bool = False, seed: int = 1234) -> dict:
    cases = list(dataset.training_cases())
    if not cases:
        raise UserError(f"{dataset.root}: no training cases")
    args = [(c, seed + i) for i, c in enumerate(cases)]
    results = parallel_map(_fingerprint_case, args, workers, progress, desc="fingerprint", chunksize=4)
    stats = []
    for c, name in enumerate(dataset.channel_names):
        v = np.concatenate([r["samples"][c] for r in results])
        if v.size == 0:
            raise UserError(f"{dataset.root}: no foreground voxels in any label; cannot plan")
        stats.append({
            "channel": name, "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max()),
            "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)),
        })  # fmt: skip
    return {
        "dataset": dataset.name,
        "axes": "zyx",
        "cases": [{k: r[k] for k in ("name", "spacing", "shape", "shape_after_crop")} for r in results],
        "foreground_intensities": stats,
    }


def target_spacing_for(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """Median spacing, with the anisotropic-axis rule (module docstring)."""
    spacings, shapes = np.asarray(spacings, np.float64), np.asarray(shapes, np.float64)
    target = np.median(spacings, axis=0)
    sizes = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[others])
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(t, float(max(target[others])))
    return [float(v) for v in target]


def stem_stride_for(spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
    """Per-axis stem stride (1, 2 or 4) giving roughly isotropic tokens at 4x the finest spacing.

    An axis ``r`` times coarser than the finest one gets ``4 / 2**round(log2 r)`` (Synapse 1.5 x 0.76
    x 0.76 mm: (2, 4, 4); ACDC 10 x 1.56 x 1.56 mm: (1, 4, 4); BraTS 1 mm: (4, 4, 4), as the official
    presets), halved again while the axis is too short to hold ``8 x stride`` voxels.
    """
    finest = min(spacing)
    out = []
    for s, m in zip(spacing, median_shape, strict=True):
        k = 4 / 2 ** max(0, round(math.log2(s / finest)))
        k = max(1, int(k))
        while k > 1 and 8 * k > ROUND_UP_LIMIT * max(m, 1):
            k //= 2
        out.append(k)
    return out


def _round_axis(m: float, d: int) -> int:
    """``m`` rounded up to a multiple of ``d`` unless that overshoots by more than ROUND_UP_LIMIT (then nearest)."""
    up = max(d, math.ceil(m / d) * d)
    if up <= ROUND_UP_LIMIT * m:
        return up
    down = max(d, math.floor(m / d) * d)
    return down if math.log(up / m) > math.log(m / down) else up


def plan_patch_size(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    divisor: Sequence[int],
    max_voxels: int = DEFAULT_PATCH_VOXELS,
    max_tokens: int | None = None,
    stem_stride: Sequence[int] | None = None,
) -> list[int]:
    """The median shape rounded to multiples of ``divisor`` (up when it costs < 60 %, else nearest),
    then shrunk on its physically longest axis until it has at most ``max_voxels`` voxels and at most
    ``max_tokens`` first-stage tokens (``patch / stem_stride``)."""
    patch = [_round_axis(max(float(m), 1.0), int(d)) for m, d in zip(median_shape, divisor, strict=True)]
    stem = list(stem_stride) if stem_stride is not None else [d // 8 for d in divisor]

    def too_big() -> bool:
        tokens = math.prod(p // k for p, k in zip(patch, stem, strict=True))
        return math.prod(patch) > max_voxels or (max_tokens is not None and tokens > max_tokens)

    while too_big():
        shrinkable = [a for a in range(3) if patch[a] > divisor[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: patch[a] * spacing[a])
        patch[axis] -= divisor[axis]
    return patch


def make_plans(
    dataset: Dataset,
    fingerprint: dict,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    preset: str | None = None,
    max_patch_voxels: int = DEFAULT_PATCH_VOXELS,
    target_spacing: Sequence[float] | None = None,
    arch: str = "unetrpp",
) -> Plans:
    """Plan preprocessing and the network (module docstring); every decision is listed in ``decisions``."""
    from ..network.presets import get_preset
    from ..network.registry import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; one of: {', '.join(ARCHITECTURES)}")
    if preset is not None and arch != "unetrpp":
        raise UserError(f"--preset {preset} is a UNETR++ preset; it cannot be combined with --arch {arch}")

    cases = fingerprint["cases"]
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    cropped = np.array([c["shape_after_crop"] for c in cases], dtype=np.float64)
    full = np.array([c["shape"] for c in cases], dtype=np.float64)
    decisions = []
    if target_spacing is not None:
        target = [float(v) for v in target_spacing]
        if len(target) != 3 or not all(math.isfinite(v) and v > 0 for v in target):
            raise UserError(f"target spacing must be 3 positive numbers (z, y, x) in mm, got {target_spacing}")
        decisions.append(f"target spacing {_fmt(target)} mm: given")
    else:
        target = target_spacing_for(spacings, cropped)
        decisions.append(f"target spacing {_fmt(target)} mm: the median spacing (nnU-Net's anisotropy rule)")
    resampled = cropped * spacings / np.asarray(target)
    median_shape = [float(v) for v in np.median(resampled, axis=0)]
    in_ch, n_cls = len(dataset.channel_names), dataset.num_classes
    if arch != "unetrpp":
        network, patch = plan_baseline(arch, in_ch, n_cls, target, median_shape, patch_size, max_patch_voxels,
                                       decisions)
        batch, batch_dice, eval_classes = int(batch_size or Recipe.batch_size), Recipe.batch_dice, None
    elif preset is not None:
        p = get_preset(preset)
        base = p.config(in_channels=in_ch, out_channels=n_cls)
        stem = list(base.stem_stride)
        recipe = RECIPES.get(preset, Recipe())
        batch = int(batch_size or recipe.batch_size)
        batch_dice = recipe.batch_dice
        eval_classes = eval_classes_for(preset, n_cls)
        decisions.append(f"network: preset {preset} (stem stride {tuple(stem)}, its blocks)")
    else:
        stem = stem_stride_for(target, median_shape)
        base = get_preset(AUTO_BLOCKS).config(in_channels=in_ch, out_channels=n_cls, stem_stride=stem,
                                              attn_dropout=0.1)
        batch, batch_dice, eval_classes = int(batch_size or Recipe.batch_size), Recipe.batch_dice, None
        decisions.append(f"network: {AUTO_BLOCKS} blocks, stem stride {tuple(stem)} from the spacing "
                         f"(tokens of about {_fmt([t * k for t, k in zip(target, stem, strict=True)])} mm)")
    if arch == "unetrpp":
        divisor = [int(k) * 8 for k in stem]
        if patch_size is not None:
            patch = [int(p) for p in patch_size]
            bad = [a for a in range(3) if patch[a] % divisor[a] or patch[a] < 1]
            if bad:
                raise UserError(f"patch size {patch} is not divisible by the network strides {divisor}")
            decisions.append(f"patch {tuple(patch)}: given")
        elif preset is not None and target_spacing is None:
            patch = list(base.img_size)
            decisions.append(f"patch {tuple(patch)}: preset {preset}'s")
        else:
            patch = plan_patch_size(median_shape, target, divisor, max_patch_voxels, MAX_STAGE1_TOKENS, stem)
            decisions.append(f"patch {tuple(patch)}: the median shape {_fmt(median_shape)} in multiples of "
                             f"{tuple(divisor)}, within {max_patch_voxels} voxels and {MAX_STAGE1_TOKENS} first-stage "
                             "tokens (the paper's Synapse network)")
        network = dataclasses.replace(base, img_size=tuple(patch)).to_dict()
    # crop to nonzero shrinks the volume by >= 25 % -> MRI z-scores inside the nonzero mask (e.g. skull-stripped)
    crop_ratio = float(np.median(np.prod(cropped, axis=1) / np.prod(full, axis=1)))
    normalization = []
    for name, st in zip(dataset.channel_names, fingerprint["foreground_intensities"], strict=True):
        if name.strip().upper() == "CT":
            normalization.append({
                "channel": name, "scheme": "ct",
                "clip": [st["percentile_00_5"], st["percentile_99_5"]], "mean": st["mean"], "std": st["std"],
            })  # fmt: skip
        else:
            normalization.append({"channel": name, "scheme": "zscore", "use_nonzero_mask": crop_ratio < 0.75})
    plans = Plans(
        dataset=dataset.name, channel_names=list(dataset.channel_names), labels=dict(dataset.labels),
        target_spacing=target, normalization=normalization, patch_size=patch, network=network,
        batch_size=batch, batch_dice=batch_dice, preset=preset,
        median_spacing=[float(v) for v in np.median(spacings, axis=0)],
        median_shape_after_resampling=median_shape,
        resampling={"image_order": 3, "label_order": 1, "anisotropy_threshold": ANISOTROPY_THRESHOLD,
                    "low_resolution_axis_order": 0},
        eval_classes=eval_classes, decisions=decisions,
    )
    return Plans.from_dict(plans.to_dict(), "plans")  # validated, in its JSON form


def plan_baseline(arch: str, in_channels: int, num_classes: int, spacing: Sequence[float],
                  median_shape: Sequence[float], patch_size: Sequence[int] | None, max_voxels: int,
                  decisions: list[str]) -> tuple[dict, list[int]]:
    """A baseline's network and patch, planned by the same rules as UNETR++'s: the median shape in the
    network's multiples within ``max_voxels``. The U-Nets' multiples and topology come from nnU-Net's
    rule at the median shape, then at the patch (``network.baselines.unet_topology``); SwinUNETR's
    patch is a multiple of 32 and UNETR's of 16 on every axis. Returns ``(network dict, patch)``."""
    from ..network.baselines import DEFAULT_WIDTH, SWIN_MULTIPLE, UNETR_MULTIPLE, require, unet_multiple, unet_topology
    from ..network.registry import DESCRIPTIONS, network_config

    require(arch)  # a missing library is said before anything is planned or written
    unet = arch in ("nnunet", "resenc")
    if unet:
        divisor = unet_multiple(unet_topology(median_shape, spacing, whole=False)[0])
    else:
        divisor = [SWIN_MULTIPLE if arch == "swinunetr" else UNETR_MULTIPLE] * 3
    if patch_size is not None:
        patch = [int(p) for p in patch_size]
        if not unet and any(p % d or p < 1 for p, d in zip(patch, divisor, strict=True)):
            raise UserError(f"patch size {patch} is not divisible by the {arch} network's multiples {divisor}")
        decisions.append(f"patch {tuple(patch)}: given")
    else:
        patch = plan_patch_size(median_shape, spacing, divisor, max_voxels)
        while math.prod(p // d for p, d in zip(patch, divisor, strict=True)) < 2:  # two voxels at the bottom
            axis = min(range(3), key=lambda a: patch[a] * spacing[a])
            patch[axis] += divisor[axis]
        decisions.append(f"patch {tuple(patch)}: the median shape {_fmt(median_shape)} in multiples of "
                         f"{tuple(divisor)}, within {max_voxels} voxels")
    width = DEFAULT_WIDTH[arch]
    network: dict = {"arch": arch, "in_channels": in_channels, "out_channels": num_classes, "img_size": patch,
                     "feature_size": width, "deep_supervision": unet}
    if unet:
        strides, kernels = unet_topology(patch, spacing)
        network.update(strides=strides, kernel_sizes=kernels)
        decisions.append(f"network: {DESCRIPTIONS[arch]}, {len(strides)} stages, strides {strides[1:]}, "
                         f"kernels {kernels}, {width} features at full resolution (nnU-Net's rule)")
    else:
        decisions.append(f"network: {DESCRIPTIONS[arch]}, feature size {width} (its paper's)")
    return network_config(network).to_dict(), patch


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


def plans_id(plans: Plans | dict) -> str:
    """A short hash of everything in the plans that changes preprocessed data."""
    return Plans.coerce(plans).id


def plan_dataset(
    root: str | os.PathLike,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    preset: str | None = None,
    workers: int = 1,
    progress: bool = False,
    target_spacing: Sequence[float] | None = None,
    arch: str = "unetrpp",
) -> Plans:
    """Fingerprint + plans, written to ``ROOT/fingerprint.json`` and ``ROOT/plans.json``."""
    ds = Dataset.open(root)
    fp = compute_fingerprint(ds, workers=workers, progress=progress)
    plans = make_plans(ds, fp, patch_size=patch_size, batch_size=batch_size, preset=preset,
                       target_spacing=target_spacing, arch=arch)
    write_json(fp, Path(root) / "fingerprint.json")
    plans.save(Path(root) / "plans.json")
    return plans


def load_plans(path: str | os.PathLike) -> Plans:
    """``plans.json`` (or a folder holding it) as a validated :class:`Plans`."""
    return Plans.load(path)
