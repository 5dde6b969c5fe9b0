"""The worker entry point: ``python -m unetrpp.bench --worker SPEC`` runs one measurement and prints
its ``RESULT {json}`` line (``unetrpp bench`` starts one such process per figure)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .harness import emit_result
from .measure import run_measurement


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unetrpp.bench")
    parser.add_argument("--worker", required=True, help="the measurement, as JSON (see run_measurement)")
    args = parser.parse_args(argv)
    emit_result(run_measurement(json.loads(args.worker)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
