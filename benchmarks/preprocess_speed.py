"""Preprocessing throughput on the real hippocampus data (MSD Task04, 260 cases).

    python benchmarks/preprocess_speed.py [--data ../shared/data/hippocampus] [--workers 2] [--json]

Times each stage of the data pipeline from the MSD download to training-ready arrays (convert,
check, plan, preprocess, and a second preprocess run that must skip every case) and reports the
peak resident memory of the main process and of the largest worker process.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT, help="MSD Task04 Hippocampus folder")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    if not (args.data / "dataset.json").exists():
        raise SystemExit(f"{args.data}: no dataset.json (pass --data)")

    from unetrpp.data.check import check_dataset
    from unetrpp.data.convert import convert_msd
    from unetrpp.data.plan import plan_dataset
    from unetrpp.data.preprocess import preprocess_dataset

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hippocampus"
        t = time.perf_counter()
        convert_msd(args.data, out, workers=args.workers)
        times["convert_s"] = time.perf_counter() - t
        t = time.perf_counter()
        problems = check_dataset(out, workers=args.workers)
        times["check_s"] = time.perf_counter() - t
        assert not problems, problems[:3]
        t = time.perf_counter()
        plans = plan_dataset(out, workers=args.workers)
        times["plan_s"] = time.perf_counter() - t
        t = time.perf_counter()
        summary = preprocess_dataset(out, workers=args.workers)
        times["preprocess_s"] = time.perf_counter() - t
        t = time.perf_counter()
        again = preprocess_dataset(out, workers=args.workers)
        times["preprocess_again_s"] = time.perf_counter() - t
        size = sum(f.stat().st_size for f in (out / "preprocessed").iterdir())
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    from unetrpp.bench import machine_info

    result = {
        **{k: round(v, 2) for k, v in times.items()},
        "cases": summary["cases"],
        "processed": summary["processed"],
        "skipped_on_rerun": again["skipped"],
        "cases_per_s": round(summary["cases"] / times["preprocess_s"], 1),
        "preprocessed_MB": round(size / 1e6, 1),
        "peak_rss_main_MB": round(me),
        "peak_rss_worker_MB": round(kids),
        "target_spacing": plans["target_spacing"],
        "patch_size": plans["patch_size"],
        "workers": args.workers,
        "machine": machine_info(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for k, v in result.items():
        print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
