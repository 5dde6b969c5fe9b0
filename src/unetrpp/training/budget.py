"""Fitting a training run to the compute it has: the short-run recipe and the whole-job time budget.

The paper's recipe (SGD, Nesterov momentum 0.99, lr 1e-2, 1000 x 250 steps) is made for 250,000
steps on a GPU. With a time budget that buys far fewer steps (any budget of minutes or hours on a
CPU, a short one on a GPU), it does not learn: on hippocampus MRI, SGD at momentum 0.99 still had a
pseudo-Dice of 0.000 after 100 steps, where AdamW at lr 3e-3 reached 0.80 in 300 steps
(docs/benchmarks.md). So a budgeted run is planned for its budget, by one rule:

1. Measure, on this device, one training step of a ladder of networks, cheapest first: the plans'
   network at width 8 with the plans' patch shrunk to 1/8, 1/4 and 1/2 of its voxels, then at the
   full patch, then the plans' own width. The walk stops at the first rung that cannot make
   ``TARGET_STEPS`` steps in the training part of the budget; the last rung that can is taken
   (the cheapest one if none can). More steps beat a bigger network in a short run; a bigger
   patch (context) beats a wider network.
2. If even the plans' network makes ``FULL_RUN_STEPS`` steps, the run is not short: the paper's
   recipe. Otherwise: AdamW, lr 3e-3, weight decay 3e-5, poly decay over the budget, epochs of
   about a minute, validation batches about a tenth of the training ones. If the affordable patch
   covers less than half of the labelled anatomy (geometric mean over the axes of patch / median
   foreground extent), it would learn from too little context (an abdominal CT at 2.5 x 1.4 x 1.4
   mm: 0.2 validation Dice on 48 x 64 x 64 patches, where the same phantom at twice the spacing
   reached 0.70): the data is preprocessed again at a spacing coarser by, per axis, the smaller of
   the extent and the planned patch over the affordable patch. The preprocessing time comes out of
   the budget.
3. The final whole-case validation gets at most ``FINAL_VALIDATION_FRACTION`` of the budget:
   with mirroring if it fits, else without, else on as many evenly spaced cases as fit, else
   skipped; and it stops early if the deadline comes anyway. Every choice is said in the log.

Everything measured and chosen is recorded in ``train_config.json`` (``recipe_notes``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..data.plan import plan_patch_size
from ..data.plans import Plans

#: Steps a short run should make: the demo reached 0.85 Dice in ~700, hippocampus 0.80 in 300.
TARGET_STEPS = 600
#: A run that can make this many steps with the plans' network gets the paper's recipe.
FULL_RUN_STEPS = 50_000
SHORT_OPTIMIZER, SHORT_LR = "adamw", 3e-3
#: Share of the budget the final whole-case validation may take.
FINAL_VALIDATION_FRACTION = 0.10
#: Share of the budget kept back for start-up (imports, planning the run) and exit.
MARGIN_FRACTION = 0.03
#: Seconds per case for restoring, writing and scoring a prediction, on top of the network passes.
CASE_OVERHEAD_S = 0.5
MIRRORS = 8
#: Seconds kept for writing the final checkpoints (and the guess of an epoch's validation + writing).
END_RESERVE_S = 2.0


@dataclass
class Probe:
    feature_size: int
    patch: list[int]
    step_s: float
    forward_s: float  # one window (batch 1), inference mode


@dataclass
class RunPlan:
    """What the budget decided: the network, the recipe, the final validation."""

    short: bool
    feature_size: int
    patch: list[int]
    step_s: float
    forward_s: float
    iters_per_epoch: int | None = None
    val_iters: int | None = None
    notes: list[str] = field(default_factory=list)


def measure_step(model_config: dict, batch: int, device: torch.device, amp: str = "off",
                 steps: int = 4) -> tuple[float, float]:
    """Seconds of one training step (the median after the first: one sample can be lucky on a shared
    machine) and of one inference window."""
    from ..network.registry import build_network
    from ..runtime import autocast, synchronizer
    from .loss import DeepSupervisionLoss, DiceCELoss
    from .step import train_step

    rng = torch.get_rng_state()
    try:
        model = build_network(model_config).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
        loss_fn = DeepSupervisionLoss(DiceCELoss())
        cfg = model.config
        x = torch.randn(batch, cfg.in_channels, *cfg.img_size, device=device)
        y = torch.randint(0, cfg.out_channels, (batch, *cfg.img_size), device=device)
        sync = synchronizer(device) or (lambda: None)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, opt, loss_fn, x, y, amp=amp, grad_clip=None, check_finite=False)
            sync()
            times.append(time.perf_counter() - t0)
        model.eval()
        model.deep_supervision = False
        with torch.no_grad(), autocast(device, amp):
            t0 = time.perf_counter()
            model(x[:1])
            sync()
            fwd = time.perf_counter() - t0
        return statistics.median(times[1:] or times), fwd
    finally:
        torch.set_rng_state(rng)


def shrink_patch(plans: Plans, patch: list[int], factor: float) -> list[int]:
    """``patch`` shrunk (physically longest axis first, in the network's multiples) to <= voxels / factor."""
    budget = max(1, int(math.prod(patch) / factor))
    return plan_patch_size(patch, plans.target_spacing, plans.patch_divisor, max_voxels=budget)


def ladder(plans: Plans, patch: list[int], width: int, fixed_width: bool = False) -> list[tuple[int, list[int]]]:
    """Cheapest first: width 8 at 1/8, 1/4, 1/2 and all of the patch, then the plans' width
    (``fixed_width``: ``width`` alone, at each of those patches; a fine-tuning run keeps its network).
    Width 8 is the architecture's smallest (SwinUNETR's is 12); rungs its network cannot take (a
    patch too small for its downsamplings) are left out."""
    from ..network.registry import smallest_width

    small = width if fixed_width else min(smallest_width(plans.network), width)
    rungs: list[tuple[int, list[int]]] = []
    for factor in (8, 4, 2, 1):
        p = shrink_patch(plans, patch, factor) if factor > 1 else list(patch)
        if (small, p) not in rungs and _valid(plans.network, small, p):
            rungs.append((small, p))
    if width != small or not rungs:
        rungs.append((width, list(patch)))
    return rungs


def _valid(network: dict, width: int, patch: list[int]) -> bool:
    from ..network.registry import network_config

    try:
        network_config(network, feature_size=width, img_size=patch)
    except ValueError:
        return False
    return True


def plan_run(plans: Plans, budget_s: float, device: torch.device, batch: int, amp: str,
             model_config: dict, patch: list[int] | None = None, width: int | None = None,
             fixed_network: bool = False, fixed_width: bool = False, log=print) -> RunPlan:
    """Choose the network and recipe for a run of ``budget_s`` seconds (module docstring).

    ``fixed_network``: measure only ``width`` at ``patch``; ``fixed_width``: only ``width``, the
    patch still chosen (a fine-tuning run, whose architecture is the pretrained network's)."""
    patch = list(patch or plans.patch_size)
    width = int(width or model_config["feature_size"])
    train_s = budget_s * (1 - FINAL_VALIDATION_FRACTION - MARGIN_FRACTION)
    t_max = train_s / TARGET_STEPS
    rungs = [(width, patch)] if fixed_network else ladder(plans, patch, width, fixed_width)
    chosen: Probe | None = None
    first: Probe | None = None
    notes = []
    for f, p in rungs:
        step, fwd = measure_step({**model_config, "feature_size": f, "img_size": p}, batch, device, amp)
        probe = Probe(f, p, step, fwd)
        first = first or probe
        notes.append(f"measured: width {f}, patch {tuple(p)}: {step:.2f} s per step of {batch}, "
                     f"{fwd:.3f} s per window -> {train_s / step:.0f} steps in {train_s / 60:.1f} min")
        log(notes[-1])
        if step > t_max and not fixed_network:
            break
        chosen = probe
    if chosen is None:
        chosen = first
        notes.append(f"even the cheapest network makes only {train_s / chosen.step_s:.0f} steps (< {TARGET_STEPS}): "
                     "taken anyway; a longer --time-budget would learn more")
    steps = train_s / chosen.step_s
    short = not (chosen.feature_size == width and chosen.patch == patch and steps >= FULL_RUN_STEPS)
    run = RunPlan(short, chosen.feature_size, chosen.patch, chosen.step_s, chosen.forward_s, notes=notes)
    if short:
        run.iters_per_epoch = int(min(250, max(10, round(60 / chosen.step_s))))
        run.val_iters = max(2, run.iters_per_epoch // 10)
        notes.append(f"short run ({steps:.0f} steps < {FULL_RUN_STEPS}): width {chosen.feature_size}, patch "
                     f"{tuple(chosen.patch)}, {SHORT_OPTIMIZER} lr {SHORT_LR:g} with poly decay over the budget, "
                     f"{run.iters_per_epoch} steps + {run.val_iters} validation batches per epoch")
    else:
        notes.append(f"full run ({steps:.0f} steps): the paper's recipe")
    return run


#: A short run trains coarser when its patch covers less than this share of the labelled anatomy
#: (geometric mean over the axes of patch / foreground extent, each at most 1).
COVERAGE_BELOW = 0.5


def foreground_extent(folder, names: list[str]) -> list[float] | None:
    """Median per-axis extent, in preprocessed voxels, of the labelled voxels of ``names`` (from the
    stored class locations, a sample of every class); None when no case has any label."""
    import numpy as np

    from ..data.preprocess import load_case

    extents = []
    for name in names:
        loc = load_case(folder, name)[2]
        if len(loc):
            extents.append(loc[:, 1:].max(axis=0) - loc[:, 1:].min(axis=0) + 1)
    return [float(v) for v in np.median(np.array(extents), axis=0)] if extents else None


def coarser_spacing(planned_patch: list[int], patch: list[int], extent: list[float] | None) -> list[float] | None:
    """Per-axis factors for the target spacing (rule 2): when ``patch`` covers less than
    ``COVERAGE_BELOW`` of the foreground ``extent``, the factors that let it cover the smaller of
    the extent and the planned patch; None when it covers enough (or nothing is known)."""
    if not extent or list(patch) == list(planned_patch):
        return None
    cover = [min(1.0, p / e) for p, e in zip(patch, extent, strict=True)]
    if math.prod(cover) ** (1 / len(cover)) >= COVERAGE_BELOW:
        return None
    return [max(1.0, min(big, e) / p) for big, e, p in zip(planned_patch, extent, patch, strict=True)]


def windows_per_case(shape, patch, step: float = 0.5) -> int:
    n = 1
    for s, p in zip(shape, patch, strict=True):
        s = max(math.ceil(s), p)
        n *= 1 if s <= p else math.ceil((s - p) / (p * step)) + 1
    return n


def plan_final_validation(n_cases: int, windows: int, forward_s: float, allowance_s: float,
                          tta: bool) -> tuple[int, bool, str]:
    """How many cases, and whether with mirroring, the final validation can afford: ``(cases, tta, why)``."""
    one = windows * forward_s
    with_tta, without = MIRRORS * one + CASE_OVERHEAD_S, one + CASE_OVERHEAD_S
    if tta and n_cases * with_tta <= allowance_s:
        return n_cases, True, f"all {n_cases} case(s) with mirroring (about {n_cases * with_tta / 60:.1f} min)"
    if n_cases * without <= allowance_s:
        why = "without mirroring to fit the budget" if tta else "without mirroring"
        return n_cases, False, f"all {n_cases} case(s) {why} (about {n_cases * without / 60:.1f} min)"
    k = int(allowance_s // without)
    if k >= 1:
        return k, False, (f"{k} of {n_cases} case(s), evenly spaced, without mirroring: all would take about "
                          f"{n_cases * without / 60:.1f} min, {allowance_s / 60:.1f} min are left for it")
    return 0, False, f"skipped: one case would take about {without / 60:.1f} min, {allowance_s / 60:.1f} min are left"


def evenly_spaced(names: list[str], k: int) -> list[str]:
    if k >= len(names):
        return list(names)
    idx = sorted({round(i * (len(names) - 1) / max(k - 1, 1)) for i in range(k)})
    return [names[i] for i in idx]
