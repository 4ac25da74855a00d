"""`auditor` command line: argparse -> config -> library call. Only this package prints.

Each subcommand lives in its own module with a `register(subparsers)` that sets `handler`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from auditor.errors import AuditorError

# Module names under auditor.cli, in the order `auditor --help` lists them.
COMMAND_MODULES = ("score", "explain", "toy", "evaluate", "calibrate", "audit", "report", "filter")

DESCRIPTION = """\
Find memorization-prone captions in text-to-image training data.

The score is the first-step text-conditional noise magnitude of Wen et al. (ICLR 2024):
|| eps(x_T, t1, E(caption)) - eps(x_T, t1, E("")) ||_2, high for captions a model memorized.
"""

EPILOG = """\
examples:
  auditor score --model ./toy-model "a photo of a cat" "mona lisa by leonardo"
  auditor <command> --help      options of one command
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auditor",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"auditor.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except AuditorError as exc:
        print(f"auditor {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "EXIT_CODE", 2)


if __name__ == "__main__":
    sys.exit(main())
