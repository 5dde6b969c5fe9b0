"""``unetrpp evaluate``: Dice, HD95 (mm) and surface Dice per case and region, as JSON, CSV and a table."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score predicted label files against references",
        description="Pairs REFERENCE and PREDICTION files by case name (folders, or two files) and writes per-case, "
                    "per-region Dice and HD95 in millimetres (voxel spacing of the reference). Both masks empty: "
                    "excluded from means and counted; one empty: Dice 0 and HD95 missing (counted), never a "
                    "perfect score. --compat official reproduces the official UNETR++ scripts: HD95 in voxels, "
                    "Dice 1 when both are empty, HD95 0 when either is.")
    p.add_argument("reference", help="reference label file or folder (e.g. DATASET/labelsTs)")
    p.add_argument("prediction", help="predicted label file or folder")
    p.add_argument("--protocol", default="labels", help="labels (every label; default), synapse8, btcv13, acdc, brats")
    p.add_argument("--compat", choices=("official",), help="the official scripts' definitions")
    p.add_argument("--nsd", type=float, metavar="MM", help="also normalised surface Dice at this tolerance (mm)")
    p.add_argument("-o", "--out", help="JSON to write (default PREDICTION/evaluation.json); the CSV goes beside it")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.set_defaults(run=run)


def _pairs(ref, pred):
    from pathlib import Path

    from ..io import FILE_ENDINGS, split_ending

    ref, pred = Path(ref), Path(pred)
    if not ref.exists():
        raise FileNotFoundError(f"{ref}: no such file or folder")
    if not pred.exists():
        raise FileNotFoundError(f"{pred}: no such file or folder")
    if ref.is_file() and pred.is_file():
        return [(split_ending(ref.name)[0], ref, pred)], pred.parent
    if ref.is_file() != pred.is_file():
        raise UserError(f"{pred}: give two files or two folders")

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.iterdir()):
            stem, ending = split_ending(f.name)
            if f.is_file() and ending in FILE_ENDINGS and not f.name.startswith("."):
                out[stem] = f
        return out

    refs, preds = index(ref), index(pred)
    if not refs:
        raise UserError(f"{ref}: no label files ({', '.join(FILE_ENDINGS)})")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise UserError(f"{pred}: no prediction for {len(missing)} reference case(s), first {missing[0]}")
    return [(n, refs[n], preds[n]) for n in sorted(refs)], pred


def run(args) -> int:
    import csv
    import io
    from pathlib import Path

    import numpy as np

    from ..data.layout import read_labels
    from ..evaluation.evaluate import evaluate_pairs, print_table, protocol_regions
    from ..io import read_image, write_json
    from ..io.jsonio import atomic_write, check_writable

    pairs, pred_dir = _pairs(args.reference, args.prediction)
    out = Path(args.out) if args.out else Path(pred_dir) / "evaluation.json"
    check_writable(out.parent, "the evaluation")  # before any case is scored
    labels = None
    ds_json = Path(args.reference).parent / "dataset.json"
    if args.protocol == "labels" and ds_json.exists():
        labels = read_labels(ds_json)
    present = []
    if args.protocol == "labels" and not labels:
        present = sorted({int(v) for _, r, _ in pairs for v in np.unique(read_image(r)[0])})
    regions = protocol_regions(args.protocol, labels, present)
    summary = evaluate_pairs(pairs, regions, nsd_tolerance=args.nsd, official=args.compat == "official",
                             workers=args.workers)
    summary["protocol"] = args.protocol
    write_json(summary, out)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "region", "dice", "hd95", "nsd", "status", "pred_voxels", "ref_voxels"])
    for c in summary["cases"]:
        for region, m in c["regions"].items():
            w.writerow([c["case"], region, _num(m["dice"]), _num(m["hd95"]), _num(m.get("nsd")), m["status"],
                        m["pred_voxels"], m["ref_voxels"]])
    data = buf.getvalue().encode()
    atomic_write(out.with_suffix(".csv"), lambda f: f.write(data))
    print(print_table(summary))
    print(f"{len(pairs)} case(s), {summary['units']}; wrote {out} and {out.with_suffix('.csv')}")
    return 0


def _num(v) -> str:
    import math

    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"
