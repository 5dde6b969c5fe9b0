"""``unetrpp convert``: a paper dataset's download layout -> the nnU-Net v2 raw layout + splits.json."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a Synapse/BTCV, ACDC or MSD download into the v2 layout",
        description="Convert a downloaded dataset into the nnU-Net v2 raw layout (dataset.json, imagesTr, "
                    "labelsTr, imagesTs) with a splits.json: synapse (BTCV RawData, paper's 18/12 split), "
                    "btcv (same download, 24/6), acdc (ED/ES frames, paper's 20 test patients), msd (any "
                    "Decathlon task; Task06 Lung gets the paper's split, others 5-fold CV).")
    p.add_argument("kind", choices=("synapse", "btcv", "acdc", "msd"), help="source dataset")
    p.add_argument("src", help="the downloaded folder")
    p.add_argument("dst", help="output dataset folder")
    p.add_argument("--workers", type=int, default=2, help="parallel processes for 4D splitting (msd)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.convert import CONVERTERS
    from ..data.layout import Dataset, load_splits

    out = CONVERTERS[args.kind](args.src, args.dst, args.workers)
    ds = Dataset.open(out)
    splits = load_splits(out, create=False)
    print(f"converted {args.src} -> {out}: {ds.num_training} training cases, {len(ds.test_cases())} test cases, "
          f"{ds.num_channels} channel(s), {len(ds.labels)} labels; splits.json with {len(splits)} fold(s) "
          f"({len(splits[0]['train'])} train / {len(splits[0]['val'])} val in fold 0)")
    return 0
