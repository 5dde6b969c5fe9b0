"""Issue 17: the paper's comparison on real MRI: five architectures, one pipeline, one CPU budget, one split.

    python benchmarks/compare_hippocampus.py [--work /tmp/unetrpp-compare] [--minutes 15]
        [--archs nnunet,resenc,swinunetr,unetr,unetrpp] [--reuse-unetrpp DATASET] [--out docs/compare]
        [--json OUT.json]

The data is ``own_data.py``'s hippocampus set: MSD Task04 from ../shared/data (260 T1 MRIs), every
fifth case (sorted names) held out as the test set, fold 0 of the 5-fold splits for training and
validation. For each architecture A exactly these commands run, one after the other, each timed:

    unetrpp plan D --arch A
    unetrpp preprocess D
    unetrpp train D --time-budget MIN --device cpu
    unetrpp predict -i D/imagesTs -o D/pred_A -m D/results/A_fold0/checkpoint_final.pt
    unetrpp evaluate D/labelsTs D/pred_A

and then ``unetrpp compare`` of the runs, with their test-set evaluations, writes the table
(Markdown, CSV) and the figure into ``--out``.

``--reuse-unetrpp D0``: the UNETR++ row is ``own_data.py``'s run in ``D0`` (``results/unetrpp_fold0``
and ``pred/``), the own-data issue's result, made by the same commands (``plan`` without
``--arch`` is ``--arch unetrpp``) on the same split (checked: the held-out names and
``splits.json`` must be equal) and budget.

Run it on a quiet machine: every network gets the same wall-clock budget, so anything else
running takes steps from the network that is training at the time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
CLI = [sys.executable, "-m", "unetrpp.cli.main"]
ARCHS = ("nnunet", "resenc", "swinunetr", "unetr", "unetrpp")


def _run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ unetrpp {' '.join(cmd)}   # {time.strftime('%H:%M:%S')}\n")
        f.flush()
        proc = subprocess.run(CLI + cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"unetrpp {' '.join(cmd)} failed ({proc.returncode}); see {log}")
    seconds = time.perf_counter() - t
    with log.open("a") as f:
        f.write(f"# {seconds:.1f} s\n")
    return seconds


def one(root: Path, arch: str, minutes: float) -> dict:
    """The five commands for ``arch``; their times."""
    log = root / f"commands_{arch}.log"
    pred = root / f"pred_{arch}"
    times = {"plan": _run(["plan", str(root), "--arch", arch], log),
             "preprocess": _run(["preprocess", str(root)], log),
             "train": _run(["train", str(root), "--time-budget", f"{minutes:g}", "--device", "cpu"], log)}
    run = root / "results" / f"{arch}_fold0"
    times["predict"] = _run(["predict", "-i", str(root / "imagesTs"), "-o", str(pred), "-m",
                             str(run / "checkpoint_final.pt")], log)
    times["evaluate"] = _run(["evaluate", str(root / "labelsTs"), str(pred)], log)
    return {"arch": arch, "run": str(run), "evaluation": str(pred / "evaluation.json"), "seconds": times}


def reused(root: Path, d0: Path) -> dict:
    """own_data.py's UNETR++ run in ``d0``, after checking it used the same split as ``root``."""
    for name in ("splits.json",):
        if json.loads((d0 / name).read_text()) != json.loads((root / name).read_text()):
            raise SystemExit(f"{d0 / name} differs from {root / name}: not the same split")
    held = sorted(p.name for p in (d0 / "labelsTs").iterdir())
    if held != sorted(p.name for p in (root / "labelsTs").iterdir()):
        raise SystemExit(f"{d0 / 'labelsTs'}: other held-out cases than {root / 'labelsTs'}")
    run, pred = d0 / "results" / "unetrpp_fold0", d0 / "pred"
    for f in (run / "checkpoint_final.pt", pred / "evaluation.json"):
        if not f.is_file():
            raise SystemExit(f"{f}: missing (run benchmarks/own_data.py --sets hippocampus first)")
    return {"arch": "unetrpp", "run": str(run), "evaluation": str(pred / "evaluation.json"),
            "reused_from": str(d0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/unetrpp-compare", help="work folder (the dataset is made there)")
    ap.add_argument("--minutes", type=float, default=15.0, help="each network's time budget (default 15)")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures, in this order")
    ap.add_argument("--reuse-unetrpp", metavar="DATASET", help="take the UNETR++ row from own_data.py's run here")
    ap.add_argument("--out", default="docs/compare", help="folder for the table and the figure")
    ap.add_argument("--no-measure", action="store_true", help="compare without timing a training step")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()

    from own_data import make_set
    from unetrpp.bench.harness import machine_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = make_set("hippocampus", work)
    if not (root / "splits.json").exists():
        _run(["plan", str(root)], root / "commands_setup.log")  # makes splits.json, as plan does first
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        raise SystemExit(f"unknown architecture(s) {unknown}; one of {ARCHS}")
    rows, failed = [], []
    for arch in archs:
        if arch == "unetrpp" and args.reuse_unetrpp:
            rows.append(reused(root, Path(args.reuse_unetrpp)))
        else:
            try:
                rows.append(one(root, arch, args.minutes))
            except SystemExit as e:  # one network failing does not stop the others
                failed.append({"arch": arch, "error": str(e)})
                print(json.dumps(failed[-1]), flush=True)
                continue
        print(json.dumps(rows[-1]), flush=True)
    cmd = ["compare", *[r["run"] for r in rows], "-o", args.out]
    for r in rows:
        cmd += ["--evaluation", f"{r['run']}={r['evaluation']}"]
    if args.no_measure:
        cmd.append("--no-measure")
    _run(cmd, work / "commands_compare.log")
    result = {"machine": machine_info(), "minutes": args.minutes, "rows": rows, "failed": failed,
              "table": (Path(args.out) / "comparison.md").read_text()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(result["table"])
    shutil.copy(work / "commands_compare.log", Path(args.out) / "commands_compare.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
