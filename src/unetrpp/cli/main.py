"""``unetrpp`` entry point: subcommands, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import (
    bench,
    check,
    convert,
    convert_weights,
    demo,
    evaluate,
    export,
    info,
    overlay,
    phantom,
    plan,
    predict,
    preprocess,
    train,
)

COMMANDS = (demo, info, convert_weights, convert, check, plan, preprocess, phantom, train, predict, evaluate, overlay,
            export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unetrpp", description="UNETR++ for 3D medical image segmentation."
    )
    parser.add_argument("--version", action="version", version=f"unetrpp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("unetrpp: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"unetrpp {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
