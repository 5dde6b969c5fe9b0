"""Reading finished work back: the comparison table of several runs (``compare``) and the HTML report (``report``).

The names below are imported on first use (the report does not load torch; the comparison does).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {
    "RunSummary": "compare", "collect_run": "compare", "compare_runs": "compare", "read_accuracy": "compare",
    "write_comparison": "compare",
    "ReportSection": "html", "load_section": "html", "write_report": "html",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
