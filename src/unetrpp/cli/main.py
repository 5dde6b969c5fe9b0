"""``unetrpp`` entry point: subcommands, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import re
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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory|Unable to allocate", re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("unetrpp: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:  # e.g. a full disk: name the file
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"unetrpp {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # out of memory (numpy's MemoryError, torch's allocator errors) is the user's machine, not a bug
        text = str(e).strip()
        if args.debug or not (isinstance(e, MemoryError) or _OUT_OF_MEMORY.search(text)):
            raise
        first = text.splitlines()[0] if text else "MemoryError"
        print(f"unetrpp {args.command}: error: out of memory: {first[:300]} (a smaller patch or batch, fewer "
              "workers, or more memory; --debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
