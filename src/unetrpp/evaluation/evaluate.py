"""Per-case, per-region evaluation of label files against references, with the paper's protocols.

A protocol names the regions scored (spec section 5): each region is a set of labels, so BraTS's
whole tumour is ``{1, 2, 3}``. Means are over cases (NaN excluded: both masks empty), then over
regions. HD95 is missing (not zero) where exactly one mask is empty; the count is reported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import read_image
from ..parallel import parallel_map
from .metrics import compare_masks

SYNAPSE8 = {"spleen": [1], "right_kidney": [2], "left_kidney": [3], "gallbladder": [4], "liver": [6],
            "stomach": [7], "aorta": [8], "pancreas": [11]}  # fmt: skip
BTCV13 = {"spleen": [1], "right_kidney": [2], "left_kidney": [3], "gallbladder": [4], "esophagus": [5],
          "liver": [6], "stomach": [7], "aorta": [8], "inferior_vena_cava": [9], "portal_splenic_vein": [10],
          "pancreas": [11], "right_adrenal": [12], "left_adrenal": [13]}  # fmt: skip
PROTOCOLS: dict[str, dict[str, list[int]] | None] = {
    "labels": None,  # every foreground label found in the references (or declared in dataset.json)
    "synapse8": SYNAPSE8,
    "btcv13": BTCV13,
    "acdc": {"RV": [1], "MYO": [2], "LV": [3]},
    "brats": {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]},
}


def protocol_regions(protocol: str, labels: dict[str, int] | None = None,
                     present: Sequence[int] = ()) -> dict[str, list[int]]:
    """The regions of a protocol; ``labels`` protocol: names from ``labels`` (dataset.json) or the values found."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    regions = PROTOCOLS[protocol]
    if regions is not None:
        return regions
    if labels:
        return {name: [v] for name, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0}
    return {str(v): [int(v)] for v in sorted(set(present)) if v != 0}


def _case_job(name: str, gt_path: Path, pred_path: Path, regions: dict[str, list[int]],
              nsd_tolerance: float | None, official: bool) -> dict:
    gt, g_geom = read_image(gt_path)
    pred, p_geom = read_image(pred_path)
    if gt.shape != pred.shape:
        raise UserError(f"{pred_path}: shape {pred.shape} differs from the reference {gt_path} {gt.shape}")
    if why := g_geom.mismatch(p_geom):
        raise UserError(f"{pred_path}: geometry differs from the reference {gt_path}: {why}")
    for arr, path in ((gt, gt_path), (pred, pred_path)):
        if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
            raise UserError(f"{path}: holds non-integer values; a label map is needed (probabilities? threshold "
                             "or arg-max them first)")
    gt, pred = gt.astype(np.int64), pred.astype(np.int64)
    spacing = g_geom.spacing_zyx
    out = {}
    for region, labs in regions.items():
        m = compare_masks(np.isin(pred, labs), np.isin(gt, labs), spacing, nsd_tolerance, official)
        out[region] = {"dice": m.dice, "hd95": m.hd95, "status": m.status,
                       "pred_voxels": m.pred_voxels, "ref_voxels": m.gt_voxels}
        if m.nsd is not None:
            out[region]["nsd"] = m.nsd
    return {"case": name, "reference": str(gt_path), "prediction": str(pred_path), "regions": out}


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def evaluate_pairs(
    pairs: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]],
    regions: dict[str, list[int]],
    nsd_tolerance: float | None = None,
    official: bool = False,
    workers: int = 1,
) -> dict:
    """Score ``(case, reference, prediction)`` triples on ``regions``; returns the summary dict."""
    jobs = [(n, Path(g), Path(p), regions, nsd_tolerance, official) for n, g, p in pairs]
    cases = parallel_map(_case_job, jobs, workers)
    mean = {}
    for region in regions:
        rows = [c["regions"][region] for c in cases]
        entry = {
            "dice": _nanmean([r["dice"] for r in rows]),
            "hd95": _nanmean([r["hd95"] for r in rows]),
            "cases": len(rows),
            "both_empty": sum(r["status"] == "both_empty" for r in rows),
            "hd95_missing": sum(r["status"] in ("pred_empty", "gt_empty") for r in rows),
        }
        if nsd_tolerance is not None:
            entry["nsd"] = _nanmean([r["nsd"] for r in rows])
        mean[region] = entry
    summary = {
        "units": "HD95 in voxels (official compatibility)" if official else "HD95 in millimetres",
        "compat": "official" if official else None,
        "regions": {k: list(v) for k, v in regions.items()},
        "mean_dice": _nanmean([m["dice"] for m in mean.values()]),
        "mean_hd95": _nanmean([m["hd95"] for m in mean.values()]),
        "mean": mean,
        "cases": cases,
    }
    if nsd_tolerance is not None:
        summary["nsd_tolerance_mm"] = nsd_tolerance
        summary["mean_nsd"] = _nanmean([m["nsd"] for m in mean.values()])
    return summary


def print_table(summary: dict) -> str:
    """A fixed-width table of the per-region means."""
    nsd = "mean_nsd" in summary
    unit = "vox" if summary.get("compat") == "official" else "mm"
    head = f"{'region':<22}{'Dice':>8}{'HD95 ' + unit:>11}" + (f"{'NSD':>8}" if nsd else "") + \
        f"{'cases':>7}{'empty':>7}{'no HD':>7}"
    lines = [head, "-" * len(head)]
    for region, m in summary["mean"].items():
        lines.append(f"{region:<22}{m['dice']:>8.4f}{m['hd95']:>11.2f}" + (f"{m['nsd']:>8.4f}" if nsd else "")
                     + f"{m['cases']:>7}{m['both_empty']:>7}{m['hd95_missing']:>7}")
    lines.append(f"{'mean':<22}{summary['mean_dice']:>8.4f}{summary['mean_hd95']:>11.2f}"
                 + (f"{summary['mean_nsd']:>8.4f}" if nsd else ""))
    return "\n".join(lines)
