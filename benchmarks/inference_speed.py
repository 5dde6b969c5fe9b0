"""Whole-volume prediction speed and memory at the synapse patch, TTA on and off.

    python benchmarks/inference_speed.py [--device cpu|cuda] [--shape 148 256 256] [--tta on off]
        [--batch N] [--json OUT.json]

A CT-like volume of ``shape`` voxels (soft tissue, air and bone in Hounsfield units) at the plans'
target spacing goes through ``Predictor.predict`` with the synapse preset (64 x 128 x 128 patch,
step 0.5): normalisation, crop, sliding window with Gaussian weighting, undo, arg-max. Each
configuration runs in a fresh process so its peak memory is its own. Reported: wall time,
windows per second (forward passes of one window, so TTA counts 8 per position), peak resident
memory (CPU) or peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from unetrpp import create_model
from unetrpp.inference import Predictor
from unetrpp.inference.sliding_window import window_grid
from unetrpp.runtime import tune_cpu_allocator
tune_cpu_allocator()
shape, device, tta, batch = tuple(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3] == "on", int(sys.argv[4])
from unetrpp.bench import CT_NORMALISATION, ct_like_volume, emit_result
image = ct_like_volume(shape)
spacing = (1.5, 0.76, 0.76)
plans = {"target_spacing": list(spacing), "channel_names": ["CT"], "labels": {}, "num_classes": 14,
         "normalization": [CT_NORMALISATION],
         "resampling": {"image_order": 3, "label_order": 1}}
torch.manual_seed(0)
model = create_model("synapse")
pred = Predictor(model, plans, device=device, tta=tta, batch=batch or None)
windows = len(window_grid(shape, (64, 128, 128), 0.5)) * (8 if tta else 1)
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
result = pred.predict(image.astype(np.float32), spacing=spacing)
if device == "cuda":
    torch.cuda.synchronize()
wall = time.perf_counter() - t
out = {"wall_s": wall, "window_passes": windows, "windows_per_s": windows / wall, "batch": pred.batch,
       "amp": pred.amp, "label_shape": list(result.label.shape),
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if device == "cuda":
    out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
emit_result(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=[148, 256, 256])
    ap.add_argument("--tta", nargs="+", default=["off", "on"], choices=("on", "off"))
    ap.add_argument("--batch", type=int, default=0, help="windows per forward pass (0: the predictor's default)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    from unetrpp.bench import ChildError, machine_info, run_child

    report = {"machine": machine_info(args.device), "device": args.device, "shape": args.shape,
              "patch": [64, 128, 128], "step": 0.5, "runs": {}}
    for tta in args.tta:
        try:
            r = run_child([sys.executable, "-c", CHILD, json.dumps(args.shape), args.device, tta, str(args.batch)],
                          f"TTA {tta}")
        except ChildError as e:
            raise SystemExit(str(e)) from None
        report["runs"][f"tta_{tta}"] = r
        mem = f"peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else f"peak RSS {r['peak_rss_mb']:.0f} MB"
        print(f"TTA {tta}: {r['wall_s']:.1f} s, {r['window_passes']} window passes, {r['windows_per_s']:.2f} "
              f"windows/s, {mem}", flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
