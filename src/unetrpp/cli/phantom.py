"""``unetrpp phantom``: write the synthetic abdominal CT dataset."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "phantom", help="write a synthetic abdominal CT dataset (v2 layout)",
        description="Write a synthetic abdominal CT dataset in the nnU-Net v2 layout: Hounsfield intensities, "
                    "anisotropic spacing, eight organs in BTCV numbering with random shapes and overlapping "
                    "intensities. Deterministic for a seed.")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--cases", type=int, default=20, help="training cases (imagesTr/labelsTr)")
    p.add_argument("--test", type=int, default=0, help="extra held-out cases (imagesTs/labelsTs)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--contrast", action="store_true",
                   help="portal-venous enhancement (organs distinct in HU) instead of unenhanced, overlapping HU")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.set_defaults(run=run)


def run(args) -> int:
    import time

    from ..data.phantom import make_phantom_dataset

    t = time.perf_counter()
    out = make_phantom_dataset(args.out, cases=args.cases, seed=args.seed, test=args.test, workers=args.workers,
                              contrast=args.contrast)
    print(f"wrote {args.cases} training + {args.test} test phantom cases to {out} ({time.perf_counter() - t:.1f} s)")
    return 0
