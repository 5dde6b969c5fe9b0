"""Can a small UNETR++ learn the phantom? A short CPU training on phantom patches, pseudo-Dice on held-out cases.

    python benchmarks/phantom_learnability.py [--minutes 6] [--cases 16] [--threads 2]

Writes a phantom dataset, plans and preprocesses it, then trains a reduced UNETR++ (feature size
8, patch 32 x 64 x 64, deep supervision, Dice + CE, SGD Nesterov 1e-2 with poly decay, the
official augmentation) with the patch sampler for the given wall time, and reports the Dice per
organ over foreground-centred patches of held-out cases (no sliding window: that belongs to the
predictor). A stand-in until the trainer and the demo exist; they supersede it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from unetrpp import create_model
    from unetrpp.data.phantom import PHANTOM_ORGANS, make_phantom_dataset
    from unetrpp.data.plan import plan_dataset
    from unetrpp.data.preprocess import preprocess_dataset
    from unetrpp.training.augment import AugmentConfig
    from unetrpp.training.loss import DeepSupervisionLoss, DiceCELoss
    from unetrpp.training.sampler import PatchSampler

    patch = (32, 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phantom"
        t0 = time.perf_counter()
        make_phantom_dataset(root, cases=args.cases, seed=0, workers=2)
        plans = plan_dataset(root, patch_size=patch, workers=2)
        preprocess_dataset(root, workers=2)
        prep_s = time.perf_counter() - t0
        names = sorted(p.name[:-5] for p in (root / "preprocessed").glob("phantom_*.json"))
        val, train = names[:3], names[3:]
        sampler = PatchSampler(root / "preprocessed", train, patch, 2, AugmentConfig(), seed=0)
        net = create_model("synapse", img_size=patch, feature_size=8, out_channels=plans["num_classes"],
                           proj_size=(32, 32, 32, 16), decoder_proj_size=32)  # fmt: skip
        loss_fn = DeepSupervisionLoss(DiceCELoss(batch_dice=True))
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        budget = args.minutes * 60
        t0, step, losses = time.perf_counter(), 0, []
        while time.perf_counter() - t0 < budget:
            frac = (time.perf_counter() - t0) / budget
            for g in opt.param_groups:
                g["lr"] = 1e-2 * (1 - frac) ** 0.9
            x, y = sampler.batch()
            out = net(torch.from_numpy(x))
            loss = loss_fn(out, torch.from_numpy(y.astype(np.int64)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        train_s = time.perf_counter() - t0
        net.eval()
        net.deep_supervision = False
        evals = PatchSampler(root / "preprocessed", val, patch, 1, AugmentConfig.off(), oversample_foreground=1.0,
                             seed=1)  # fmt: skip
        inter, total = {}, {}
        with torch.no_grad():
            for _ in range(30):
                x, y = evals.batch()
                pred = net(torch.from_numpy(x)).argmax(1).numpy()
                for organ, v in PHANTOM_ORGANS.items():
                    inter[organ] = inter.get(organ, 0) + 2 * np.sum((pred == v) & (y == v))
                    total[organ] = total.get(organ, 0) + np.sum(pred == v) + np.sum(y == v)
    dice = {k: round(float(inter[k] / total[k]), 3) if total[k] else None for k in PHANTOM_ORGANS}
    result = {
        "steps": step, "train_s": round(train_s, 1), "prep_s": round(prep_s, 1),
        "loss_first_10": round(float(np.mean(losses[:10])), 3), "loss_last_10": round(float(np.mean(losses[-10:])), 3),
        "pseudo_dice": dice, "mean_pseudo_dice": round(float(np.mean([v for v in dice.values() if v is not None])), 3),
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
