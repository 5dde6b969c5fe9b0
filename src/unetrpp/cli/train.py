"""``unetrpp train``: the official recipe on a planned, preprocessed dataset."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train UNETR++ on a preprocessed dataset (resumable; torchrun for several GPUs)",
        description="Train the network of the plans (plans.json) with the official recipe (SGD Nesterov 0.99, lr "
                    "1e-2 poly 0.9, weight decay 3e-5, clip 12, Dice+CE with deep supervision, the official "
                    "augmentation). With --time-budget the whole job (training and validation) fits the budget, "
                    "and a run too short for that recipe gets the short-run recipe: width, patch, optimizer and "
                    "schedule measured and chosen on this device (said in the log, kept in train_config.json). "
                    "Writes checkpoints (latest, best, final), log.txt, progress.csv and progress.png into the run "
                    "folder, then predicts and scores the validation cases. Several processes: `torchrun "
                    "--nproc_per_node N -m unetrpp.cli.main train ...`.")
    p.add_argument("dataset", help="dataset folder (after `unetrpp plan` and `unetrpp preprocess`)")
    p.add_argument("--preset", help="only to check: the preset the plans must have been made with")
    p.add_argument("-f", "--fold", default="0", help="fold of splits.json, or 'all' (default 0)")
    p.add_argument("-o", "--out", help="run folder (default DATASET/results/NAME_foldF)")
    p.add_argument("--recipe", choices=("auto", "paper", "short"), default="auto",
                   help="auto (default): the short-run recipe when the time budget is short for the paper's")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (default 1000)")
    p.add_argument("--iters", type=int, help="training iterations per epoch (default 250; short runs: ~1 min)")
    p.add_argument("--val-iters", type=int, help="validation batches per epoch (default 50; short runs: 1/10)")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"), help="patch (default: the plans')")
    p.add_argument("--batch-size", type=int, help="batch size over all processes (default: the plans')")
    p.add_argument("--optimizer", choices=("sgd", "adamw"),
                   help="sgd (the paper's: Nesterov, momentum 0.99) or adamw (default: the recipe's)")
    p.add_argument("--lr", type=float, help="initial learning rate (default: sgd 1e-2, short runs adamw 3e-3)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None,
                   help="mixed precision (default: bf16 on CUDA where supported, off on CPU)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")
    p.add_argument("--seed", type=int, default=42)
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
    import torch

    from ..runtime import fit_cpu_threads, tune_cpu_allocator
    from ..training.config import TrainConfig
    from ..training.trainer import Trainer, TrainingInterrupted

    tune_cpu_allocator()

    fold = args.fold if args.fold == "all" else _int(args.fold, "fold")
    device = args.device
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        fit_cpu_threads()  # only the cores other processes leave free (the trainer's log says how many)
    amp = args.amp
    if amp is None:
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
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


def _int(v: str, name: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise UserError(f"{name} must be an integer or 'all', got {v!r}") from None
