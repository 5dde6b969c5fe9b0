"""``unetrpp bench``: forward, training step, EPA scaling and sliding-window figures, with the machine."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..runtime import AMP_MODES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="speed and memory benchmarks (forward, training step, EPA scaling, sliding window)",
        description="Medians over repeated runs after warm-up, each measurement in its own process (so its "
                    "peak memory is its own), recorded with the machine, torch version and thread count. "
                    "Prints a line per figure; --json writes the full record.")
    p.add_argument("--preset", default="synapse", help="network preset (default synapse)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--what", default="rates,forward,train",
                   help="comma-separated: rates, forward, train, epa, sliding, maxbatch (default rates,forward,train)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default 5; training: half)")
    p.add_argument("--amp", choices=AMP_MODES, default="off", help="autocast (CUDA; default off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the training step")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"), help="another patch size")
    p.add_argument("--batch", type=int, default=2, help="training batch (default 2)")
    p.add_argument("--epa-dims", default="32,64,128,256", help="channels C for --what epa")
    p.add_argument("--epa-tokens", default="4096,8192,16384,32768,65536", help="token counts N for --what epa")
    p.add_argument("--epa-kinds", default="epa,mhsa", help="attentions for --what epa (default epa,mhsa)")
    p.add_argument("--epa-rounds", type=int, default=1,
                   help="repeat the EPA sweep; each point keeps its fastest round (default 1)")
    p.add_argument("--epa-max-seconds", type=float, default=20.0,
                   help="skip an attention point predicted to take longer than this per run (default 20)")
    p.add_argument("--volume", nargs=3, type=int, default=[148, 256, 256], metavar=("Z", "Y", "X"),
                   help="volume for --what sliding (default 148 256 256)")
    p.add_argument("--tta", choices=("off", "on", "both"), default="both", help="mirroring for --what sliding")
    p.add_argument("--monai", action="store_true",
                   help="also time MONAI's sliding_window_inference driving the same network (needs monai)")
    p.add_argument("--no-tune", action="store_true", help="leave glibc's allocator as it is")
    p.add_argument("--json", type=Path, help="write the full record here")
    p.add_argument("--plot", type=Path, help="with --what epa: write the scaling plot (PNG) here")
    p.set_defaults(run=run)


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise UserError(f"{name} must be comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from ..bench import ChildError, plot_epa, print_summary, run_suite
    from ..io import write_json
    from ..runtime import resolve_device

    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    resolve_device(args.device, kinds=("cpu", "cuda"))  # one line for an unknown device or missing CUDA
    tta = {"off": (False,), "on": (True,), "both": (False, True)}[args.tta]
    try:
        record = run_suite(
            whats, preset=args.preset, device=args.device, threads=args.threads, repeats=args.repeats,
            amp=args.amp, compile_=args.compile, checkpointing=args.checkpointing, patch=args.patch_size,
            train_batch=args.batch, dims=_ints(args.epa_dims, "--epa-dims"),
            tokens=_ints(args.epa_tokens, "--epa-tokens"), epa_max_seconds=args.epa_max_seconds,
            epa_kinds=[k for k in args.epa_kinds.split(",") if k], epa_rounds=args.epa_rounds,
            volume=args.volume, tta=tta, monai=args.monai, tune=not args.no_tune,
        )
    except ChildError as e:  # a failed measurement: its one-line reason, not a traceback
        raise UserError(str(e)) from None
    print_summary(record)
    if args.json:
        write_json(record, args.json)
        print(f"wrote {args.json}")
    if args.plot and "epa" in record["results"]:
        plot_epa(record["results"]["epa"], args.plot)
        print(f"wrote {args.plot}")
    elif args.plot:
        print("--plot: nothing to plot without --what epa")
    return 0
