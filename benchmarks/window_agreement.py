"""Do overlapping windows agree? The unmirrored labels of neighbouring sliding windows, on the voxels they share.

    python benchmarks/window_agreement.py [--work /tmp/unetrpp-own-data] [--sets ct_self,hippocampus] [--cases 12]

For each case, every pair of the exact protocol's windows (step 0.5) that differ along one axis only is run
through the network once, unmirrored, and their arg-max labels are compared on the region both cover:
how many voxels differ, of the voxels either calls foreground. Networks: those ``benchmarks/own_data.py``
trained (``ct_self`` on the real CT of ../shared/data, ``hippocampus`` on its held-out MRIs). This is the
test a shortcut that moves mirrored windows would need to pass to be safe (docs/benchmarks.md, issue 18).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared" / "data"


def main() -> None:
    import numpy as np
    import torch

    from unetrpp.data.preprocess import preprocess_array
    from unetrpp.inference.predictor import Predictor
    from unetrpp.inference.sliding_window import _pad_to, window_grid
    from unetrpp.io import read_case

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/unetrpp-own-data"))
    ap.add_argument("--sets", default="ct_self,hippocampus")
    ap.add_argument("--cases", type=int, default=12)
    args = ap.parse_args()
    report = {}
    for name in args.sets.split(","):
        ckpt = args.work / name / "results" / "unetrpp_fold0" / "checkpoint_final.pt"
        if not ckpt.exists():
            raise SystemExit(f"{ckpt}: not there; run benchmarks/own_data.py first")
        pred = Predictor.from_checkpoint(ckpt, device="cpu")
        net = pred.model
        net.deep_supervision = False
        patch = pred.patch_size
        images = ([SHARED / "abdomen_ct" / "ct.nii.gz"] if name == "ct_self"
                  else sorted((args.work / name / "imagesTs").glob("*_0000.nii.gz"))[: args.cases])
        fractions = []
        for path in images:
            data, geometry = read_case([path])
            pre, _, _ = preprocess_array(data, geometry, pred.plans)
            x, _ = _pad_to(torch.from_numpy(np.asarray(pre, np.float32)), patch)
            labels = {}
            with torch.inference_mode():
                for st in window_grid(tuple(x.shape[1:]), patch, 0.5):
                    box = tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True))
                    labels[st] = net(x[(slice(None), *box)][None])[0].argmax(0)
            pairs = []
            for a, b in itertools.combinations(labels, 2):
                axes = [i for i in range(3) if a[i] != b[i]]
                if len(axes) != 1:
                    continue
                lo = [max(a[i], b[i]) for i in range(3)]
                hi = [min(a[i], b[i]) + patch[i] for i in range(3)]
                la = labels[a][tuple(slice(lo[i] - a[i], hi[i] - a[i]) for i in range(3))]
                lb = labels[b][tuple(slice(lo[i] - b[i], hi[i] - b[i]) for i in range(3))]
                foreground = int(((la > 0) | (lb > 0)).sum())
                differ = int((la != lb).sum())
                fractions.append(differ / max(foreground, 1))
                pairs.append(f"axis {axes[0]}, {abs(a[axes[0]] - b[axes[0]])} of {patch[axes[0]]} voxels apart: "
                             f"{differ} of {foreground} foreground voxels differ ({differ / max(foreground, 1):.1%})")
            print(f"{name} {path.name} {tuple(x.shape[1:])}: " + "; ".join(pairs or ["one window"]), flush=True)
        if fractions:
            report[name] = {"pairs": len(fractions), "min": min(fractions), "median": float(np.median(fractions)),
                            "max": max(fractions)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
