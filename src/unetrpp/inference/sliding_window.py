"""Sliding-window inference with Gaussian importance weighting and mirroring (spec section 4).

Windows of the training patch size tile the (padded) volume with a step of ``step * patch``;
each window's softmax is multiplied by a Gaussian centred on the patch (sigma = patch / 8,
maximum 1, zeros replaced by the smallest non-zero value) and accumulated together with the
weights; the result is the weighted mean. Mirroring test-time augmentation averages the softmax
of the window and its flips over every subset of the three spatial axes (8 passes).

Memory: only the accumulator ``(k, z, y, x)`` and one weight volume are held, in float32, on the
accumulation device (the compute device unless it cannot hold them, then the CPU); windows are
computed ``batch`` at a time (with shortcuts: ``batch`` passes, a pass being a window under one flip,
so a window's mirrorings go through the network side by side: :func:`passes_per_call`).

Shortcuts (:class:`Shortcuts`; ``EXACT`` turns them off and is the protocol above, pass for pass):

* ``constant_windows``: a window whose voxels all hold one value per channel (padding, the air or
  fat that CT clipping makes uniform, an MRI's zero background) gives the same network output
  wherever it lies, so each distinct such window is computed once (with its mirrors) and reused.
  Exact up to the rounding of a different batch composition.
* ``mirror_margin`` / ``mirror_step``: with mirroring, every window is first run unmirrored; the
  7 mirrored passes then run only on the windows holding a voxel where that blended first answer
  is unsure (top-1 minus top-2 probability below the margin), so every unsure voxel gets exactly
  the exact protocol's answer (``mirror_step``: a coarser grid of mirrored windows instead, not
  exact). Where the network is sure, averaging the mirrors does not move the arg-max. The default
  (:data:`DEFAULT_SHORTCUTS`) was chosen by measurement (docs/benchmarks.md,
  ``benchmarks/fast_predict.py``): it changed no voxel on the real CT and hippocampus MRIs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..runtime import autocast

MIRROR_AXES = (0, 1, 2)
#: Windows start ``step * patch`` apart (the official protocol's 0.5).
DEFAULT_STEP = 0.5


@dataclass(frozen=True)
class Shortcuts:
    """Work the driver may skip because it cannot (or measurably does not) change the answer.

    With mirroring, the fast driver runs in two phases: every window once, unmirrored; then the 7
    mirrored passes only where that first answer is unsure (top-1 minus top-2 probability below
    ``mirror_margin``; None: everywhere). ``mirror_step=None`` (the default) mirrors the driver's own
    windows that hold an unsure voxel (where its Gaussian weight is at least ``mirror_weight``; 0:
    anywhere): every window covering an unsure voxel is then mirrored, so each unsure voxel gets
    exactly the official answer, and only windows where every voxel is sure skip their mirrors. A
    number tiles the unsure voxels' bounding box with windows ``mirror_step`` patches apart
    instead: far fewer passes on small volumes, but the unsure voxels then blend other windows than
    the official protocol's, which changed a weak network's answer (docs/benchmarks.md). Each
    voxel's answer is the Gaussian-weighted mean of every pass that covered it; with
    ``mirror_margin=None`` and ``mirror_step=None`` that is the exact protocol's arithmetic.
    """

    constant_windows: bool = True
    mirror_margin: float | None = 0.3
    mirror_step: float | None = None
    mirror_weight: float = 0.0

    def describe(self) -> str:
        if self == EXACT:
            return "exact protocol"
        parts = ["constant windows computed once"] if self.constant_windows else []
        where = "everywhere" if self.mirror_margin is None else f"where the margin < {self.mirror_margin:g}"
        step = "on the driver's windows" if self.mirror_step is None else f"at step {self.mirror_step:g}"
        parts.append(f"mirrored passes {where}, {step}")
        return ", ".join(parts)


#: The protocol of the paper's code: every window, every mirror.
EXACT = Shortcuts(constant_windows=False, mirror_margin=None, mirror_step=None)
#: What ``predict`` uses unless told ``--exact``: the fastest setting measured whose Dice on real data
#: stays within 0.002 of the exact protocol's on every set (docs/benchmarks.md).
DEFAULT_SHORTCUTS = Shortcuts(constant_windows=True, mirror_margin=0.3, mirror_step=None, mirror_weight=0.0)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """The importance map of a window: a Gaussian, sigma = ``patch * sigma_scale``, maximum 1, no zeros."""
    axes = []
    for n in patch_size:
        centre, sigma = n // 2, n * sigma_scale
        x = np.arange(n, dtype=np.float64) - centre
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g /= g.max()
    g = g.astype(np.float32)
    nonzero = g[g > 0]
    g[g == 0] = nonzero.min()
    return torch.from_numpy(g)


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """Start offsets along one axis: ``ceil((S - P) / (step P)) + 1`` positions evenly spaced from 0 to ``S - P``."""
    if size < patch:
        raise UserError(f"axis of size {size} is smaller than the patch {patch}; pad first")
    if not 0 < step <= 1:
        raise UserError(f"step must be in (0, 1], got {step}")
    n = math.ceil((size - patch) / (step * patch)) + 1
    if n == 1:
        return [0]
    spacing = (size - patch) / (n - 1)
    return [round(i * spacing) for i in range(n)]


def window_grid(shape: Sequence[int], patch: Sequence[int], step: float) -> list[tuple[int, int, int]]:
    return list(itertools.product(*(window_starts(s, p, step) for s, p in zip(shape, patch, strict=True))))


def _pad_to(image: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad ``(c, z, y, x)`` with zeros (centred) so every axis is at least the patch; the slices undo it."""
    shape = image.shape[1:]
    pads, region = [], []
    for s, p in zip(shape, patch, strict=True):
        total = max(p - s, 0)
        lo = total // 2
        pads.append((lo, total - lo))
        region.append(slice(lo, lo + s))
    if not any(sum(p) for p in pads):
        return image, tuple(region)
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad wants the last axis first
    return torch.nn.functional.pad(image, flat), tuple(region)



@torch.no_grad()
def sliding_window_probabilities(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    step: float = DEFAULT_STEP,
    mirror_axes: Sequence[int] = MIRROR_AXES,
    batch: int | None = None,
    device: str | torch.device = "cpu",
    amp: str = "off",
    accumulate_on: str | torch.device | None = None,
    progress: bool = False,
    shortcuts: Shortcuts = EXACT,
    stats: dict | None = None,
) -> torch.Tensor:
    """Class probabilities ``(k, z, y, x)`` (float32) of a ``(c, z, y, x)`` volume.

    Args:
        network: maps ``(b, c, *patch)`` to logits ``(b, k, *patch)`` (one head, no deep supervision).
        step: window step as a fraction of the patch (0.5: half-overlapping windows).
        mirror_axes: spatial axes (0 = z) for mirroring TTA; ``()`` turns TTA off.
        batch: network passes per forward call. :data:`EXACT`: windows per call (each run under every flip
            in turn), default 2 on a CPU, 4 on CUDA; with shortcuts, (window, flip) passes per call, default
            :func:`passes_per_call` (the mirrorings of a window go through the network together).
        accumulate_on: device of the accumulator (default: ``device``, or the CPU if it does not fit).
        shortcuts: work to skip (:data:`EXACT`, the default here, skips none; ``predict`` uses
            :data:`DEFAULT_SHORTCUTS`).
        stats: if given, filled with counts: windows, network passes run, constant windows, windows
            of the mirrored phase, and (with a margin) voxels sure to be background, of ``voxels``.
    """
    device = torch.device(device)
    patch = tuple(int(p) for p in patch_size)
    batch = planned_batch(patch, device, shortcuts) if batch is None else int(batch)
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    image = torch.as_tensor(image)
    if image.dim() != 4:
        raise UserError(f"image must be (c, z, y, x), got shape {tuple(image.shape)}")
    image, region = _pad_to(image.float(), patch)
    shape = tuple(image.shape[1:])
    acc_device = torch.device(accumulate_on) if accumulate_on is not None else device
    try:
        acc = torch.zeros((num_classes, *shape), dtype=torch.float32, device=acc_device)
        weight = torch.zeros(shape, dtype=torch.float32, device=acc_device)
    except torch.OutOfMemoryError:
        acc_device = torch.device("cpu")
        acc = torch.zeros((num_classes, *shape), dtype=torch.float32)
        weight = torch.zeros(shape, dtype=torch.float32)
    g = gaussian_importance(patch).to(device)
    g_acc = g.to(acc_device)
    flips = [list(a) for r in range(len(mirror_axes) + 1) for a in itertools.combinations(mirror_axes, r)]
    windows = window_grid(shape, patch, step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), desc="windows", unit="win", leave=False)
    if stats is not None:
        stats.update(windows=len(windows), passes=len(windows) * len(flips), constant=0)
    if shortcuts != EXACT:
        try:
            _fast_windows(network, image, windows, patch, flips, batch, device, amp, g, g_acc, acc, weight,
                          acc_device, shortcuts, stats, bar, step)
        finally:
            if bar:
                bar.close()
        acc /= weight
        return acc[(slice(None), *region)]
    try:
        for i in range(0, len(windows), batch):
            starts = windows[i : i + batch]
            boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in starts]
            x = torch.stack([image[(slice(None), *b)] for b in boxes]).to(device, non_blocking=True)
            probs = None
            for p in _passes(network, x, flips, device, amp):
                probs = p if probs is None else probs.add_(p)
            probs.mul_(g / len(flips))
            probs = probs.to(acc_device)
            for b, box in enumerate(boxes):
                acc[(slice(None), *box)] += probs[b]
                weight[box] += g_acc
            if bar:
                bar.update(len(starts))
    finally:
        if bar:
            bar.close()
    acc /= weight
    return acc[(slice(None), *region)]


def _passes(network, x: torch.Tensor, flips: list[list[int]], device, amp) -> Iterator[torch.Tensor]:
    """Softmax of ``x`` under each flip in ``flips`` (flipped back), one at a time, in that order."""
    for axes in flips:
        dims = [a + 2 for a in axes]
        xi = torch.flip(x, dims) if dims else x
        with autocast(device, amp):
            logits = network(xi)
        p = torch.softmax(logits.float(), dim=1)
        yield torch.flip(p, dims) if dims else p


def _constant_key(window: torch.Tensor) -> bytes | None:
    """The per-channel value of a window whose voxels are all equal per channel, else None."""
    flat = window.reshape(window.shape[0], -1)
    first = flat[:, :1]
    if bool((flat == first).all()):
        return first.contiguous().cpu().numpy().tobytes()
    return None


def planned_batch(patch_size: Sequence[int], device: str | torch.device, shortcuts: Shortcuts) -> int:
    """What a forward call takes when ``batch`` is not given: :data:`EXACT`, windows (2 on a CPU, 4 on CUDA,
    each under every flip in turn); otherwise passes, :func:`passes_per_call`."""
    if shortcuts == EXACT:
        return 4 if torch.device(device).type == "cuda" else 2
    return passes_per_call(patch_size, device)


def passes_per_call(patch_size: Sequence[int], device: str | torch.device = "cpu") -> int:
    """Network passes per forward call the fast driver plans for a patch: as many as keep a call within
    2^21 voxels on a CPU, between 1 and 8 (one window's 8 mirrorings); on CUDA within 2^22, at least 4
    (the exact driver's 4 windows per call).

    Measured on 2 CPU cores (``benchmarks/passes_per_call.py``, docs/benchmarks.md): a 32 x 64 x 32 patch runs
    1.5x faster per pass in calls of 8 than of 2, a 32 x 96 x 96 one 1.2x, a 64 x 128 x 128 one no faster
    (so it stays at 2, the old default; activations grow with the passes per call)."""
    voxels = math.prod(int(p) for p in patch_size)
    if torch.device(device).type == "cuda":
        return max(4, min(8, 2**22 // voxels))
    return max(1, min(8, 2**21 // voxels))


def _fast_windows(network, image, windows, patch, flips, batch, device, amp, g, g_acc, acc, weight, acc_device,
                  shortcuts: Shortcuts, stats: dict | None, bar, step: float) -> None:
    """The sliding window with :class:`Shortcuts` (two phases); accumulates into ``acc`` / ``weight``.

    The unit of work is one pass: a window under one flip. ``batch`` passes go through the network per call,
    the mirrorings of one window side by side (on a CPU, small patches run faster that way); each window's
    passes are summed before they are added, Gaussian-weighted, to the accumulator."""
    n_flips = len(flips)
    counts = {"passes": 0, "constant": 0, "background": 0, "mirrored_windows": 0,
              "voxels": weight.numel()}
    cache: dict[bytes, torch.Tensor] = {}

    def add(box, probs_g: torch.Tensor, times: int = 1) -> None:
        acc[(slice(None), *box)] += probs_g
        weight[box] += g_acc if times == 1 else g_acc * times

    dims_of = [[a + 1 for a in axes] for axes in flips]  # flip index -> dims of a (c, z, y, x) window
    queue: list[tuple[tuple, torch.Tensor, int]] = []  # (box, window, flip index) waiting for a call

    def call() -> None:
        """One forward call over the queued passes; each window's sum (times the Gaussian) accumulated."""
        items = queue[:batch]
        del queue[:batch]
        x = torch.stack([torch.flip(w, dims_of[f]) if f else w for _, w, f in items]).to(device, non_blocking=True)
        with autocast(device, amp):
            logits = network(x)
        probs = torch.softmax(logits.float(), dim=1)
        del logits
        counts["passes"] += len(items)
        if bar:
            bar.update(len(items))
        i = 0
        for _, run in itertools.groupby(items, key=lambda item: item[0]):  # a window's passes are queued together
            run = list(run)
            total = None
            for _, _, f in run:
                p = torch.flip(probs[i], dims_of[f]) if f else probs[i]
                total = p if total is None else total.add_(p)
                i += 1
            add(run[0][0], total.mul_(g).to(acc_device), len(run))

    def submit(box, window, which) -> None:
        for f in which:
            queue.append((box, window, f))
            if len(queue) >= batch:
                call()

    def box_of(st):
        return tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True))

    # phase 1: every window unmirrored (a constant window: all its mirrors, once per value)
    for st in windows:
        box = box_of(st)
        window = image[(slice(None), *box)]
        key = _constant_key(window) if shortcuts.constant_windows else None
        if key is not None:
            counts["constant"] += 1
            if key not in cache:
                x = window[None].to(device)
                total = None
                for p in _passes(network, x, flips, device, amp):
                    total = p if total is None else total.add_(p)
                counts["passes"] += n_flips
                cache[key] = (total * g)[0].to(acc_device)
            add(box, cache[key], n_flips)
            if bar:
                bar.update(1)
        else:
            submit(box, window, [0])  # the bar advances when its call is made
    while queue:
        call()
    if n_flips > 1:  # phase 2: the mirrors where the first answer is unsure
        unsure = None
        if shortcuts.mirror_margin is not None:
            unsure, counts["background"] = _unsure(acc, weight, shortcuts.mirror_margin)
        if shortcuts.mirror_step is None:  # the driver's own windows: unsure voxels get the exact answer
            grid = windows
        else:
            grid = _mirror_grid(unsure, tuple(weight.shape), patch, shortcuts.mirror_step)
        centre = (g_acc >= shortcuts.mirror_weight)
        selected = []
        for st in grid:
            box = box_of(st)
            if unsure is not None and not bool(unsure[box][centre].any()):
                continue
            window = image[(slice(None), *box)]
            if shortcuts.constant_windows and _constant_key(window) is not None:
                continue  # uniform input: the constant windows of phase 1 carry their mirrors already
            selected.append((box, window))
        counts["mirrored_windows"] = len(selected)
        if bar and selected:
            bar.total += len(selected) * (n_flips - 1)
            bar.refresh()
        for box, window in selected:
            submit(box, window, range(1, n_flips))
        while queue:
            call()
    if stats is not None:
        stats.update(counts)


def _unsure(acc: torch.Tensor, weight: torch.Tensor, margin: float, slab: int = 8) -> tuple[torch.Tensor, int]:
    """Voxels whose blended top-1 minus top-2 probability is below ``margin``, and how many voxels are
    sure background; a few slices at a time, so no second ``(k, z, y, x)`` volume is made."""
    if acc.shape[0] < 2:  # one class: nothing to be unsure about
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device), 0
    unsure = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    background = 0
    for z in range(0, weight.shape[0], slab):
        top2 = torch.topk(acc[:, z : z + slab] / weight[z : z + slab], 2, dim=0)
        u = (top2.values[0] - top2.values[1]) < margin
        unsure[z : z + slab] = u
        background += int(((top2.indices[0] == 0) & ~u).sum())
    return unsure, background


def _mirror_grid(unsure: torch.Tensor | None, shape, patch, step: float) -> list[tuple[int, int, int]]:
    """Window starts tiling the bounding box of the ``unsure`` voxels (all of ``shape`` if None) at ``step``."""
    if unsure is None:
        return window_grid(shape, patch, step)
    if not bool(unsure.any()):
        return []
    axes = []
    for axis, (size, p) in enumerate(zip(shape, patch, strict=True)):
        other = tuple(a for a in range(len(shape)) if a != axis)
        idx = torch.nonzero(unsure.any(dim=other)).flatten()
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        extent = max(hi - lo, p)
        lo = min(max(0, (lo + hi - extent) // 2), size - extent)
        axes.append([lo + s for s in window_starts(extent, p, step)])
    return list(itertools.product(*axes))
