"""``unetrpp`` entry point: subcommands, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import re
import sys

from .. import __version__
from ..errors import UserError
from . import (
    bench,
    check,
    compare,
    convert,
    convert_weights,
    demo,
    evaluate,
    export,
    export_model,
    find_best,
    import_official,
    info,
    overlay,
    phantom,
    plan,
    predict,
    preprocess,
    report,
    show_model,
    train,
)

COMMANDS = (demo, info, convert_weights, convert, check, plan, preprocess, phantom, train, predict, evaluate, overlay,
            export, find_best, export_model, import_official, show_model, bench, compare, report)


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
_WORKER_DIED = re.compile(r"process in the process pool was terminated abruptly|DataLoader worker \(pid.*\) is killed"
                          r"|DataLoader worker \(pid.*\) exited unexpectedly")


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
        # the user's files or settings; any other error is a bug and keeps its traceback
        if args.debug or not (isinstance(e, (UserError, OSError)) or _from_loader_worker(e)):
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:  # e.g. a full disk: name the file
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = _user_message(e)
        print(f"unetrpp {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # out of memory, a worker killed by the system, a symlink loop: the user's machine or files, not a bug
        text = str(e).strip()
        if args.debug:
            raise
        if isinstance(e, MemoryError) or _OUT_OF_MEMORY.search(text):
            msg = (f"out of memory: {_user_message(e)[:300]} (a smaller patch or batch, fewer workers, or more "
                   "memory; --debug shows the traceback)")
        elif _WORKER_DIED.search(text):
            msg = (f"a worker process died ({_user_message(e)[:200]}); the system may have run out of memory: "
                   "try fewer --workers (--debug shows the traceback)")
        elif "Symlink loop" in text:
            msg = f"{_user_message(e)} (--debug shows the traceback)"
        else:
            raise
        print(f"unetrpp {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _from_loader_worker(e: BaseException) -> bool:
    """A ``ValueError`` re-raised by a data-loading worker: such a worker only reads the user's files."""
    return str(e).lstrip().startswith("Caught ") and "worker process" in str(e).split("\n", 1)[0]


def _user_message(e: BaseException) -> str:
    """The first line of an error; for one re-raised from a data-loading worker, the original error's line."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines[0].startswith("Caught ") and "worker process" in lines[0] and len(lines) > 1:
        last = lines[-1]  # "ValueError: /data/case_seg.npy: unreadable ..."
        head, sep, rest = last.partition(": ")
        return rest if sep and head.isidentifier() else last
    return lines[0]

if __name__ == "__main__":
    sys.exit(main())
