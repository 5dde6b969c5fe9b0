"""Whole-volume prediction: the exact protocol, MONAI's driver and our shortcuts, on real scans.

    python benchmarks/fast_predict.py [--work /tmp/unetrpp-own-data]
        [--sets ct,ct_fine,hippocampus] [--methods exact,monai,default] [--repeats 2] [--cases N] [--json OUT.json]

Networks: the ones ``benchmarks/own_data.py`` trained with the README's commands: for the real CT
of ../shared/data/abdomen_ct the phantom network (``ct``, 4.95 x 2.76 x 2.76 mm) and the finer
phantom network (``ct_fine``, 2.5 x 1.4 x 1.4 mm), and ``ct_self``, the network own_data.py trains on
sub-volumes of that very scan (the phantom networks do not segment the real CT, so only ``ct_self``
shows Dice on it); ``phantom`` and ``phantom_fine``: the phantom networks on their own held-out
phantom CTs (whole abdomens, larger than the real crop); the hippocampus network for the 52 held-out
hippocampus MRIs (``hippocampus``). Every method predicts every case with mirroring (8 flips), through
``Predictor`` (reading, preprocessing, sliding window, restoring to the input grid), in a process
of its own (its peak memory is its own); the methods are interleaved, ``--repeats`` rounds. Only
the sliding window differs:

* ``exact``: our driver with every shortcut off (``predict --exact``), the official protocol;
* ``monai``: ``monai.inferers.sliding_window_inference`` (Gaussian, sigma 1/8, overlap 0.5) run on
  the volume and on its 7 flips, softmax probabilities averaged;
* ``default``: what ``predict`` does with no flags; ``margin=M`` (``predict --mirror-margin M``: the
  driver's own windows, mirrored if they hold a voxel with a margin below M), ``margin=M/STEP``
  (``--mirror-margin M --mirror-step STEP``) and ``constant``: other settings of the shortcuts.
  ``METHOD@B`` runs B network passes per forward call (``monai@B``: B windows per call, MONAI's
  ``sw_batch_size``; default 2).

Reported per method: seconds (median over rounds, and per case), network passes, peak resident
memory, Dice per class against the reference labels and against the exact protocol's labels, and
for ``exact`` where the time goes (network passes, the rest of the sliding window, restoring,
preprocessing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared" / "data"


def _cases(name: str, work: Path, limit: int | None, models: dict | None = None):
    """``(model, [(case, image, reference)])`` of a set; ``models`` overrides a set's checkpoint."""
    models = models or {}
    if name in ("ct", "ct_fine", "ct_self"):
        # the phantom network at its spacing, the one of the finer phantom set, or the network trained on
        # sub-volumes of this very scan (own_data.py's ct_self: it segments it, so Dice can be compared)
        folder = {"ct": "phantom", "ct_fine": "phantom_fine", "ct_self": "ct_self"}[name]
        model = work / folder / "results" / "unetrpp_fold0" / "checkpoint_final.pt"
        cases = [("abdomen_ct", SHARED / "abdomen_ct" / "ct.nii.gz", SHARED / "abdomen_ct" / "label_btcv13.nii.gz")]
    elif name in ("hippocampus", "hippocampus_5mm", "phantom", "phantom_fine"):
        root = work / name
        model = root / "results" / "unetrpp_fold0" / "checkpoint_final.pt"
        cases = [(f.name[: -len("_0000.nii.gz")], f, root / "labelsTs" / f.name.replace("_0000", ""))
                 for f in sorted((root / "imagesTs").glob("*_0000.nii.gz"))]
    else:
        raise SystemExit(f"unknown set {name!r}")
    model = Path(models.get(name, model))
    if not model.exists():
        raise SystemExit(f"{model}: not there; run benchmarks/own_data.py (it trains the networks used here)")
    return model, cases[:limit] if limit else cases


def _monai_probabilities(predictor, data, batch: int):
    """The same network, flips and Gaussian blending of each window's softmax, driven by MONAI's
    sliding_window_inference (on the volume padded to the patch, as our driver pads it)."""
    import numpy as np
    import torch

    from unetrpp.bench import monai_sliding_probabilities
    from unetrpp.inference.sliding_window import _pad_to

    x, region = _pad_to(torch.from_numpy(np.asarray(data, np.float32)), predictor.patch_size)
    if hasattr(predictor.model, "deep_supervision"):
        predictor.model.deep_supervision = False  # the full-resolution head only, as our driver runs it
    probs = monai_sliding_probabilities(predictor.model, x[None], predictor.patch_size, batch, step=0.5,
                                        flips=8, device=x.device, softmax_windows=True)
    return probs[(slice(None), *region)]


def child(args) -> None:
    """One method over every case of one set; prints ``RESULT {json}``."""
    import resource

    import numpy as np
    import torch

    from unetrpp.bench import emit_result
    from unetrpp.inference.predictor import Predictor
    from unetrpp.inference.sliding_window import DEFAULT_SHORTCUTS, EXACT, Shortcuts
    from unetrpp.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    model, cases = _cases(args.set, args.work, args.cases, _models(args))
    method, _, batch = args.child.partition("@")  # METHOD@B: B windows per forward pass
    if method.startswith("margin="):  # margin=M or margin=M/STEP
        m, _, st = method.split("=")[1].partition("/")
        if st in ("", "grid"):  # the driver's own windows, each mirrored if any unsure voxel lies in it
            shortcuts = Shortcuts(constant_windows=True, mirror_margin=float(m), mirror_step=None, mirror_weight=0.0)
        else:  # as predict --mirror-margin M --mirror-step STEP
            shortcuts = Shortcuts(constant_windows=True, mirror_margin=float(m), mirror_step=float(st),
                                  mirror_weight=0.05)
    else:
        shortcuts = {"exact": EXACT, "monai": EXACT, "default": DEFAULT_SHORTCUTS,
                     "constant": Shortcuts(constant_windows=True, mirror_margin=None)}[method]
    pred = Predictor.from_checkpoint(model, device="cpu", tta=True, shortcuts=shortcuts,
                                     batch=int(batch) if batch else None)
    clock = {"network": 0.0, "sliding": 0.0, "restore": 0.0, "preprocess": 0.0, "read": 0.0, "write": 0.0}
    inner = pred.model.forward

    def timed_network(x):
        t = time.perf_counter()
        out = inner(x)
        clock["network"] += time.perf_counter() - t
        return out

    pred.model.forward = timed_network  # every pass of every driver goes through the module's forward
    if method == "monai":
        # MONAI's windows per call: B of monai@B, else 2 (our exact driver's default on a CPU)
        pred.probabilities_preprocessed = lambda data: _monai_probabilities(pred, data, int(batch) if batch else 2)
    from unetrpp.data.preprocess import preprocess_array
    from unetrpp.data.restore import restore_label_from_probabilities
    from unetrpp.io import read_case, write_image

    out_dir = Path(args.out) / args.child
    out_dir.mkdir(parents=True, exist_ok=True)
    per_case, passes, windows, constant, mirrored, background, voxels = [], 0, 0, 0, 0, 0, 0
    t_all = time.perf_counter()
    for name, image, _ in cases:
        t0 = time.perf_counter()
        data, geometry = read_case([image])
        t1 = time.perf_counter()
        pre, _, props = preprocess_array(data, geometry, pred.plans)
        t2 = time.perf_counter()
        probs = pred.probabilities_preprocessed(pre)
        t3 = time.perf_counter()
        label = restore_label_from_probabilities(probs, props)
        t4 = time.perf_counter()
        clock["read"] += t1 - t0
        clock["preprocess"] += t2 - t1
        clock["sliding"] += t3 - t2
        clock["restore"] += t4 - t3
        per_case.append(t4 - t0)
        passes += pred.stats.get("passes", 0)
        windows += pred.stats.get("windows", 0)
        constant += pred.stats.get("constant", 0)
        mirrored += pred.stats.get("mirrored_windows", 0)
        background += pred.stats.get("background", 0)
        voxels += pred.stats.get("voxels", 0)
        t5 = time.perf_counter()
        write_image(label, geometry, out_dir / f"{name}.nii.gz")
        clock["write"] += time.perf_counter() - t5
        np.save(out_dir / f"{name}.npy", label)
    wall = time.perf_counter() - t_all
    emit_result({
        "seconds": wall, "per_case_s": per_case, "clock": clock, "passes": passes, "windows": windows,
        "constant_windows": constant, "mirrored_windows": mirrored, "sure_background_voxels": background,
        "voxels": voxels,
        "threads": torch.get_num_threads(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "shortcuts": shortcuts.describe() if method != "monai" else "MONAI sliding_window_inference x 8 flips"})


def _dice(a, b, value) -> float | None:
    import numpy as np

    x, y = a == value, b == value
    s = int(x.sum()) + int(y.sum())
    return None if s == 0 else 2.0 * int(np.logical_and(x, y).sum()) / s


def _models(args) -> dict:
    return dict(m.split("=", 1) for m in args.model) if args.model else {}


def score(set_name: str, work: Path, limit: int | None, out: Path, methods: list[str], models: dict) -> dict:
    """Per class: mean Dice against the reference and against the exact protocol's labels."""
    import numpy as np

    from unetrpp.checkpoint import load_checkpoint
    from unetrpp.io import read_image

    model, cases = _cases(set_name, work, limit, models)
    labels = {k: int(v) for k, v in load_checkpoint(model)["plans"]["labels"].items() if int(v)}
    result = {}
    refs = {name: read_image(ref)[0].astype(np.int64) for name, _, ref in cases}
    for m in methods:
        per_ref: dict[str, list] = {k: [] for k in labels}
        per_exact: dict[str, list] = {k: [] for k in labels}
        changed = 0
        for name, _, _ in cases:
            lab = np.load(out / m / f"{name}.npy").astype(np.int64)
            exact = np.load(out / "exact" / f"{name}.npy").astype(np.int64)
            changed += int((lab != exact).sum())
            for k, v in labels.items():
                if (refs[name] == v).any():
                    per_ref[k].append(_dice(lab, refs[name], v) or 0.0)
                d = _dice(lab, exact, v)
                if d is not None:
                    per_exact[k].append(d)
        result[m] = {"dice_vs_reference": {k: float(np.mean(v)) for k, v in per_ref.items() if v},
                     "dice_vs_exact": {k: float(np.mean(v)) for k, v in per_exact.items() if v},
                     "voxels_changed_vs_exact": changed}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/unetrpp-own-data"))
    ap.add_argument("--sets", default="ct,ct_fine,hippocampus")
    ap.add_argument("--methods", default="exact,monai,default")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", type=int, help="only the first N cases of each set")
    ap.add_argument("--out", type=Path, default=Path("/tmp/unetrpp-fast-predict"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", action="append", metavar="SET=CHECKPOINT", help="another checkpoint for a set")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--set", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from unetrpp.bench import ChildError, run_child

    methods = args.methods.split(",")
    if "exact" not in methods:
        methods.insert(0, "exact")
    from unetrpp.bench import machine_info

    report = {"machine": machine_info(), "sets": {}}
    for set_name in args.sets.split(","):
        runs: dict[str, list] = {m: [] for m in methods}
        out = args.out / set_name
        for r in range(args.repeats):
            for m in methods:  # interleaved
                cmd = [sys.executable, str(HERE), "--child", m, "--set", set_name, "--work", str(args.work),
                       "--out", str(out)] + (["--cases", str(args.cases)] if args.cases else [])
                cmd += [f"--model={v}" for v in args.model or []]
                try:
                    res = run_child(cmd, f"{set_name} {m}")
                except ChildError as e:
                    raise SystemExit(str(e)) from None
                runs[m].append(res)
                print(f"{set_name} round {r} {m}: {res['seconds']:.1f} s, {res['passes']} passes, "
                      f"{res['peak_rss_mb']:.0f} MB", flush=True)
        scores = score(set_name, args.work, args.cases, out, methods, _models(args))
        entry = {}
        for m in methods:
            secs = [x["seconds"] for x in runs[m]]
            entry[m] = {"seconds_median": statistics.median(secs), "seconds": secs, "passes": runs[m][0]["passes"],
                        "windows": runs[m][0]["windows"], "constant_windows": runs[m][0]["constant_windows"],
                        "mirrored_windows": runs[m][0]["mirrored_windows"],
                        "sure_background_voxels": runs[m][0]["sure_background_voxels"], "voxels": runs[m][0]["voxels"],
                        "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[m]),
                        "clock": runs[m][0]["clock"], "shortcuts": runs[m][0]["shortcuts"], **scores[m]}
        ref_exact = entry["exact"]["dice_vs_reference"]
        for m in methods:  # the target: within 0.002 of the exact protocol's Dice, class by class
            entry[m]["max_abs_dice_change"] = max(
                (abs(v - ref_exact[k]) for k, v in entry[m]["dice_vs_reference"].items()), default=0.0)
        if "monai" in entry:
            for m in methods:
                entry[m]["time_vs_monai"] = entry[m]["seconds_median"] / entry["monai"]["seconds_median"]
        report["sets"][set_name] = entry
        print(json.dumps({set_name: entry}, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
