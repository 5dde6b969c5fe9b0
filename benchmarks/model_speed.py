"""Forward latency and training step of a preset: unetrpp against the official-structured baseline.

    python benchmarks/model_speed.py --preset synapse --threads 2

Each measurement runs in its own process (so its peak RSS is its own): median of ``--repeats``
timed runs after one warm-up. Forward: eval, batch 1, no grad. Training step: batch 2, SGD
(Nesterov, momentum 0.99, weight decay 3e-5), Dice + CE with deep supervision, gradient clipping
at 12. The baseline (``official_style.py``) reproduces the official digests to ~1e-6, so it stands
in for the official code on this machine. The machine's own conv3d and matmul rates are measured
too, to put the multiply-add rate in context.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _build(impl: str, preset: str):
    from unetrpp.network import create_model, get_preset

    if impl == "unetrpp":
        return create_model(preset)
    sys.path.insert(0, str(HERE))
    from official_style import OfficialStyleUNETRPP

    return OfficialStyleUNETRPP(get_preset(preset).config())


def worker(impl: str, what: str, preset: str, threads: int, repeats: int, tune: bool) -> dict:
    import torch

    from unetrpp.bench import median_time, recipe_step
    from unetrpp.runtime import tune_cpu_allocator

    tuned = tune_cpu_allocator() if tune else False
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _build(impl, preset)
    from unetrpp.network import get_preset

    cfg = get_preset(preset).config()
    if what == "forward":
        model.eval()
        x = torch.randn(1, cfg.in_channels, *cfg.img_size)

        def step():
            with torch.inference_mode():
                model(x)
    else:
        x = torch.randn(2, cfg.in_channels, *cfg.img_size)
        y = torch.randint(0, cfg.out_channels, (2, *cfg.img_size))
        step = recipe_step(model, x, y)  # the trainer's step and optimizer

    median, times = median_time(step, repeats)
    return {"impl": impl, "what": what, "median_s": median, "times_s": times,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "allocator_tuned": tuned}


def machine_rates(threads: int) -> dict:
    """GMAC/s of a plain conv3d (16 channels at 64 x 128 x 128, 32 at 32^3) and a 2048^2 matmul."""
    import torch

    from unetrpp.bench import bench_rates

    torch.set_num_threads(threads)
    return bench_rates(torch.device("cpu"), 5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="synapse")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--what", default="forward,train")
    parser.add_argument("--impl", default="unetrpp,official-style")
    parser.add_argument("--no-tune", action="store_true", help="leave glibc's allocator as it is")
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from unetrpp.bench import ChildError, emit_result, run_child

    if args.worker:
        impl, what = args.worker
        emit_result(worker(impl, what, args.preset, args.threads, args.repeats, not args.no_tune))
        return 0


    from unetrpp.network import create_model
    from unetrpp.network.analysis import count_macs

    macs, _, _ = count_macs(create_model(args.preset))
    results = []
    for impl in args.impl.split(","):
        for what in args.what.split(","):
            repeats = args.repeats if what == "forward" else max(2, args.repeats // 2)
            cmd = [sys.executable, __file__, "--worker", impl, what, "--preset", args.preset,
                   "--threads", str(args.threads), "--repeats", str(repeats)] + (["--no-tune"] * args.no_tune)
            try:
                res = run_child(cmd, f"{impl} {what}")
            except ChildError as e:
                raise SystemExit(str(e)) from None
            if what == "forward":
                res["gmacs_per_s"] = macs / res["median_s"] / 1e9
            results.append(res)
            print(f"{impl:15s} {what:8s} median {res['median_s']:7.3f} s   peak RSS {res['peak_rss_gb']:5.2f} GB"
                  + (f"   {res['gmacs_per_s']:5.1f} G MAC/s" if what == "forward" else ""), flush=True)
    rates = machine_rates(args.threads)
    print("machine: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    from unetrpp.bench import machine_info

    record = {"preset": args.preset, "threads": args.threads, "macs": macs, "results": results, "machine_rates": rates,
              "machine": machine_info()}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
