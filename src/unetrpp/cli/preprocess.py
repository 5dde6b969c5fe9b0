"""``unetrpp preprocess``: crop, normalise, resample and store every training case."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="preprocess a planned dataset into memory-mappable arrays",
        description="Crop to the nonzero box, normalise, resample to the plans' spacing and store each case as "
                    ".npy arrays plus a JSON that undoes it. Skips cases already done with the same plans; an "
                    "interrupted run leaves no half-written case.")
    p.add_argument("dataset", help="dataset folder (run `unetrpp plan` on it first)")
    p.add_argument("-o", "--out", help="output folder (default DATASET/preprocessed)")
    p.add_argument("--plans", help="plans.json to use (default DATASET/plans.json)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    p.set_defaults(run=run)


def run(args) -> int:
    import sys
    import time
    from pathlib import Path

    from ..data.plan import load_plans
    from ..data.preprocess import preprocess_dataset

    plans_path = Path(args.plans) if args.plans else Path(args.dataset) / "plans.json"
    if not plans_path.exists():
        raise FileNotFoundError(f"{plans_path}: no plans; run `unetrpp plan {args.dataset}` first")
    t = time.perf_counter()
    s = preprocess_dataset(args.dataset, args.out, load_plans(plans_path), workers=args.workers,
                           overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(f"preprocessed {s['processed']} case(s), skipped {s['skipped']} already done -> {s['out']} "
          f"({time.perf_counter() - t:.1f} s)")
    return 0
