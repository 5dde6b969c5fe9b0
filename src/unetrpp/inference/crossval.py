"""``find-best``: score the folds' own validation predictions and choose the postprocessing on them.

Each run folder (``DATASET/results/unetrpp_foldK``) predicted its fold's validation cases at the
end of training (``validation/``). Cases the run did not predict (a time budget stopped its final
validation early) are predicted here with the run's final checkpoint and mirroring, into the same
folder, so every fold's validation set is complete. The references are the dataset's labels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..data.layout import Dataset, load_splits
from ..errors import UserError
from ..io import read_image, write_image
from ..io.jsonio import read_json, write_json
from .model import POSTPROCESSING, run_checkpoint
from .postprocess import choose_postprocessing, write_cv_csv


def _run_info(run: Path, dataset: Path | None) -> tuple[Path, int, list[str]]:
    """``(dataset root, fold, validation case names)`` of a run folder."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    cfg = read_json(run / "train_config.json")
    fold = cfg.get("fold") if isinstance(cfg, dict) else None
    if fold == "all":
        raise UserError(f"{run}: trained on every case (fold 'all'): it has no validation cases to choose on")
    if not isinstance(fold, int) or isinstance(fold, bool):
        raise UserError(f"{run / 'train_config.json'}: fold must be an integer, got {fold!r}")
    root = dataset or run.resolve().parent.parent
    if not (root / "dataset.json").is_file():
        raise UserError(f"{run}: its dataset is not at {root} (the run folder is not DATASET/results/RUN); "
                         "give it with --dataset")
    splits = load_splits(root, create=False)
    if not 0 <= fold < len(splits):
        raise UserError(f"{root / 'splits.json'}: fold {fold} of {run} does not exist ({len(splits)} folds)")
    return root, fold, list(splits[fold]["val"])


def find_best(runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
              dataset: str | os.PathLike | None = None, device: str = "auto", log: Callable[[str], None] = print,
              ) -> dict:
    """Complete each run's validation predictions, choose the postprocessing, write the summaries.

    Writes ``OUT/postprocessing.json`` (OUT: the runs' common folder by default, where ``predict -m
    RUN...`` finds it), ``OUT/cross_validation.json`` and ``.csv``. Returns the postprocessing.
    """
    runs = [Path(r) for r in runs]
    if not runs:
        raise UserError("find-best: give at least one run folder")
    dataset = Path(dataset) if dataset else None
    infos = [_run_info(r, dataset) for r in runs]
    roots = {info[0].resolve() for info in infos}
    if len(roots) > 1:
        raise UserError(f"the runs come from different datasets ({', '.join(map(str, sorted(roots)))})")
    root = infos[0][0]
    folds = [info[1] for info in infos]
    if len(set(folds)) < len(folds):
        raise UserError(f"two runs validate fold {max(set(folds), key=folds.count)}; give one run per fold")
    ds = Dataset.open(root)
    classes = sorted(v for v in ds.labels.values() if v > 0)
    if not classes:
        raise UserError(f"{root / 'dataset.json'}: no foreground label to score")
    for run in runs:
        plans = run / "plans.json"
        if plans.is_file():
            theirs = read_json(plans).get("labels")
            if theirs != ds.labels:
                raise UserError(f"{plans}: the run predicts labels {theirs}, the dataset at {root} has {ds.labels}")
    names = {v: k for k, v in ds.labels.items()}
    ending = ds.file_ending
    pairs: list[tuple[str, Path, Path]] = []
    for run, (_, fold, val) in zip(runs, infos, strict=True):
        folder = run / "validation"
        missing = [n for n in val if not (folder / f"{n}{ending}").is_file()]
        if missing:
            from .predictor import Predictor

            log(f"{run.name}: predicting {len(missing)} of {len(val)} validation case(s) its training did not")
            predictor = Predictor.from_checkpoint(run_checkpoint(run), device=device)
            for n in missing:
                result = predictor.predict(list(ds.case(n).images))
                write_image(result.label, result.geometry, folder / f"{n}{ending}")
        pairs += [(n, ds.case(n).label, folder / f"{n}{ending}") for n in val]
        log(f"{run.name}: fold {fold}, {len(val)} validation case(s)")

    allowed = np.array([0, *classes])

    def arrays():
        for n, ref, pred in pairs:
            r, p = read_image(ref)[0], read_image(pred)[0]
            if p.dtype.kind not in "iub":
                raise UserError(f"{pred}: a prediction must hold integer labels, got {p.dtype}")
            bad = np.setdiff1d(np.unique(p), allowed)
            if bad.size:
                raise UserError(f"{pred}: labels {bad[:5].tolist()} are not the dataset's {allowed.tolist()}")
            if r.shape != p.shape:
                raise UserError(f"{pred}: shape {p.shape} differs from the reference's {r.shape} ({ref})")
            yield n, r, p

    post, cv = choose_postprocessing(arrays(), classes, log=log)
    out = Path(out) if out else Path(os.path.commonpath([r.resolve() for r in runs]))
    if len(runs) == 1 and out == runs[0].resolve():
        out = runs[0].resolve().parent
    post["runs"] = [r.resolve().name if r.resolve().parent == out.resolve() else str(r.resolve()) for r in runs]
    post["dataset"] = str(root.resolve())
    post["cross_validation"] = {k: v for k, v in cv.items() if k != "per_case"}
    post["class_names"] = {str(c): names.get(c, str(c)) for c in classes}
    write_json(post, out / POSTPROCESSING)
    write_json({**cv, "class_names": post["class_names"], "folds": folds}, out / "cross_validation.json")
    write_cv_csv(cv, names, out / "cross_validation.csv")
    log(f"cross-validation over {cv['cases']} case(s) of {len(runs)} fold(s): mean Dice "
        f"{cv['mean_dice_before']:.4f} -> {cv['mean_dice_after']:.4f} with postprocessing")
    log(f"wrote {out / POSTPROCESSING}, {out / 'cross_validation.json'} and {out / 'cross_validation.csv'}")
    return post
