"""Train on real MRI under a CPU time budget: UNETR++ against MONAI's UNETR, same split, budget and loop.

    python benchmarks/train_hippocampus.py [--data ../shared/data/hippocampus] [--minutes 15]
        [--work DIR] [--skip-baseline] [--json OUT.json]

MSD Task04 Hippocampus (260 T1 MRIs, anterior and posterior hippocampus) is converted, planned
and preprocessed; every fifth case (sorted names) is held out (52 cases), the other 208 train.
Each network is trained by :class:`unetrpp.training.Trainer` (the official recipe, same patch,
batch, sampler, augmentation, loss and time budget), then the held-out cases are predicted whole
(sliding window with mirroring) and scored on the original grid. Reported: mean Dice per class,
the Dice-versus-time curve of the validation patches, and ``dice_vs_time.png``.

MONAI is a benchmark-only dependency: ``pip install monai einops`` (``--no-deps`` keeps torch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
PATCH = (32, 64, 64)  # the synapse preset's strides need multiples of (16, 32, 32); cases are ~36 x 50 x 35


def _baseline_trainer():
    import torch
    from monai.networks.nets import UNETR

    from unetrpp.training.trainer import Trainer

    class UNETRBaseline(torch.nn.Module):
        """MONAI's UNETR with the attributes the prediction code reads (``config``)."""

        def __init__(self, in_channels: int, out_channels: int, img_size):
            super().__init__()
            self.net = UNETR(in_channels, out_channels, tuple(img_size), feature_size=16, hidden_size=768,
                             mlp_dim=3072, num_heads=12, norm_name="instance", res_block=True)
            self.config = SimpleNamespace(img_size=tuple(img_size), in_channels=in_channels,
                                          out_channels=out_channels)

        def forward(self, x):
            return self.net(x)

    class BaselineTrainer(Trainer):
        def build_model(self):
            return UNETRBaseline(self.model_config["in_channels"], self.model_config["out_channels"], self.patch)

    return BaselineTrainer


def main() -> None:
    from unetrpp.training.config import PAPER_LR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT, help="MSD Task04 Hippocampus folder")
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per network")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--skip-baseline", action="store_true", help="train UNETR++ only")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    ap.add_argument("--lr", type=float, default=PAPER_LR)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    if not (args.data / "dataset.json").exists():
        raise SystemExit(f"{args.data}: no dataset.json (pass --data)")

    import torch

    from unetrpp.data.convert import convert_msd
    from unetrpp.data.layout import Dataset, fixed_split, write_splits
    from unetrpp.data.plan import plan_dataset
    from unetrpp.data.preprocess import preprocess_dataset
    from unetrpp.runtime import tune_cpu_allocator
    from unetrpp.training.config import TrainConfig
    from unetrpp.training.trainer import Trainer

    tune_cpu_allocator()
    work = args.work or Path(tempfile.mkdtemp(prefix="unetrpp-hippo-"))
    root = work / "hippocampus"
    if not (root / "dataset.json").exists():
        convert_msd(args.data, root, workers=2)
    names = sorted(c.name for c in Dataset.open(root).training_cases())
    write_splits(root, fixed_split(names, names[::5]))
    plan_dataset(root, patch_size=PATCH, divisor=(16, 32, 32), batch_size=2, workers=2)
    preprocess_dataset(root, workers=2)

    runs = {"UNETR++": Trainer}
    if not args.skip_baseline:
        runs["MONAI UNETR"] = _baseline_trainer()
    results = {}
    for label, cls in runs.items():
        cfg = TrainConfig(preset="synapse", fold=0, iters_per_epoch=50, val_iters=5, workers=1, device="cpu",
                          time_budget_min=args.minutes, optimizer=args.optimizer, lr=args.lr)
        out = work / f"run_{label.replace(' ', '_').replace('+', 'p')}"
        t = time.perf_counter()
        trainer = cls(root, cfg, out_dir=out, progress=False)
        params = sum(p.numel() for p in trainer.build_model().parameters())
        summary = trainer.run(resume=(out / "checkpoint_latest.pt").exists())
        val = summary["validation"]
        history = torch.load(out / "checkpoint_final.pt", weights_only=True)["history"]
        results[label] = {
            "mean_dice": val["mean_dice"],
            "dice_per_class": {k: v["dice"] for k, v in val["mean"].items()},
            "hd95_mm_per_class": {k: v["hd95"] for k, v in val["mean"].items()},
            "validation_cases": len(val["cases"]),
            "epochs": summary["epochs"],
            "iterations": summary["iterations"],
            "train_minutes": summary["elapsed_s"] / 60,
            "wall_minutes_with_validation": (time.perf_counter() - t) / 60,
            "params_M": params / 1e6,
            "dice_vs_time": [(round(h["elapsed_s"] / 60, 2), h["pseudo_dice"]) for h in history],
        }
        print(f"{label}: mean Dice {val['mean_dice']:.4f} "
              f"({', '.join(f'{k} {v:.4f}' for k, v in results[label]['dice_per_class'].items())}), "
              f"{results[label]['iterations']} iterations in {results[label]['train_minutes']:.1f} min", flush=True)

    _plot(results, work / "dice_vs_time.png")
    from unetrpp.bench import machine_info

    report = {
        "machine": machine_info(),
        "split": f"{len(names) - len(names[::5])} train / {len(names[::5])} held out (every fifth case)",
        "patch": list(PATCH),
        "budget_minutes": args.minutes,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "results": results,
        "plot": str(work / "dice_vs_time.png"),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label, r in results.items():
        t, d = zip(*r["dice_vs_time"], strict=True)
        ax.plot(t, d, marker="o", ms=3, label=f"{label} (held-out cases: {r['mean_dice']:.3f})")
    ax.set_xlabel("training time (min, 2 CPU cores)")
    ax.set_ylabel("pseudo-Dice, validation patches")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
