"""``unetrpp import-official``: an official UNETR++ checkpoint and its plans -> a model package."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import-official", help="turn an official UNETR++ checkpoint into a model package for predict",
        description="Read an official UNETR++ (nnU-Net v1) checkpoint, model_final_checkpoint.model, and the "
                    "model_final_checkpoint.model.pkl beside it (its trainer arguments and nnU-Net v1 plans), and "
                    "write a model package that `unetrpp predict -m OUT` runs with the official preprocessing: "
                    "the stage's target spacing and patch size, the CT clip and mean/sd or per-image z-score, the "
                    "axis transposition. Neither file's pickled code is executed: only tensors, plain containers "
                    "and numpy arrays are read, anything else is refused.")
    p.add_argument("checkpoint", help="the official checkpoint (model_final_checkpoint.model)")
    p.add_argument("pkl", nargs="?", help="its nnU-Net v1 info pickle (default: CHECKPOINT.pkl beside it)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL",
                   help="the model package to write: a .zip file, or else a folder")
    p.add_argument("--labels", metavar="DATASET_JSON",
                   help="dataset.json whose 'labels' name the classes (nnU-Net v1 or v2 style); default: the "
                        "official dataset's names when the network is an official configuration, else class_N")
    p.add_argument("--stage", type=int, help="the plans stage the network was trained on (default: the one in "
                                             "the trainer's arguments, else the full-resolution stage)")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="the training patch size, if not the stage's patch_size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..inference.model import check_package_target
    from ..inference.official_import import import_official

    pkl = args.pkl or f"{args.checkpoint}.pkl"
    check_package_target(args.output, [args.checkpoint, pkl, args.labels], args.overwrite)
    if Path(args.output).suffix == ".pkl" or Path(args.output).name.endswith(".model"):
        raise UserError(f"{args.output}: give the package a .zip name or a folder name")
    path, s = import_official(args.checkpoint, args.pkl, args.output, labels_json=args.labels, stage=args.stage,
                              patch_size=args.patch_size)
    plans, cfg = s["plans"], s["config"]
    kind = f"the official {s['preset']} layout" if s["preset"] else "an official-style UNETR++"
    print(f"imported {args.checkpoint} -> {path}: {kind}, {s['parameters']:,} parameters, patch "
          f"{tuple(cfg.img_size)}, {cfg.in_channels} channel(s), {cfg.out_channels} classes "
          f"(trainer {s['trainer'] or '?'}, fold {s['fold'] if s['fold'] is not None else '?'}, stage {s['stage']})")
    for line in plans.decisions:
        print(f"  {line}")
    print(f"  labels: {', '.join(f'{v}={k}' for k, v in sorted(plans.labels.items(), key=lambda kv: kv[1]))}")
    return 0
