"""Data loading against the training step for the synapse preset: is loading the bottleneck?

    python benchmarks/loader_throughput.py [--ct ../shared/data/abdomen_ct] [--batches 20] [--workers 0 1 2]

The real abdominal CT is resampled to a Synapse-like grid (1.5 x 0.76 x 0.76 mm, about
60 x 400 x 480 voxels, as the official preprocessed Synapse volumes) and stored four times as a
preprocessed dataset. Measured: augmented batches (2 x 64 x 128 x 128, the official augmentation,
one third foreground-forced) per second with 0 (main process), 1, 2, ... background workers, and
the synapse preset's training step (forward, Dice+CE with deep supervision, backward, SGD) on the
same machine. Loading keeps up when batches/s >= steps/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdomen_ct"
SPACING = (1.5, 0.76, 0.76)
PATCH = (64, 128, 128)


def _dataset(ct_dir: Path, out: Path) -> list[str]:
    import numpy as np

    from unetrpp.data.preprocess import class_locations, preprocess_array
    from unetrpp.io import read_image, write_json, write_npy

    image, geometry = read_image(ct_dir / "ct.nii.gz")
    label, _ = read_image(ct_dir / "label_btcv13.nii.gz")
    plans = {"target_spacing": list(SPACING), "num_classes": 14, "labels": {}, "channel_names": ["CT"],
             "normalization": [{"channel": "CT", "scheme": "ct", "clip": [-175.0, 250.0], "mean": 50.0,
                                "std": 60.0}],
             "resampling": {"image_order": 3, "label_order": 1}}  # fmt: skip
    data, seg, props = preprocess_array(image, geometry, plans, label.astype(np.uint8))
    names = [f"abd{i}" for i in range(4)]
    for n in names:
        write_npy(data, out / f"{n}.npy")
        write_npy(seg, out / f"{n}_seg.npy")
        write_npy(class_locations(seg, 0), out / f"{n}_locations.npy")
        write_json({**props.to_dict(), "name": n}, out / f"{n}.json")
    return names, list(data.shape[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", type=Path, default=DEFAULT)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from unetrpp import create_model
    from unetrpp.bench import recipe_step
    from unetrpp.runtime import tune_cpu_allocator
    from unetrpp.training.augment import AugmentConfig, dummy_2d_for
    from unetrpp.training.loader import BatchStream, batch_loader

    tune_cpu_allocator()
    from unetrpp.bench import machine_info

    report = {"machine": machine_info(), "patch": list(PATCH), "batch": 2, "loading": {}}
    with tempfile.TemporaryDirectory() as tmp:
        names, shape = _dataset(args.ct, Path(tmp))
        report["case_shape"] = shape
        aug = AugmentConfig(dummy_2d=dummy_2d_for(PATCH))
        for w in args.workers:
            stream = BatchStream(seed=0, folder=tmp, names=names, patch_size=PATCH, batch_size=2, augment=aug)
            loader = iter(batch_loader(stream, workers=w))
            next(loader)  # workers started, caches opened
            t = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            rate = args.batches / (time.perf_counter() - t)
            report["loading"][f"{w}_workers"] = {"batches_per_s": rate, "patches_per_s": 2 * rate}
            print(f"loading, {w} worker(s): {rate:.2f} batches/s ({2 * rate:.2f} patches/s)", flush=True)
            del loader

    model = create_model("synapse")
    x = torch.randn(2, 1, *PATCH)
    y = torch.randint(0, 14, (2, *PATCH))
    train_step = recipe_step(model, x, y)  # the trainer's step and optimizer
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        train_step()
        if i:
            times.append(time.perf_counter() - t)
    step = sum(times) / len(times)
    report["train_step_s"] = step
    report["steps_per_s"] = 1 / step
    print(f"training step (synapse, batch 2, {PATCH}): {step:.2f} s = {1 / step:.3f} steps/s")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
