"""``unetrpp train``: the official recipe on a planned, preprocessed dataset."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train UNETR++ on a preprocessed dataset (resumable; torchrun for several GPUs)",
        description="Train with the official recipe (SGD Nesterov 0.99, lr 1e-2 poly 0.9, weight decay 3e-5, "
                    "clip 12, Dice+CE with deep supervision, the official augmentation). Writes checkpoints "
                    "(latest, best, final), log.txt, progress.csv and progress.png into the run folder, then "
                    "predicts and scores the validation cases. Several processes: `torchrun --nproc_per_node N "
                    "-m unetrpp.cli.main train ...`.")
    p.add_argument("dataset", help="dataset folder (after `unetrpp plan` and `unetrpp preprocess`)")
    p.add_argument("--preset", default="synapse", help="network preset (default synapse)")
    p.add_argument("-f", "--fold", default="0", help="fold of splits.json, or 'all' (default 0)")
    p.add_argument("-o", "--out", help="run folder (default DATASET/results/PRESET_foldF)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (default 1000)")
    p.add_argument("--iters", type=int, default=250, help="training iterations per epoch (default 250)")
    p.add_argument("--val-iters", type=int, default=50, help="validation batches per epoch (default 50)")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"), help="patch (default: the plans')")
    p.add_argument("--batch-size", type=int, help="batch size over all processes (default: the plans')")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd (the recipe: Nesterov, momentum 0.99) or adamw (learns faster in short budgets)")
    p.add_argument("--lr", type=float, default=1e-2, help="initial learning rate (default 1e-2)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None,
                   help="mixed precision (default: bf16 on CUDA where supported, off on CPU)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="stop training before this many minutes are exceeded (the lr schedule follows the budget)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder exactly")
    p.add_argument("--no-val", action="store_true", help="skip the final whole-case validation")
    p.add_argument("--no-val-tta", action="store_true", help="final validation without mirroring")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute the EPA stages in backward: less training memory, slower steps")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from ..runtime import tune_cpu_allocator
    from ..training.config import TrainConfig
    from ..training.trainer import Trainer

    tune_cpu_allocator()

    fold = args.fold if args.fold == "all" else _int(args.fold, "fold")
    device = args.device
    amp = args.amp
    if amp is None:
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    cfg = TrainConfig(
        preset=args.preset, fold=fold, epochs=args.epochs, iters_per_epoch=args.iters, val_iters=args.val_iters,
        patch_size=list(args.patch_size) if args.patch_size else None, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer,
        amp=amp, device=device, seed=args.seed, workers=args.workers, time_budget_min=args.time_budget,
        final_validation=not args.no_val, final_validation_tta=not args.no_val_tta,
        activation_checkpointing=args.checkpointing,
    )
    Trainer(args.dataset, cfg, out_dir=args.out).run(resume=args.resume)
    return 0


def _int(v: str, name: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer or 'all', got {v!r}") from None
