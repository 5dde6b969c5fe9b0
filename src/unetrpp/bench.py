"""``unetrpp bench``: speed and memory of the network, EPA scaling and whole-volume inference.

Every figure is a median over ``repeats`` timed runs after warm-up, and is recorded with the
machine (CPU model, cores, GPU), torch version and thread count. Each measurement runs in its own
process (``python -m unetrpp.bench --worker``), so a peak memory figure is that measurement's
own: peak resident set on the CPU, peak allocated memory on CUDA.

What can be measured (``--what``):

* ``rates``: the machine's own conv3d and matmul multiply-add rates, to put the others in context;
* ``forward``: eval forward of one patch (batch 1, no grad): latency, multiply-adds per second;
* ``train``: one training step of the official recipe (batch 2, SGD Nesterov 0.99, Dice + CE with
  deep supervision, gradient clipping at 12): latency and peak memory;
* ``epa``: one EPA attention against standard multi-head self-attention
  (``scaled_dot_product_attention``) over channels C and token counts N, with the growth exponent
  of time in N fitted per C (least squares on log-log);
* ``sliding``: whole-volume sliding-window prediction (overlap 0.5, Gaussian weighting, optional
  8-way mirroring), optionally against MONAI's ``sliding_window_inference`` driving the same network;
* ``maxbatch`` (CUDA): the largest training batch that fits at the preset's patch size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

WHATS = ("rates", "forward", "train", "epa", "sliding", "maxbatch")
EPA_DIMS = (32, 64, 128, 256)
EPA_TOKENS = (4096, 8192, 16384, 32768, 65536)


# --------------------------------------------------------------------------------------------
# helpers


def machine_info(device: str = "cpu") -> dict:
    """What a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
                ) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise UserError("need at least two (x, y) points")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    if den == 0:
        raise UserError("all x are equal")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den


def _peak_memory_mb(device) -> float:
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _autocast(device, amp: str):
    from .inference.sliding_window import autocast_for

    return autocast_for(device, amp)


def _model(preset: str, device, patch: Sequence[int] | None, compile_: bool, checkpointing: bool = False):
    from .network import create_model

    model = create_model(preset, **({"img_size": tuple(patch)} if patch else {})).to(device)
    if checkpointing:
        model.activation_checkpointing = True
    run = torch.compile(model) if compile_ else model
    return model, run


# --------------------------------------------------------------------------------------------
# measurements (each runs inside a worker process)


def bench_rates(device, repeats: int) -> dict:
    """Multiply-add rates of a plain 3x3x3 conv3d and a 2048^2 matmul on ``device``."""
    out = {}
    sync = _sync(device)
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
        with torch.inference_mode(), _autocast(device, amp):
            run(x)

    med, times = median_time(step, repeats, warmup=2 if compile_ else 1, sync=_sync(device))
    return {"median_s": med, "times_s": times, "patch": list(cfg.img_size), "batch": batch}


def _train_step_fn(model, run, device, batch: int, amp: str):
    from .training.config import TrainConfig
    from .training.loss import DeepSupervisionLoss, DiceCELoss
    from .training.trainer import build_optimizer

    cfg = model.config
    model.train()
    opt = build_optimizer(model.parameters(), TrainConfig(), device)  # the recipe's SGD
    loss_fn = DeepSupervisionLoss(DiceCELoss(batch_dice=True))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    x = torch.randn(batch, cfg.in_channels, *cfg.img_size, device=device)
    y = torch.randint(0, cfg.out_channels, (batch, *cfg.img_size), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            out = run(x)
        loss = loss_fn([o.float() for o in out] if isinstance(out, (list, tuple)) else out.float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        scaler.step(opt)
        scaler.update()

    return step


def bench_train(preset: str, device, repeats: int, amp: str = "off", compile_: bool = False,
                checkpointing: bool = False, patch: Sequence[int] | None = None, batch: int = 2) -> dict:
    model, run = _model(preset, device, patch, compile_, checkpointing)
    step = _train_step_fn(model, run, device, batch, amp)
    med, times = median_time(step, repeats, warmup=2 if compile_ else 1, sync=_sync(device))
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


class MultiHeadSelfAttention(nn.Module):
    """Standard MHSA on ``(B, N, C)`` tokens: one qkv linear, fused SDPA, output linear (the baseline)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def bench_attention(kind: str, dim: int, tokens: int, device, repeats: int, heads: int = 4, proj_size: int = 64,
                    amp: str = "off") -> dict:
    """Forward of one attention (``epa`` or ``mhsa``) on ``(1, tokens, dim)``, eval, no grad."""
    from .network.epa import EPA

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
        with torch.inference_mode(), _autocast(device, amp):
            module(x)

    med, times = median_time(step, repeats, sync=_sync(device))
    return {"kind": kind, "dim": dim, "tokens": tokens, "median_s": med, "times_s": times}


#: CT normalisation of the synthetic benchmark volume (a plans' ``normalization`` entry).
CT_NORMALISATION = {"channel": "CT", "scheme": "ct", "clip": [-175.0, 250.0], "mean": 50.0, "std": 60.0}


def ct_like_volume(shape: Sequence[int]):
    """A deterministic ``(z, y, x)`` float32 volume in Hounsfield units: air, a soft-tissue body, a bone bar."""
    import numpy as np

    rng = np.random.default_rng(0)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.48 * shape[2])) ** 2 < 1
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, tuple(shape))
    image[:, int(shape[1] * 0.7):int(shape[1] * 0.8), int(shape[2] * 0.45):int(shape[2] * 0.55)] = 700.0
    return image.astype(np.float32)


def bench_sliding(preset: str, device, volume: Sequence[int], tta: bool, impl: str = "unetrpp", step: float = 0.5,
                  batch: int | None = None, amp: str = "off") -> dict:
    """Sliding-window class probabilities of a normalised CT-like volume, ours or MONAI's driver."""
    from .inference.sliding_window import MIRROR_AXES, sliding_window_probabilities, window_grid
    from .network import create_model

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
    sync = _sync(device) or (lambda: None)

    if impl == "unetrpp":
        def run():
            return sliding_window_probabilities(model, image, cfg.img_size, cfg.out_channels, step=step,
                                                mirror_axes=MIRROR_AXES if tta else (), batch=batch, device=device,
                                                amp=amp)
    elif impl == "monai":
        try:
            from monai.inferers import sliding_window_inference
        except ImportError:
            raise UserError("--monai needs MONAI: pip install --no-deps monai") from None
        x = image[None].to(device)
        combos = [()] + [(a,) for a in (2, 3, 4)] + [(2, 3), (2, 4), (3, 4), (2, 3, 4)]

        def run():
            acc = None
            with torch.inference_mode(), _autocast(device, amp):
                for axes in combos[:flips]:
                    xi = torch.flip(x, axes) if axes else x
                    logits = sliding_window_inference(xi, tuple(cfg.img_size), batch, model, overlap=1 - step,
                                                      mode="gaussian", sigma_scale=0.125)
                    p = torch.softmax(logits.float(), 1)
                    p = torch.flip(p, axes) if axes else p
                    acc = p if acc is None else acc.add_(p)
            return acc[0] / flips
    else:
        raise UserError(f"sliding impl must be 'unetrpp' or 'monai', got {impl!r}")

    t = time.perf_counter()
    run()
    sync()
    wall = time.perf_counter() - t
    return {"impl": impl, "wall_s": wall, "window_passes": windows, "windows_per_s": windows / wall, "tta": tta,
            "volume": list(volume), "batch": batch, "step": step}


# --------------------------------------------------------------------------------------------
# the driver: one worker process per measurement


def _worker(spec: dict) -> dict:
    from .runtime import tune_cpu_allocator

    torch.set_num_threads(spec["threads"])
    tuned = tune_cpu_allocator() if spec.get("tune", True) else False
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cudnn.benchmark = True
    kind, kw = spec["kind"], spec.get("kwargs", {})
    fn = {"rates": bench_rates, "forward": bench_forward, "train": bench_train, "attention": bench_attention,
          "sliding": bench_sliding, "maxbatch": bench_maxbatch}[kind]
    res = fn(device=device, **kw)
    res["peak_memory_mb"] = _peak_memory_mb(device)
    res["allocator_tuned"] = tuned
    return res


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh process; returns its result dict (raises with its error line)."""
    proc = subprocess.run([sys.executable, "-m", "unetrpp.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        err = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1]).strip()  # the error, not a hint
        raise RuntimeError(f"benchmark {spec['kind']} failed: {err}")
    return json.loads(lines[-1][len("RESULT "):])


def run_suite(whats: Sequence[str], preset: str = "synapse", device: str = "cpu", threads: int = 2,
              repeats: int = 5, amp: str = "off", compile_: bool = False, checkpointing: bool = False,
              patch: Sequence[int] | None = None, train_batch: int = 2, dims: Sequence[int] = EPA_DIMS,
              tokens: Sequence[int] = EPA_TOKENS, epa_max_seconds: float = 20.0,
              epa_kinds: Sequence[str] = ("epa", "mhsa"), epa_rounds: int = 1,
              volume: Sequence[int] = (148, 256, 256), tta: Sequence[bool] = (False, True), monai: bool = False,
              tune: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Run the chosen measurements, each in its own process; returns the full record."""
    bad = [w for w in whats if w not in WHATS]
    if bad:
        raise UserError(f"unknown --what {bad}; choose from {', '.join(WHATS)}")
    if "epa" in whats and (not epa_kinds or set(epa_kinds) - {"epa", "mhsa"}):
        raise UserError(f"--epa-kinds must name epa and/or mhsa, got {list(epa_kinds)}")
    base = {"device": device, "threads": threads, "tune": tune}
    record: dict = {"machine": machine_info(device), "preset": preset, "amp": amp, "compile": compile_,
                    "checkpointing": checkpointing, "results": {}}
    record["machine"]["threads"] = threads
    res = record["results"]
    if "rates" in whats:
        res["rates"] = run_worker({**base, "kind": "rates", "kwargs": {"repeats": repeats}})
        echo("machine rates: " + ", ".join(f"{k} {v:.1f}" for k, v in res["rates"].items() if k.endswith("_s")))
    common = {"preset": preset, "amp": amp, "compile_": compile_, "patch": list(patch) if patch else None}
    if "forward" in whats:
        from .network import create_model
        from .network.analysis import count_macs

        # counted here, not in the worker, so that the worker's peak memory is the forward pass's own
        macs = count_macs(create_model(preset, **({"img_size": tuple(patch)} if patch else {})))[0]
        r = res["forward"] = run_worker({**base, "kind": "forward", "kwargs": {**common, "repeats": repeats}})
        r["macs"], r["gmacs_per_s"] = macs, macs / r["median_s"] / 1e9
        echo(f"forward  {preset} 1 x {'x'.join(map(str, r['patch']))}: median {r['median_s']:.3f} s, "
             f"{r['gmacs_per_s']:.1f} G MAC/s, peak {r['peak_memory_mb']:.0f} MB")
    if "train" in whats:
        r = res["train"] = run_worker({**base, "kind": "train", "kwargs": {
            **common, "repeats": max(2, repeats // 2), "checkpointing": checkpointing, "batch": train_batch}})
        echo(f"train    {preset} batch {train_batch}: median {r['median_s']:.3f} s, peak {r['peak_memory_mb']:.0f} MB")
    if "maxbatch" in whats:
        r = res["maxbatch"] = run_worker({**base, "kind": "maxbatch", "kwargs": {
            "preset": preset, "amp": amp if amp != "off" else "bf16", "checkpointing": checkpointing}})
        echo(f"maxbatch {preset}: {r['max_batch']} ({r['amp']})")
    if "epa" in whats:
        res["epa"] = _epa_scaling(base, epa_kinds, dims, tokens, repeats, epa_max_seconds, amp, echo, epa_rounds)
    if "sliding" in whats:
        rows = []
        for t in tta:
            for impl in ("unetrpp", "monai") if monai else ("unetrpp",):
                r = run_worker({**base, "kind": "sliding", "kwargs": {
                    "preset": preset, "volume": list(volume), "tta": t, "impl": impl, "amp": amp}})
                rows.append(r)
                echo(f"sliding  {impl:8s} {'x'.join(map(str, volume))} TTA {'on ' if t else 'off'}: "
                     f"{r['wall_s']:.1f} s, {r['windows_per_s']:.2f} windows/s, peak {r['peak_memory_mb']:.0f} MB")
        res["sliding"] = rows
    return record


def _epa_scaling(base: dict, kinds, dims, tokens, repeats: int, max_seconds: float, amp: str, echo,
                 rounds: int = 1) -> dict:
    """EPA against MHSA over (C, N); a point predicted to exceed ``max_seconds`` is skipped, not run.

    With ``rounds > 1`` the whole sweep is repeated and each point keeps its fastest round median:
    on a shared machine, a burst of outside load can slow every repeat of one point (seconds long),
    but rarely the same point in every round.
    """
    points: dict[tuple, dict] = {}
    skipped = []
    for rnd in range(rounds):
        for kind in kinds:
            for dim in dims:
                last = None
                for n in sorted(tokens):
                    key = (kind, dim, n)
                    if rnd and key not in points:
                        continue  # skipped in the first round
                    if not rnd and last is not None:  # predict with the worst-case growth (MHSA: quadratic)
                        predicted = last["median_s"] * (n / last["tokens"]) ** (2.0 if kind == "mhsa" else 1.0)
                        if predicted * (repeats + 1) > max_seconds * repeats:
                            skipped.append({"kind": kind, "dim": dim, "tokens": n, "predicted_s": predicted})
                            continue
                    r = run_worker({**base, "kind": "attention", "kwargs": {
                        "kind": kind, "dim": dim, "tokens": n, "repeats": repeats, "amp": amp}})
                    best = points.get(key)
                    history = (best["round_medians_s"] if best else []) + [r["median_s"]]
                    if best is None or r["median_s"] < best["median_s"]:
                        points[key] = best = r
                    best["round_medians_s"] = history
                    last = best
                    echo(f"{kind:4s} C={dim:3d} N={n:6d}: {r['median_s'] * 1e3:9.2f} ms, "
                         f"peak {r['peak_memory_mb']:.0f} MB" + (f" (round {rnd + 1})" if rounds > 1 else ""))
    rows = [points[k] for k in sorted(points)]
    exponents = {}
    for kind in kinds:
        for dim in dims:
            done = [r for r in rows if r["kind"] == kind and r["dim"] == dim]
            if len(done) >= 2:
                exponents[f"{kind}_C{dim}"] = fit_exponent([r["tokens"] for r in done], [r["median_s"] for r in done])
    for key, e in exponents.items():
        echo(f"growth exponent of time in N, {key}: {e:.2f}")
    return {"rows": rows, "skipped": skipped, "exponents": exponents, "rounds": rounds}


def plot_epa(epa: dict, out: str | os.PathLike) -> None:
    """Time against N (log-log) for EPA and MHSA at each C, exponents in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io.jsonio import atomic_write
    from .viz import figure_png

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dims = sorted({r["dim"] for r in epa["rows"]})
    colours = plt.get_cmap("viridis")([i / max(len(dims) - 1, 1) for i in range(len(dims))])
    for colour, dim in zip(colours, dims, strict=True):
        for kind, style in (("epa", "-o"), ("mhsa", "--s")):
            pts = [(r["tokens"], r["median_s"]) for r in epa["rows"] if r["kind"] == kind and r["dim"] == dim]
            if pts:
                e = epa["exponents"].get(f"{kind}_C{dim}")
                label = f"{kind.upper()} C={dim}" + (f" (N^{e:.2f})" if e is not None else "")
                ax.plot(*zip(*pts, strict=True), style, color=colour, label=label, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("forward time (s)")
    ax.set_title("EPA vs multi-head self-attention (SDPA), batch 1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    data = figure_png(fig, dpi=120, bbox_inches="tight")
    atomic_write(out, lambda f: f.write(data))


def print_summary(record: dict) -> None:
    m = record["machine"]
    print(f"machine: {m['cpu']} ({m['cpu_count']} CPUs){', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, "
          f"{m['threads']} threads; {m['date']}")
    res = record["results"]
    if "forward" in res and "rates" in res:
        conv = res["rates"].get("conv3d_16ch_64x128x128_gmacs_per_s")
        if conv:
            print(f"forward rate {res['forward']['gmacs_per_s']:.1f} G MAC/s = "
                  f"{100 * res['forward']['gmacs_per_s'] / conv:.0f} % of this machine's conv3d rate ({conv:.1f})")
    if "sliding" in res:
        by = {(r["impl"], r["tta"]): r["wall_s"] for r in res["sliding"]}
        for t in (False, True):
            if ("unetrpp", t) in by and ("monai", t) in by:
                print(f"sliding window, TTA {'on' if t else 'off'}: unetrpp / MONAI time = "
                      f"{by[('unetrpp', t)] / by[('monai', t)]:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unetrpp.bench")
    parser.add_argument("--worker", required=True)
    args = parser.parse_args(argv)
    print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
