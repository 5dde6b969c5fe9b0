"""The measurements, each run inside a worker process (:func:`run_measurement`).

The training step is the trainer's own (:func:`unetrpp.training.step.train_step`) with the recipe's
optimizer, loss and scaler; a figure's peak memory is its process's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..runtime import autocast, peak_memory_mb, synchronizer
from .baselines import (
    CT_NORMALISATION,
    MultiHeadSelfAttention,
    ct_like_volume,
    monai_inferer,
    monai_sliding_probabilities,
)
from .harness import median_time


def _model(preset: str, device, patch: Sequence[int] | None, compile_: bool, checkpointing: bool = False):
    from ..network import create_model

    model = create_model(preset, **({"img_size": tuple(patch)} if patch else {})).to(device)
    if checkpointing:
        model.activation_checkpointing = True
    run = torch.compile(model) if compile_ else model
    return model, run


def bench_rates(device, repeats: int) -> dict:
    """Multiply-add rates of a plain 3x3x3 conv3d and a 2048^2 matmul on ``device``."""
    out = {}
    sync = synchronizer(device)
    with torch.inference_mode():
        for c, size in ((16, (64, 128, 128)), (32, (32, 32, 32))):
            x = torch.randn(1, c, *size, device=device).contiguous(memory_format=torch.channels_last_3d)
            w = torch.randn(c, c, 3, 3, 3, device=device)
            med, _ = median_time(lambda x=x, w=w: F.conv3d(x, w, padding=1), repeats, sync=sync)
            out[f"conv3d_{c}ch_{'x'.join(map(str, size))}_gmacs_per_s"] = c * c * 27 * math.prod(size) / med / 1e9
        a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
        med, _ = median_time(lambda: a @ b, repeats, sync=sync)
        out["matmul_2048_gmacs_per_s"] = 2048**3 / med / 1e9
    return out


def bench_forward(preset: str, device, repeats: int, amp: str = "off", compile_: bool = False,
                  patch: Sequence[int] | None = None, batch: int = 1) -> dict:
    model, run = _model(preset, device, patch, compile_)
    model.eval()
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, *cfg.img_size, device=device)

    def step():
        with torch.inference_mode(), autocast(device, amp):
            run(x)

    med, times = median_time(step, repeats, warmup=2 if compile_ else 1, sync=synchronizer(device))
    return {"median_s": med, "times_s": times, "patch": list(cfg.img_size), "batch": batch}


def recipe_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str = "off",
                run: torch.nn.Module | None = None) -> Callable[[], torch.Tensor]:
    """The trainer's step on ``(x, y)`` with a fresh recipe optimizer (SGD Nesterov 0.99, fused),
    Dice + CE with deep supervision (batch Dice) and the scaler ``amp`` needs; ``run`` is what the
    forward pass calls (e.g. ``torch.compile(model)``; default ``model``). Puts ``model`` in training
    mode; returns the step (each call returns its loss)."""
    from ..training.config import TrainConfig
    from ..training.step import build_optimizer, grad_scaler, recipe_loss, train_step

    model.train()
    opt = build_optimizer(model.parameters(), TrainConfig(), x.device)  # the recipe's SGD
    loss_fn = recipe_loss(batch_dice=True)
    scaler = grad_scaler(amp)
    run = model if run is None else run
    return lambda: train_step(run, opt, loss_fn, x, y, scaler, amp, check_finite=False)


def _train_step_fn(model, run, device, batch: int, amp: str) -> Callable[[], torch.Tensor]:
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, *cfg.img_size, device=device)
    y = torch.randint(0, cfg.out_channels, (batch, *cfg.img_size), device=device)
    return recipe_step(model, x, y, amp, run)


def bench_train(preset: str, device, repeats: int, amp: str = "off", compile_: bool = False,
                checkpointing: bool = False, patch: Sequence[int] | None = None, batch: int = 2) -> dict:
    model, run = _model(preset, device, patch, compile_, checkpointing)
    step = _train_step_fn(model, run, device, batch, amp)
    med, times = median_time(step, repeats, warmup=2 if compile_ else 1, sync=synchronizer(device))
    return {"median_s": med, "times_s": times, "batch": batch, "patch": list(model.config.img_size)}


def bench_maxbatch(preset: str, device, amp: str = "bf16", limit: int = 256, checkpointing: bool = False) -> dict:
    """Largest training batch (powers of two, then bisection) whose step runs without running out of memory."""
    if device.type != "cuda":
        raise UserError("--what maxbatch needs --device cuda (on the CPU, memory is bounded by the host, not a card)")

    def fits(b: int) -> bool:
        model = run = step = None
        try:
            model, run = _model(preset, device, None, False, checkpointing)
            step = _train_step_fn(model, run, device, b, amp)
            step()
            torch.cuda.synchronize(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del model, run, step
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_batch": lo, "amp": amp, "checkpointing": checkpointing}


def bench_attention(kind: str, dim: int, tokens: int, device, repeats: int, heads: int = 4, proj_size: int = 64,
                    amp: str = "off") -> dict:
    """Forward of one attention (``epa`` or ``mhsa``) on ``(1, tokens, dim)``, eval, no grad."""
    from ..network.epa import EPA

    torch.manual_seed(0)
    if kind == "epa":
        module = EPA(dim, tokens, proj_size, heads)
    elif kind == "mhsa":
        module = MultiHeadSelfAttention(dim, heads)
    else:
        raise UserError(f"attention kind must be 'epa' or 'mhsa', got {kind!r}")
    module = module.to(device).eval()
    x = torch.randn(1, tokens, dim, device=device)

    def step():
        with torch.inference_mode(), autocast(device, amp):
            module(x)

    med, times = median_time(step, repeats, sync=synchronizer(device))
    return {"kind": kind, "dim": dim, "tokens": tokens, "median_s": med, "times_s": times}


def bench_sliding(preset: str, device, volume: Sequence[int], tta: bool, impl: str = "unetrpp", step: float = 0.5,
                  batch: int | None = None, amp: str = "off") -> dict:
    """Sliding-window class probabilities of a normalised CT-like volume, ours or MONAI's driver."""
    from ..inference.sliding_window import MIRROR_AXES, sliding_window_probabilities, window_grid
    from ..network import create_model

    torch.manual_seed(0)
    model = create_model(preset).to(device).eval()
    model.deep_supervision = False
    cfg = model.config
    lo, hi = CT_NORMALISATION["clip"]
    hu = torch.from_numpy(ct_like_volume(volume))
    image = ((hu.clamp(lo, hi) - CT_NORMALISATION["mean"]) / CT_NORMALISATION["std"])[None]
    batch = batch or (4 if device.type == "cuda" else 2)
    flips = 8 if tta else 1
    windows = len(window_grid(tuple(volume), tuple(cfg.img_size), step)) * flips
    sync = synchronizer(device) or (lambda: None)

    if impl == "unetrpp":
        def run():
            return sliding_window_probabilities(model, image, cfg.img_size, cfg.out_channels, step=step,
                                                mirror_axes=MIRROR_AXES if tta else (), batch=batch, device=device,
                                                amp=amp)
    elif impl == "monai":
        monai_inferer()  # imported (or refused) before the clock starts
        x = image[None].to(device)

        def run():
            return monai_sliding_probabilities(model, x, cfg.img_size, batch, step, flips, device, amp)
    else:
        raise UserError(f"sliding impl must be 'unetrpp' or 'monai', got {impl!r}")

    t = time.perf_counter()
    run()
    sync()
    wall = time.perf_counter() - t
    return {"impl": impl, "wall_s": wall, "window_passes": windows, "windows_per_s": windows / wall, "tta": tta,
            "volume": list(volume), "batch": batch, "step": step}


#: What a worker can measure: ``spec["kind"]`` -> the measurement.
MEASUREMENTS: dict[str, Callable[..., dict]] = {
    "rates": bench_rates, "forward": bench_forward, "train": bench_train, "attention": bench_attention,
    "sliding": bench_sliding, "maxbatch": bench_maxbatch}


def run_measurement(spec: dict) -> dict:
    """Run the measurement ``spec`` names (``kind``, ``kwargs``, ``device``, ``threads``, ``tune``) in this
    process, which it configures (threads, allocator, cuDNN autotuning); adds the peak memory."""
    from ..runtime import tune_cpu_allocator

    torch.set_num_threads(spec["threads"])
    tuned = tune_cpu_allocator() if spec.get("tune", True) else False
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cudnn.benchmark = True
    res = MEASUREMENTS[spec["kind"]](device=device, **spec.get("kwargs", {}))
    res["peak_memory_mb"] = peak_memory_mb(device)
    res["allocator_tuned"] = tuned
    return res
