"""The one-command demo: phantom CT -> plan -> preprocess -> train -> predict -> evaluate -> pictures.

Everything the real pipeline does, on a synthetic abdominal CT dataset small enough for a laptop:
the synapse-style network is trained for a fixed amount of work (``DEMO_STEPS`` steps, so the
result does not depend on the machine's speed or load; the expected time is measured and printed
first) on whatever device is there, the held-out phantom cases are predicted with the sliding
window and scored with the Synapse 8-organ protocol on their original grid. On a CPU it uses only
the cores other processes leave free.

What the demo changes to fit minutes on a CPU instead of hours on a GPU (all recorded in the run's
``train_config.json`` and ``plans.json``): portal-venous phantom intensities (as most abdominal
CT is read; ``unetrpp phantom`` without ``--contrast`` makes the harder unenhanced kind); a coarse
target spacing (6 x 4 x 4 mm) and a 16 x 64 x 64 patch (96 x 256 x 256 mm, most of the abdomen in
plane), so a step takes under a second on two cores; the Synapse preset's blocks at half width
(feature size 8, 6.2 M parameters); AdamW (lr 6e-3, poly decay over the steps), which learns
faster than the recipe's SGD in a few hundred steps; no augmentation (the held-out phantoms come
from the training distribution; without mirroring the network may use left and right from the
first steps); patches drawn in the training process (no loader process competing for the cores).
docs/benchmarks.md records what these choices were measured against.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import UserError
from ..io import write_json

DEMO_PATCH = (16, 64, 64)
DEMO_SPACING = (6.0, 4.0, 4.0)
DEMO_MODEL = {"feature_size": 8}
DEMO_LR = 6e-3
#: Training steps (batch 2): 24 epochs of 25. Work, not minutes: a busy machine takes longer, not worse.
DEMO_EPOCHS, DEMO_ITERS = 24, 25
#: No augmentation: the held-out phantoms come from the training distribution, and in a few hundred
#: steps augmentation only slows learning (and its loader competes with training for two cores).
DEMO_AUGMENT = {"p_rotation": 0.0, "p_scale": 0.0, "p_noise": 0.0, "p_blur": 0.0, "p_brightness": 0.0,
                "p_contrast": 0.0, "p_lowres": 0.0, "p_gamma_inverted": 0.0, "p_gamma": 0.0, "mirror_axes": []}


def _stage(msg: str) -> float:
    print(f"[demo] {msg}", flush=True)
    return time.perf_counter()


def run_demo(
    out: str | os.PathLike,
    steps: int = DEMO_EPOCHS * DEMO_ITERS,
    cases: int = 24,
    test_cases: int = 4,
    device: str = "auto",
    seed: int = 0,
    workers: int = 2,
) -> dict:
    """Run the demo into ``out`` (``steps`` training steps, rounded to whole epochs); returns the summary."""
    import torch

    from ..data.phantom import make_phantom_dataset
    from ..data.plan import plan_dataset
    from ..data.preprocess import preprocess_dataset
    from ..evaluation.evaluate import SYNAPSE8, evaluate_pairs, print_table
    from ..inference.predictor import Predictor
    from ..io import read_image, write_image
    from ..runtime import fit_cpu_threads, resolve_amp, resolve_device, tune_cpu_allocator
    from ..training.budget import measure_step
    from ..training.config import TRAIN_DEVICES, TrainConfig
    from ..training.trainer import Trainer
    from ..viz import write_overlay

    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    tune_cpu_allocator()
    data = out / "phantom"
    _stage(f"1/6 making {cases} training + {test_cases} test phantom CT cases (portal venous) in {data}")
    make_phantom_dataset(data, cases=cases, seed=seed, test=test_cases, workers=workers, contrast=True)
    _stage(f"2/6 planning: CT normalisation, {DEMO_SPACING} mm spacing, patch {DEMO_PATCH}")
    plans = plan_dataset(data, patch_size=DEMO_PATCH, batch_size=2, preset="synapse",
                         workers=workers, target_spacing=DEMO_SPACING)
    _stage("3/6 preprocessing")
    preprocess_dataset(data, workers=workers)

    resolved = resolve_device(device, kinds=TRAIN_DEVICES)
    dev, cuda = str(resolved), resolved.type == "cuda"
    threads = "" if cuda else f", {fit_cpu_threads()[1]}"
    run_dir = out / "training"
    epochs = max(1, round(steps / DEMO_ITERS))
    cfg = TrainConfig(
        preset="synapse", fold="all", epochs=epochs, iters_per_epoch=DEMO_ITERS, val_iters=2,
        optimizer="adamw", lr=DEMO_LR, model_overrides=DEMO_MODEL, augment=DEMO_AUGMENT,
        amp=resolve_amp("auto", resolved), device=dev,
        workers=0 if not cuda else 4, final_validation=False, seed=seed, recipe="short",
    )
    trainer = Trainer(data, cfg, out_dir=run_dir)
    step_s, _ = measure_step(trainer.model_config, trainer.batch, trainer.device, cfg.amp)
    n_steps = epochs * DEMO_ITERS
    _stage(f"4/6 training on {dev}{threads}: {n_steps} steps, about {n_steps * step_s / 60:.1f} min here "
           f"({step_s:.2f} s per step measured; progress: {run_dir / 'progress.png'})")
    trained = trainer.run()

    _stage(f"5/6 predicting the {test_cases} held-out cases (sliding window, step 0.5, no mirroring)")
    ckpt = run_dir / "checkpoint_final.pt"
    predictor = Predictor.from_checkpoint(ckpt, device=dev, tta=False)
    pred_dir = out / "predictions"
    pairs = []
    names = {v: k for k, v in plans.labels.items()}
    for case in sorted((data / "imagesTs").glob("*_0000.nii.gz")):
        name = case.name[: -len("_0000.nii.gz")]
        result = predictor.predict(case)
        target = write_image(result.label, result.geometry, pred_dir / f"{name}.nii.gz")
        ref = data / "labelsTs" / f"{name}.nii.gz"
        pairs.append((name, ref, target))
        image, geometry = read_image(case)
        write_overlay(image, result.label, geometry.spacing_zyx, out / "overlays" / f"{name}_prediction.png", names,
                      title=f"{name}: prediction")
        write_overlay(image, read_image(ref)[0], geometry.spacing_zyx, out / "overlays" / f"{name}_reference.png",
                      names, title=f"{name}: reference")
    _stage("6/6 evaluating with the synapse8 protocol (Dice, HD95 in mm)")
    regions = dict(SYNAPSE8)
    evaluation = evaluate_pairs(pairs, regions)
    evaluation["protocol"] = "synapse8"
    write_json(evaluation, out / "evaluation.json")
    table = print_table(evaluation)
    total = (time.perf_counter() - t_start) / 60
    summary = {
        "mean_dice_synapse8": evaluation["mean_dice"],
        "mean_hd95_mm": evaluation["mean_hd95"],
        "per_organ_dice": {k: v["dice"] for k, v in evaluation["mean"].items()},
        "minutes_total": total,
        "minutes_training": trained["elapsed_s"] / 60,
        "epochs": trained["epochs"],
        "iterations": trained["iterations"],
        "device": dev,
        "torch_threads": torch.get_num_threads(),
        "patch_size": list(DEMO_PATCH),
        "target_spacing_mm": plans.target_spacing,
        "checkpoint": str(ckpt),
    }
    write_json(summary, out / "summary.json")
    print(table)
    print(f"[demo] mean Dice over the 8 organs: {evaluation['mean_dice']:.3f} on {len(pairs)} held-out cases; "
          f"{total:.1f} min in all")
    print(f"[demo] everything is in {out}: predictions/, overlays/, training/progress.png, evaluation.json, "
          f"summary.json")
    return summary
