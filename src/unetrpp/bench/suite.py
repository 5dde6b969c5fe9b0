"""The driver of ``unetrpp bench``: the chosen measurements, one worker process each, in one record."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import UserError
from .harness import machine_info, run_worker

WHATS = ("rates", "forward", "train", "epa", "sliding", "maxbatch")
EPA_DIMS = (32, 64, 128, 256)
EPA_TOKENS = (4096, 8192, 16384, 32768, 65536)


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
        from ..network import create_model
        from ..network.analysis import count_macs

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

