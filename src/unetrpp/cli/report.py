"""``unetrpp report``: one self-contained HTML page of evaluations and training runs, with slice viewers."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="one HTML page of evaluations and runs: tables, training curves, slice viewers",
        description="Writes one self-contained HTML page (no server, no network) with a section per input: the "
                    "per-region means, the per-case table (worst first; click a header to sort), the training "
                    "curves of a run, and for every case a slice viewer (reference, prediction, disagreement; "
                    "axial, coronal, sagittal). An input is an evaluation (PRED/evaluation.json from `unetrpp "
                    "evaluate`, or its folder) or a run folder (progress.csv, and validation/summary.json if the "
                    "run validated). An evaluation's references are the folder it recorded, else DATASET/labelsTs "
                    "beside the prediction folder; images are imagesTs beside the references.")
    p.add_argument("inputs", nargs="+", metavar="EVAL_OR_RUN", help="evaluation.json (or its folder), or a run folder")
    p.add_argument("-o", "--out", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--references", metavar="DIR", help="reference label folder of the evaluations")
    p.add_argument("--images", metavar="DIR", help="image folder of the evaluations (CASE_0000.nii.gz or CASE.nii.gz)")
    p.add_argument("--predictions", metavar="DIR", help="prediction folder of the evaluations (default: the JSON's)")
    p.add_argument("--title", help="the page's title")
    p.add_argument("--workers", type=int, default=2, help="parallel processes reading the cases")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import UserError
    from ..io.jsonio import check_writable
    from ..report.html import load_section, write_report

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"{out}: the report must be an .html file")
    sections = [load_section(i, args.references, args.images, args.predictions) for i in args.inputs]
    for s in sections:
        print(s.note)
    check_writable(out.parent, "the report")  # before the cases are read
    write_report(sections, out, title=args.title, workers=max(1, args.workers))
    cases = sum(len(s.cases) for s in sections)
    print(f"wrote {out} ({len(sections)} section(s), {cases} case(s), {out.stat().st_size / 1e6:.1f} MB)")
    return 0
