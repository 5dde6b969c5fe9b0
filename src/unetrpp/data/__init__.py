"""Datasets: layouts, converters, checks, planning, preprocessing and its inverse, the phantom (no torch).

The names below are imported on first use, so a command that needs one module does not load them all.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {
    "Case": "layout", "Dataset": "layout", "load_splits": "layout",
    "Problem": "check", "check_dataset": "check",
    "convert_acdc": "convert", "convert_msd": "convert", "convert_synapse": "convert",
    "Plans": "plans",
    "load_plans": "plan", "make_plans": "plan", "plan_dataset": "plan",
    "load_case": "preprocess", "preprocess_array": "preprocess", "preprocess_dataset": "preprocess",
    "CaseProperties": "restore",
    "make_phantom_dataset": "phantom",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
