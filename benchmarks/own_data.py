"""A user's own data and compute: the README's commands, no flags, against MONAI's BasicUNet in the same budget.

    python benchmarks/own_data.py [--sets hippocampus,hippocampus_5mm,phantom,phantom_fine] [--minutes 15]
        [--work DIR] [--skip-baseline] [--baseline-tta on|off] [--reuse] [--json OUT.json]

For each dataset a held-out test set (every fifth case by sorted name) is moved to imagesTs /
labelsTs, then exactly these commands run, each timed:

    unetrpp plan D
    unetrpp preprocess D
    unetrpp train D --time-budget MIN --device cpu
    unetrpp predict -i D/imagesTs -o D/pred -m D/results/unetrpp_fold0/checkpoint_final.pt
    unetrpp evaluate D/labelsTs D/pred

The baseline is MONAI's BasicUNet (default features) trained by the same trainer, on the same
preprocessed data and fold, at our patch rounded up to multiples of 16 (it pools four times), with
the same optimizer and lr, for the whole budget, then predicted whole (sliding window, mirroring)
and scored the same way.

Datasets (made here, nothing downloaded):
* ``hippocampus``: MSD Task04 from ../shared/data/hippocampus (260 T1 MRIs, 1 mm).
* ``hippocampus_5mm``: the same resampled to 5 mm slices along the first array axis (cubic for
  the images, per-class linear masks for the labels): a strongly anisotropic MRI set, 7-9 slices per case.
* ``phantom``: 40 + 10 portal-venous phantom CTs at their own spacing (about 5 x 2.8 x 2.8 mm).
* ``phantom_fine``: the same cases resampled to 2.5 x 1.4 x 1.4 mm (8x the voxels).
* ``ct_self``: the real CT of ../shared/data/abdomen_ct (3 mm, TotalSegmentator labels). Its
  8 training cases are overlapping sub-volumes of that scan (two halves along each axis), its
  test case the whole scan: a network that has seen this patient, made to measure how the
  prediction protocols (issue 18) differ on a real CT, not how well a model generalises.

MONAI is a benchmark-only dependency: ``pip install --no-deps monai``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared" / "data"
CLI = [sys.executable, "-m", "unetrpp.cli.main"]


def _hold_out(root: Path, every: int = 5) -> None:
    """Move every ``every``-th case (sorted names) to imagesTs/labelsTs; fix numTraining; new splits."""
    from unetrpp.data.layout import Dataset

    ds = Dataset.open(root)
    names = sorted(c.name for c in ds.training_cases())
    (root / "imagesTs").mkdir(exist_ok=True)
    (root / "labelsTs").mkdir(exist_ok=True)
    ending = ds.file_ending
    for name in names[::every]:
        for f in (root / "imagesTr").glob(f"{name}_[0-9][0-9][0-9][0-9]{ending}"):
            f.rename(root / "imagesTs" / f.name)
        (root / "labelsTr" / f"{name}{ending}").rename(root / "labelsTs" / f"{name}{ending}")
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = len(names) - len(names[::every])
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    (root / "splits.json").unlink(missing_ok=True)


def _resampled_copy(src: Path, dst: Path, spacing_zyx) -> Path:
    """``src`` (a v2 dataset) resampled to ``spacing_zyx``: images cubic, labels as per-class masks, same origin."""
    import numpy as np

    from unetrpp.data.resample import new_shape_for, resample_image, resample_label
    from unetrpp.io import read_image, write_image

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.nii.gz", "preprocessed", "results", "*.json"))
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    for folder in ("imagesTr", "imagesTs"):
        for f in sorted((src / folder).glob("*.nii.gz")):
            img, g = read_image(f)
            shape = new_shape_for(img.shape, g.spacing_zyx, spacing_zyx)
            out = resample_image(img[None].astype(np.float32), shape, 3, None)[0]
            write_image(out.astype(np.float32), g.with_spacing_zyx(spacing_zyx), dst / folder / f.name)
            lab_dir = "labelsTr" if folder == "imagesTr" else "labelsTs"
            lab_file = src / lab_dir / (f.name[: -len("_0000.nii.gz")] + ".nii.gz")
            lab, lg = read_image(lab_file)
            seg = resample_label(lab.astype(np.uint8), shape, None, 1)
            write_image(seg.astype(np.uint8), lg.with_spacing_zyx(spacing_zyx), dst / lab_dir / lab_file.name)
    return dst


def make_set(name: str, work: Path) -> Path:
    from unetrpp.data.convert import convert_msd
    from unetrpp.data.phantom import make_phantom_dataset

    root = work / name
    if (root / "dataset.json").exists():
        return root
    if name.startswith("hippocampus"):
        base = work / "hippocampus"
        if not (base / "dataset.json").exists():
            if not (SHARED / "hippocampus" / "dataset.json").exists():
                raise SystemExit(f"{SHARED / 'hippocampus'}: not there (this benchmark reads ../shared/data)")
            convert_msd(SHARED / "hippocampus", base, workers=2)
            _hold_out(base)
        if name == "hippocampus_5mm":
            _resampled_copy(base, root, (5.0, 1.0, 1.0))
    elif name.startswith("phantom"):
        base = work / "phantom"
        if not (base / "dataset.json").exists():
            make_phantom_dataset(base, cases=40, test=10, seed=7, workers=2, contrast=True)
        if name == "phantom_fine":
            _resampled_copy(base, root, (2.5, 1.4, 1.4))
    elif name == "ct_self":
        _ct_self(root)
    else:
        raise SystemExit(f"unknown set {name!r}")
    return root


def _ct_self(root: Path) -> None:
    import SimpleITK as sitk

    src = SHARED / "abdomen_ct"
    if not (src / "ct.nii.gz").exists():
        raise SystemExit(f"{src}: not there (this benchmark reads ../shared/data)")
    img = sitk.ReadImage(str(src / "ct.nii.gz"))
    lab = sitk.ReadImage(str(src / "label_btcv13.nii.gz"))
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # overlapping halves along x, y and z (ITK index order), each about 3/4 of the axis
    size = img.GetSize()
    halves = [((0, s - s // 4), (s // 4, s)) for s in size]
    n = 0
    for xs in halves[0]:
        for ys in halves[1]:
            for zs in halves[2]:
                sl = (slice(*xs), slice(*ys), slice(*zs))
                sitk.WriteImage(img[sl], str(root / "imagesTr" / f"ctself_{n:03d}_0000.nii.gz"))
                sitk.WriteImage(lab[sl], str(root / "labelsTr" / f"ctself_{n:03d}.nii.gz"))
                n += 1
    shutil.copy(src / "ct.nii.gz", root / "imagesTs" / "ctself_100_0000.nii.gz")
    shutil.copy(src / "label_btcv13.nii.gz", root / "labelsTs" / "ctself_100.nii.gz")
    from unetrpp.data.convert import BTCV_LABELS

    meta = {"channel_names": {"0": "CT"}, "labels": BTCV_LABELS, "numTraining": n,
            "file_ending": ".nii.gz", "name": "ct_self",
            "description": "sub-volumes of the real abdominal CT of ../shared/data/abdomen_ct (training) and "
                           "the whole scan (test)"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def _run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("a") as f:
        f.write("$ unetrpp " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(CLI + cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"unetrpp {' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t


def ours(root: Path, minutes: float) -> dict:
    log = root / "commands.log"
    times = {
        "plan": _run(["plan", str(root)], log),
        "preprocess": _run(["preprocess", str(root)], log),
        "train": _run(["train", str(root), "--time-budget", f"{minutes:g}", "--device", "cpu"], log),
    }
    run = root / "results" / "unetrpp_fold0"
    times["predict"] = _run(["predict", "-i", str(root / "imagesTs"), "-o", str(root / "pred"), "-m",
                             str(run / "checkpoint_final.pt")], log)
    times["evaluate"] = _run(["evaluate", str(root / "labelsTs"), str(root / "pred")], log)
    ev = json.loads((root / "pred" / "evaluation.json").read_text())
    cfg = json.loads((run / "train_config.json").read_text())
    import torch

    hist = torch.load(run / "checkpoint_final.pt", weights_only=True)["history"]
    plans = json.loads((run / "plans.json").read_text())
    return {"mean_dice": ev["mean_dice"], "per_class": {k: v["dice"] for k, v in ev["mean"].items()},
            "seconds": times, "iterations": sum(h["iterations"] for h in hist),
            "recipe": cfg["recipe"], "recipe_notes": cfg["recipe_notes"], "patch": plans["patch_size"],
            "network": {k: plans["network"][k] for k in ("feature_size", "stem_stride", "img_size")}}


def baseline(root: Path, minutes: float, recipe: dict, tta: bool = True) -> dict:
    """BasicUNet in the same trainer, same fold, patch and recipe as our run chose; predicted and scored alike."""
    import torch
    from monai.networks.nets import BasicUNet

    from unetrpp.evaluation.evaluate import evaluate_pairs
    from unetrpp.inference.predictor import Predictor
    from unetrpp.io import write_image
    from unetrpp.training.config import TrainConfig
    from unetrpp.training.trainer import Trainer

    class Net(torch.nn.Module):
        def __init__(self, cin, cout, patch):
            super().__init__()
            self.net = BasicUNet(spatial_dims=3, in_channels=cin, out_channels=cout)
            self.config = SimpleNamespace(img_size=tuple(patch), in_channels=cin, out_channels=cout)

        def forward(self, x):
            return self.net(x)

    class BaselineTrainer(Trainer):
        def build_model(self):
            return Net(self.model_config["in_channels"], self.model_config["out_channels"], self.patch)

    out = root / "results" / "basicunet_fold0"
    t0 = time.perf_counter()
    # BasicUNet pools 4 times on every axis: its patch is ours rounded up to multiples of 16
    patch = [-(-p // 16) * 16 for p in recipe["patch"]]
    cfg = TrainConfig(recipe="short", optimizer="adamw", lr=3e-3, patch_size=patch,
                      iters_per_epoch=50, val_iters=5, time_budget_min=minutes, final_validation=False,
                      device="cpu", model_overrides={"feature_size": recipe["network"]["feature_size"]})
    trainer = BaselineTrainer(root, cfg, out_dir=out, progress=False, echo=False)
    trainer._plan_budget = lambda ckpt: _fixed_budget(trainer, minutes)  # no UNETR++ probing for another network
    summary = trainer.run()
    train_s = time.perf_counter() - t0
    model = trainer.build_model()
    ckpt = torch.load(out / "checkpoint_final.pt", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    predictor = Predictor(model, trainer.run_plans(), device="cpu", tta=tta)
    pred = root / "pred_basicunet"
    pairs = []
    t1 = time.perf_counter()
    for f in sorted((root / "imagesTs").glob("*_0000.nii.gz")):
        name = f.name[: -len("_0000.nii.gz")]
        res = predictor.predict(f)
        write_image(res.label, res.geometry, pred / f"{name}.nii.gz")
        pairs.append((name, root / "labelsTs" / f"{name}.nii.gz", pred / f"{name}.nii.gz"))
    labels = {k: [v] for k, v in trainer.ds.labels.items() if v}
    ev = evaluate_pairs(pairs, labels, workers=2)
    return {"mean_dice": ev["mean_dice"], "per_class": {k: v["dice"] for k, v in ev["mean"].items()},
            "seconds": {"train": train_s, "predict": time.perf_counter() - t1}, "iterations": summary["iterations"],
            "params": sum(p.numel() for p in model.parameters()), "tta": tta}


def _fixed_budget(trainer, minutes: float) -> None:
    trainer._deadline = trainer._t0 + 60 * minutes
    trainer._train_deadline = trainer._deadline - 5.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="hippocampus,hippocampus_5mm,phantom,phantom_fine",
                    help="comma-separated; also ct_self (see above)")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/unetrpp-own-data"))
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--baseline-tta", choices=("on", "off"), default="on",
                    help="mirroring when predicting with the baseline (off: 8x faster; BasicUNet is slow on a CPU)")
    ap.add_argument("--reuse", action="store_true", help="take our run's figures from DATASET/ours.json if there")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    from unetrpp.bench import machine_info

    report = {"machine": machine_info(), "minutes": args.minutes, "sets": {}}
    for name in args.sets.split(","):
        root = make_set(name, args.work)
        saved = root / "ours.json"
        entry = {"ours": json.loads(saved.read_text()) if args.reuse and saved.exists() else ours(root, args.minutes)}
        saved.write_text(json.dumps(entry["ours"], indent=2))
        print(f"{name}: UNETR++ {json.dumps(entry['ours'])}", flush=True)
        if not args.skip_baseline:
            entry["basicunet"] = baseline(root, args.minutes, entry["ours"], tta=args.baseline_tta == "on")
            print(f"{name}: BasicUNet {json.dumps(entry['basicunet'])}", flush=True)
        report["sets"][name] = entry
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
