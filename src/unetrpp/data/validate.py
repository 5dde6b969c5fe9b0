"""Label maps checked against the values ``dataset.json`` declares (``check``, ``plan``, ``preprocess``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from ..errors import UserError
from ..io import read_json
from .layout import Case

#: How many offending values an error message lists.
SHOWN = 5


def _fmt_values(values: np.ndarray) -> str:
    out = []
    for v in values.tolist():
        out.append(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return "[" + ", ".join(out) + "]"


def label_problem(label: np.ndarray, declared: Iterable[int]) -> str | None:
    """What is wrong with the values of ``label`` (non-integer or not in ``declared``), or None.

    One ``np.unique`` over the voxels: no table is sized by the largest value, so 1e9 costs no memory.
    """
    declared = sorted({int(v) for v in declared})
    values = np.unique(np.asarray(label))
    if np.issubdtype(values.dtype, np.floating):
        bad = values[~np.isfinite(values)]
        if bad.size:
            return f"NaN/inf values; dataset.json declares {declared}"
        bad = values[values != np.round(values)]
        if bad.size:
            more = f" and {bad.size - SHOWN} more" if bad.size > SHOWN else ""
            return f"non-integer values {_fmt_values(bad[:SHOWN])}{more}; dataset.json declares {declared}"
    # compared as float64: exact for every declared value, and a huge value never rounds onto one
    unknown = values[~np.isin(values.astype(np.float64), np.asarray(declared, dtype=np.float64))]
    if not unknown.size:
        return None
    more = f" and {unknown.size - SHOWN} more" if unknown.size > SHOWN else ""
    return f"values {_fmt_values(unknown[:SHOWN])}{more} not declared in dataset.json {declared}"


def require_declared_labels(label: np.ndarray, path: str | os.PathLike, declared: Iterable[int]) -> None:
    """Raise a one-line ValueError naming ``path`` when ``label`` has values ``declared`` does not hold."""
    problem = label_problem(label, declared)
    if problem:
        raise UserError(f"{path}: label has {problem}")


def case_label_values(case: Case) -> list[int]:
    """The label values declared for ``case``: from the case, else from the ``dataset.json`` of its layout."""
    if case.label_values is not None:
        return list(case.label_values)
    if case.label is None:
        raise UserError(f"case {case.name}: no label file")
    meta = read_json(case.label.parent.parent / "dataset.json")
    return [int(v) for v in meta["labels"].values()]


def check_case_label(case: Case, label: np.ndarray) -> None:
    """:func:`require_declared_labels` for a dataset case (its label file and declared values)."""
    require_declared_labels(label, case.label, case_label_values(case))
