"""``unetrpp demo``: the whole pipeline on a synthetic abdominal CT dataset, in about ten minutes."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="phantom CT -> plan -> preprocess -> train -> predict -> evaluate, in one folder",
        description="Makes a synthetic abdominal CT dataset, plans and preprocesses it, trains the synapse-style "
                    "network for the time budget on whatever device is there, predicts the held-out cases, "
                    "scores them with the Synapse 8-organ protocol and leaves predictions, overlays, the "
                    "training curves and a summary in the output folder.")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for everything (default 10)")
    p.add_argument("-o", "--out", default="unetrpp-demo", help="output folder (default ./unetrpp-demo)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--cases", type=int, default=24, help="training cases (default 24)")
    p.add_argument("--test-cases", type=int, default=4, help="held-out cases (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo

    if args.minutes < 2:
        raise ValueError(f"--minutes {args.minutes:g}: the demo needs at least 2 minutes")
    run_demo(args.out, minutes=args.minutes, cases=args.cases, test_cases=args.test_cases, device=args.device,
             seed=args.seed)
    return 0
