"""``unetrpp demo``: the whole pipeline on a synthetic abdominal CT dataset, in about ten minutes."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="phantom CT -> plan -> preprocess -> train -> predict -> evaluate, in one folder",
        description="Makes a synthetic abdominal CT dataset, plans and preprocesses it, trains the synapse-style "
                    "network for a fixed number of steps (the expected time is printed first) on whatever device "
                    "is there, predicts the held-out cases, "
                    "scores them with the Synapse 8-organ protocol and leaves predictions, overlays, the "
                    "training curves and a summary in the output folder.")
    p.add_argument("--steps", type=int, default=600, help="training steps, in epochs of 25 (default 600)")
    p.add_argument("-o", "--out", default="unetrpp-demo", help="output folder (default ./unetrpp-demo)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--cases", type=int, default=24, help="training cases (default 24)")
    p.add_argument("--test-cases", type=int, default=4, help="held-out cases (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    from .demo_run import run_demo

    if args.steps < 25:
        raise UserError(f"--steps {args.steps}: the demo needs at least 25 steps")
    run_demo(args.out, steps=args.steps, cases=args.cases, test_cases=args.test_cases, device=args.device,
             seed=args.seed)
    return 0
