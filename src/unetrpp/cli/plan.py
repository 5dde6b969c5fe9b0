"""``unetrpp plan``: fingerprint a dataset and write plans.json."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="fingerprint a dataset and write plans.json",
        description="Compute the dataset fingerprint (spacings, shapes, foreground intensity statistics) and "
                    "write DATASET/fingerprint.json and DATASET/plans.json: target spacing, per-channel "
                    "normalisation, the network (stem stride, patch size, every constructor "
                    "argument) and batch size. Creates splits.json (5-fold) if absent.")
    p.add_argument("dataset", help="dataset folder (with dataset.json)")
    p.add_argument("--arch", default="unetrpp",
                   help="the network: unetrpp (default), or a baseline planned and trained by the same pipeline: "
                        "nnunet (nnU-Net's U-Net), resenc (its residual-encoder U-Net), swinunetr, unetr "
                        "(the baselines need the extras nnunet or monai)")
    p.add_argument("--preset", help="use this network preset (its blocks, strides, patch and batch) instead of "
                                    "planning the network from the data")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="patch size (default: the preset's, else chosen from the median shape)")
    p.add_argument("--spacing", nargs=3, type=float, metavar=("Z", "Y", "X"),
                   help="target spacing in mm (default: the median, with nnU-Net's anisotropy rule)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's, else 2)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.set_defaults(run=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..data.layout import load_splits
    from ..data.plan import plan_dataset
    from ..io.jsonio import check_writable

    if args.arch != "unetrpp":
        from ..network.baselines import require

        require(args.arch)  # before the fingerprint, the splits or the plans
    if Path(args.dataset, "dataset.json").is_file():
        check_writable(args.dataset, "plans")  # before the fingerprint is computed
    load_splits(args.dataset)  # made (or checked) first: a bad splits.json leaves no plans.json behind
    plans = plan_dataset(args.dataset, patch_size=args.patch_size, batch_size=args.batch_size, preset=args.preset,
                         workers=args.workers, progress=sys.stderr.isatty(), target_spacing=args.spacing,
                         arch=args.arch)
    from ..network.registry import parameter_count

    cfg = plans.network_config()
    params = parameter_count(plans.network)
    norm = ", ".join(f"{n['channel']}: {n['scheme']}" for n in plans.normalization)
    shape = f"stem stride {tuple(cfg.stem_stride)}, " if plans.arch == "unetrpp" else f"{plans.arch}, "
    print(f"wrote {args.dataset}/plans.json: target spacing {_mm(plans.target_spacing)} mm (z, y, x), "
          f"median shape {_mm(plans.median_shape_after_resampling)}, patch {tuple(plans.patch_size)}, "
          f"batch {plans.batch_size}, normalisation {norm}; network: {shape}"
          f"feature size {cfg.feature_size}, {params / 1e6:.1f} M parameters")
    for line in plans.decisions:
        print(f"  {line}")
    return 0


def _mm(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"
