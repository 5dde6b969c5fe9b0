"""``unetrpp compare``: the paper-style table of several runs (cost, speed, accuracy, time) as Markdown, CSV, PNG."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare training runs: parameters, MACs, step time, memory, Dice/HD95, wall time",
        description="One row per run folder, in the order given: parameters (M) and multiply-adds (G MACs) of the "
                    "network at the run's patch (batch 1), one training step's time and peak memory on this "
                    "device (each measured in a process of its own), mean Dice and HD95 per region (from the "
                    "run's validation/summary.json, or from --evaluation), epochs, steps and the training's wall "
                    "time. Writes OUT/comparison.md, comparison.csv and comparison.png (mean Dice against MACs, "
                    "bubble area proportional to parameters). A run whose network does not build keeps its row, "
                    "with those columns blank and a note.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="training run folder (holds checkpoint_final.pt)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="folder for the table files")
    p.add_argument("--evaluation", action="append", default=[], metavar="RUN=PATH",
                   help="take RUN's accuracy from PATH (an evaluation.json of `unetrpp evaluate`, or its folder) "
                        "instead of its validation; RUN as given or its folder name; repeatable")
    p.add_argument("--no-measure", action="store_true",
                   help="do not time a training step (the step and memory columns say 'not measured')")
    p.add_argument("--device", default="auto", help="where to time the step: auto (default), cpu, cuda, cuda:N")
    p.add_argument("--amp", default="auto", help="mixed precision of the step: auto (default: bf16/fp16 on CUDA, "
                                                 "off on the CPU), off, bf16, fp16")
    p.add_argument("--batch", type=int, metavar="N", help="time the step at this batch (default: each run's)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import UserError
    from ..io.jsonio import check_writable
    from ..report.compare import compare_runs, comparison_markdown, machine_line, write_comparison

    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    check_writable(args.out, "the comparison")  # before any network is built or measured
    rows = compare_runs(args.runs, args.evaluation, measure=not args.no_measure, device=args.device,
                        amp=args.amp, batch=args.batch, log=lambda line: print(f"compare: {line}", flush=True))
    measured = sorted({r.device for r in rows if r.measured})
    context = {"machine": "; ".join(machine_line(d) for d in measured)} if measured else {}
    paths = write_comparison(rows, args.out, context)
    print(comparison_markdown(rows, context).split("\n## Sources")[0].rstrip())
    print(f"\nwrote {paths['md']}, {paths['csv']} and {paths['png']}")
    return 0
