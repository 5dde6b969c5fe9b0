"""``unetrpp find-best``: cross-validation summary of the folds, and the postprocessing chosen on it."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "find-best", help="score the folds' validation predictions and choose postprocessing on them",
        description="Scores the validation predictions of each run (one run per fold; cases a time budget left "
                    "unpredicted are predicted now with the run's checkpoint) and decides, with nnU-Net's rule, "
                    "whether keeping only the largest connected component (of the whole foreground, then of "
                    "each class) raises the cross-validated Dice; it is applied only where it does, so it never "
                    "lowers it. Writes postprocessing.json, cross_validation.json and .csv into the runs' common "
                    "folder (or -o), where `predict -m RUN...` and `export-model RUN...` find it.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (DATASET/results/unetrpp_foldK)")
    p.add_argument("-o", "--out", help="folder for the outputs (default: the runs' common folder)")
    p.add_argument("--dataset", help="the dataset the runs trained on (default: the folder above results/)")
    p.add_argument("--device", default="auto", help="for validation cases still to predict: cpu, cuda or auto")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..inference.crossval import find_best

    find_best(args.runs, out=args.out, dataset=args.dataset, device=args.device)
    return 0
