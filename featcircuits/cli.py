"""The ``featcircuits`` command line. Each subcommand lives in ``featcircuits/commands/``
and registers itself with ``register(subparsers)``; a user mistake (``UserError``) prints
one line and exits with code 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# One module per subcommand, in the order --help lists them.
COMMANDS = ["info", "discover", "features", "export", "evaluate", "curves", "agreement"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featcircuits",
        description="Sparse feature circuit discovery with RelP and Integrated Gradients.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"featcircuits.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"featcircuits: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featcircuits: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
