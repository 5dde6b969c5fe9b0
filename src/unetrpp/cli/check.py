"""``unetrpp check``: list every problem of a dataset at once."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check", help="validate a dataset and list every problem",
        description="Validate a v2-layout dataset: missing or extra files, image/label shape or geometry "
                    "mismatch, label values not in dataset.json, NaN/inf, wrong dimensionality, unreadable "
                    "or truncated files, channel count mismatch. Exit status 1 when anything is wrong.")
    p.add_argument("dataset", help="dataset folder (with dataset.json)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.set_defaults(run=run)


def run(args) -> int:
    import sys

    from ..data.check import check_dataset
    from ..data.layout import Dataset

    problems = check_dataset(args.dataset, workers=args.workers, progress=sys.stderr.isatty())
    if problems:
        for p in problems:
            print(p)
        cases = {p.case for p in problems}
        print(f"{len(problems)} problem(s) in {len(cases)} case(s)/file(s) of {args.dataset}", file=sys.stderr)
        return 1
    ds = Dataset.open(args.dataset)
    print(f"{args.dataset}: OK ({ds.num_training} training cases, {ds.num_channels} channel(s), "
          f"labels {ds.label_values})")
    return 0
