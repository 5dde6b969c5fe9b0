"""Postprocessing chosen on cross-validation: keep only the largest connected component.

nnU-Net's rule: first try keeping only the largest component of the whole foreground (all
classes as one region); then, on top of that decision, try keeping only the largest component of
each class on its own. Each step is adopted only where it raises the cross-validated Dice, and
the foreground step only if no class's Dice drops, so postprocessing never lowers the
cross-validated Dice of any class. Components are 26-connected (``connected-components-3d``).

``postprocessing.json``::

    {"format": "unetrpp-postprocessing", "version": 1, "foreground_as_one": false,
     "largest_component": [1, 3], "runs": [...], "cross_validation": {...}, "decisions": [...]}
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import UserError

FORMAT = "unetrpp-postprocessing"
VERSION = 1


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every 26-connected component but the largest removed (ties: the first found)."""
    import cc3d

    if not mask.any():
        return mask
    comps = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=26)
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    return comps == int(np.argmax(sizes))


def apply_postprocessing(label: np.ndarray, post: dict) -> np.ndarray:
    """``label`` after the postprocessing ``post`` (removed voxels become background)."""
    out = label
    if post.get("foreground_as_one"):
        fg = label > 0
        keep = keep_largest_component(fg)
        if (fg & ~keep).any():
            out = np.where(keep, label, 0).astype(label.dtype)
    for c in post.get("largest_component", []):
        mask = out == c
        keep = keep_largest_component(mask)
        drop = mask & ~keep
        if drop.any():
            out = out.copy() if out is label else out
            out[drop] = 0
    return out


def describe(post: dict) -> str:
    """One phrase: what ``post`` does."""
    parts = ["largest foreground component"] * bool(post.get("foreground_as_one"))
    if post.get("largest_component"):
        parts.append("largest component of class " + ", ".join(map(str, post["largest_component"])))
    return "; ".join(parts) or "none"


def check_postprocessing(post, source: str, labels: dict[str, int] | None = None) -> dict:
    """Validate a postprocessing description; a one-line ``ValueError`` naming ``source`` otherwise."""
    if not isinstance(post, dict) or post.get("format") != FORMAT:
        raise UserError(f"{source}: not a unetrpp postprocessing description (format {FORMAT!r})")
    version = post.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION or version < 1:
        raise UserError(f"{source}: unsupported postprocessing version {version!r}")
    if not isinstance(post.get("foreground_as_one", False), bool):
        raise UserError(f"{source}: foreground_as_one must be true or false")
    classes = post.get("largest_component", [])
    if not (isinstance(classes, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in classes)):
        raise UserError(f"{source}: largest_component must be a list of class values")
    if labels is not None:
        known = {int(v) for v in labels.values() if int(v) > 0}
        bad = [c for c in classes if c not in known]
        if bad:
            raise UserError(f"{source}: largest_component names classes {bad} the model does not predict")
    for key, kind, item in (("runs", list, str), ("decisions", list, str), ("class_names", dict, str),
                            ("cross_validation", dict, None)):
        value = post.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or (item is not None and not all(
                isinstance(v, item) for v in (value.values() if isinstance(value, dict) else value))):
            raise UserError(f"{source}: {key} must be a {kind.__name__}" + (f" of {item.__name__}s" if item else ""))
    cv = post.get("cross_validation")
    if cv is not None:
        check_cross_validation(cv, source)
    return post


def check_cross_validation(cv, source: str) -> dict:
    """The cross-validation summary's numbers must be numbers (or null), its per-class maps objects."""
    if not isinstance(cv, dict):
        raise UserError(f"{source}: cross_validation must be an object")
    for key in ("mean_dice_before", "mean_dice_after", "cases"):
        v = cv.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise UserError(f"{source}: cross_validation {key} must be a number, got {v!r}")
    for key in ("dice_before", "dice_after"):
        v = cv.get(key)
        if v is not None and not (isinstance(v, dict) and all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v.values())):
            raise UserError(f"{source}: cross_validation {key} must map classes to numbers")
    return cv


def read_postprocessing(path: str | os.PathLike, labels: dict[str, int] | None = None) -> dict:
    from ..io.jsonio import read_json

    return check_postprocessing(read_json(path), str(path), labels)


def _dice(pred: np.ndarray, ref: np.ndarray, classes: Iterable[int]) -> dict[int, float]:
    from ..evaluation.metrics import dice_score

    return {c: dice_score(pred == c, ref == c) for c in classes}


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def choose_postprocessing(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], classes: list[int],
                          log=None) -> tuple[dict, dict]:
    """Decide the postprocessing on cross-validation ``pairs`` of ``(case, reference, prediction)``.

    Returns ``(postprocessing, cross_validation)``: the decision (:func:`apply_postprocessing`'s
    input) and the per-class mean Dice before and after it, with the per-case values.
    """
    variants = ("raw", "fg", "raw+cc", "fg+cc")
    per_case: dict[str, dict[str, dict[int, float]]] = {}
    changed = {v: dict.fromkeys(classes, False) for v in variants}
    fg_changed = False
    for case, ref, pred in pairs:
        if ref.shape != pred.shape:
            raise UserError(f"{case}: prediction shape {pred.shape} differs from the reference's {ref.shape}")
        fg = apply_postprocessing(pred, {"foreground_as_one": True})
        fg_changed |= fg is not pred
        scores = {"raw": _dice(pred, ref, classes), "fg": _dice(fg, ref, classes),
                  "raw+cc": {}, "fg+cc": {}}
        for base, name in ((pred, "raw+cc"), (fg, "fg+cc")):
            for c in classes:
                mask = base == c
                keep = keep_largest_component(mask)
                if (mask & ~keep).any():
                    changed[name][c] = True
                scores[name][c] = _dice(np.where(mask & ~keep, 0, base), ref, [c])[c]
        per_case[case] = scores
    if not per_case:
        raise UserError("no validation predictions to choose postprocessing on")
    mean = {v: {c: _mean([s[v][c] for s in per_case.values()]) for c in classes} for v in variants}
    decisions = []

    def better(after: float, before: float) -> bool:
        return not math.isnan(after) and not math.isnan(before) and after > before + 1e-9

    def not_worse(after: float, before: float) -> bool:
        return math.isnan(before) or (not math.isnan(after) and after >= before - 1e-9)

    use_fg = fg_changed and all(not_worse(mean["fg"][c], mean["raw"][c]) for c in classes) and any(
        better(mean["fg"][c], mean["raw"][c]) for c in classes)
    decisions.append(f"whole foreground, largest component only: {'applied' if use_fg else 'not applied'} "
                     f"(mean Dice {_mean(list(mean['raw'].values())):.4f} -> {_mean(list(mean['fg'].values())):.4f})")
    base = "fg" if use_fg else "raw"
    cc = f"{base}+cc"
    chosen = []
    for c in classes:
        take = changed[cc][c] and better(mean[cc][c], mean[base][c])
        if take:
            chosen.append(c)
        decisions.append(f"class {c}, largest component only: {'applied' if take else 'not applied'} "
                         f"(Dice {mean[base][c]:.4f} -> {mean[cc][c]:.4f})")
    post = {"format": FORMAT, "version": VERSION, "foreground_as_one": bool(use_fg), "largest_component": chosen}
    after = {}
    for c in classes:
        after[c] = mean[cc][c] if c in chosen else mean[base][c]
    cv = {"cases": len(per_case),
          "dice_before": {str(c): mean["raw"][c] for c in classes},
          "dice_after": {str(c): after[c] for c in classes},
          "mean_dice_before": _mean(list(mean["raw"].values())), "mean_dice_after": _mean(list(after.values())),
          "per_case": {case: {"before": {str(c): s["raw"][c] for c in classes},
                              "after": {str(c): (s[cc][c] if c in chosen else s[base][c]) for c in classes}}
                       for case, s in per_case.items()}}
    post["decisions"] = decisions
    if log:
        for line in decisions:
            log(line)
    return post, cv


def write_cv_csv(cv: dict, names: dict[int, str], path: Path) -> Path:
    """The cross-validation summary as CSV: one row per case and a mean row, Dice before/after per class."""
    import csv
    import io

    from ..io.jsonio import atomic_write

    classes = list(cv["dice_before"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", *(f"{names.get(int(c), c)} {when}" for c in classes for when in ("before", "after"))])
    rows = [(case, v["before"], v["after"]) for case, v in sorted(cv["per_case"].items())]
    rows.append(("mean", cv["dice_before"], cv["dice_after"]))
    for case, before, after in rows:
        w.writerow([case, *(_fmt(x) for c in classes for x in (before[c], after[c]))])
    return atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6f}"
