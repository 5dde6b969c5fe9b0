"""``unetrpp train``: the official recipe on a planned, preprocessed dataset."""

from __future__ import annotations

import dataclasses
import re

from ..errors import UserError
from ..runtime import AMP_MODES


def add_parser(sub) -> None:
    from ..training.config import PAPER_LR, TrainConfig

    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # the CLI's defaults are the config's
    p = sub.add_parser(
        "train", help="train UNETR++ on a preprocessed dataset (resumable; torchrun for several GPUs)",
        description=f"Train the network of the plans (plans.json) with the official recipe (SGD Nesterov "
                    f"{d['momentum']:g}, lr {_num(PAPER_LR)} poly {d['poly_exponent']:g}, weight decay "
                    f"{_num(d['weight_decay'])}, clip {d['grad_clip']:g}, Dice+CE with deep supervision, the official "
                    "augmentation). With --time-budget the whole job (training and validation) fits the budget, "
                    "and a run too short for that recipe gets the short-run recipe: width, patch, optimizer and "
                    "schedule measured and chosen on this device (said in the log, kept in train_config.json). "
                    "Writes checkpoints (latest, best, final), log.txt, progress.csv and progress.png into the run "
                    "folder, then predicts and scores the validation cases. Several processes: `torchrun "
                    "--nproc_per_node N -m unetrpp.cli.main train ...`.")
    p.add_argument("dataset", help="dataset folder (after `unetrpp plan` and `unetrpp preprocess`)")
    p.add_argument("--preset", help="only to check: the preset the plans must have been made with")
    p.add_argument("-f", "--fold", default=str(d["fold"]), help="fold of splits.json, or 'all' (default %(default)s)")
    p.add_argument("-o", "--out", help="run folder (default DATASET/results/NAME_foldF)")
    p.add_argument("--recipe", choices=("auto", "paper", "short"), default=d["recipe"],
                   help="auto: the short-run recipe when the time budget is short for the paper's "
                        "(default %(default)s)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="epochs (default %(default)s)")
    p.add_argument("--iters", type=int,
                   help=f"training iterations per epoch (default {d['iters_per_epoch']}; short runs: ~1 min)")
    p.add_argument("--val-iters", type=int, help=f"validation batches per epoch (default {d['val_iters']}; "
                                                  "short runs: 1/10)")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"), help="patch (default: the plans')")
    p.add_argument("--batch-size", type=int, help="batch size over all processes (default: the plans')")
    p.add_argument("--optimizer", choices=("sgd", "adamw"),
                   help=f"sgd (the paper's: Nesterov, momentum {d['momentum']:g}) or adamw (default: the recipe's)")
    p.add_argument("--lr", type=float,
                   help=f"initial learning rate (default: sgd {_num(PAPER_LR)}, short runs adamw 3e-3)")
    p.add_argument("--device", default=d["device"], help="cpu, cuda or auto (default %(default)s)")
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="mixed precision (default: bf16 on CUDA where supported, off on CPU)")
    p.add_argument("--workers", type=int, default=d["workers"],
                   help="data-loading processes per training process (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (default %(default)s)")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="the whole job's budget: training, validation and the final validation end within it")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder exactly")
    p.add_argument("--pretrained", metavar="PATH",
                   help="fine-tune: start from a checkpoint, run folder or model package (its first network), "
                        "with its architecture; matching weights are loaded, positional embeddings resized to the "
                        "patch, heads for other classes re-initialised (said in the log and train_config.json)")
    p.add_argument("--no-val", action="store_true", help="skip the final whole-case validation")
    p.add_argument("--no-val-tta", action="store_true", help="final validation without mirroring")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute the EPA stages in backward: less training memory, slower steps")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..runtime import fit_cpu_threads, resolve_amp, resolve_device, tune_cpu_allocator
    from ..training.config import TRAIN_DEVICES, TrainConfig
    from ..training.trainer import Trainer, TrainingInterrupted

    tune_cpu_allocator()

    fold = args.fold if args.fold == "all" else _int(args.fold, "fold")
    device = args.device
    resolved = resolve_device(device, kinds=TRAIN_DEVICES)  # the trainer picks each process's GPU
    if resolved.type == "cpu":
        fit_cpu_threads()  # only the cores other processes leave free (the trainer's log says how many)
    amp = resolve_amp(args.amp, resolved)
    given = {k: v for k, v in (("iters_per_epoch", args.iters), ("val_iters", args.val_iters)) if v is not None}
    cfg = TrainConfig(
        preset=args.preset, fold=fold, epochs=args.epochs, recipe=args.recipe, **given,
        patch_size=list(args.patch_size) if args.patch_size else None, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer,
        amp=amp, device=device, seed=args.seed, workers=args.workers, time_budget_min=args.time_budget,
        final_validation=not args.no_val, final_validation_tta=not args.no_val_tta,
        activation_checkpointing=args.checkpointing, pretrained=str(args.pretrained) if args.pretrained else None,
    )
    try:
        Trainer(args.dataset, cfg, out_dir=args.out).run(resume=args.resume)
    except TrainingInterrupted as e:
        print(f"unetrpp train: {e}", flush=True)
        return 143
    return 0


def _num(x: float) -> str:
    """A small number as the recipe writes it (``1e-2``, ``3e-5``), others as ``%g``."""
    e = f"{x:.0e}"
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", e) if x < 0.1 and float(e) == x else f"{x:g}"


def _int(v: str, name: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise UserError(f"{name} must be an integer or 'all', got {v!r}") from None
