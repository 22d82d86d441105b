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
COMMANDS = ["info", "discover", "features", "export", "evaluate", "curves", "agreement", "train_saes", "finetune_saes"]


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
        set_threads(getattr(args, "threads", None))
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"featcircuits: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from tqdm import tqdm

        # tqdm.write: on a line of its own, not glued to a progress bar the interrupt left open
        tqdm.write(f"featcircuits: {interrupted_message(args)}", file=sys.stderr)
        return 130


def set_threads(threads: int | None) -> None:
    """``--threads`` of any command, applied here once."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def interrupted_message(args: argparse.Namespace) -> str:
    """``interrupted after <stage> chunk <k>; rerun with --resume to continue`` when this run's
    checkpoint is in --out (Ctrl-C: the one place that reports it)."""
    from pathlib import Path

    from . import checkpoint

    last, out = checkpoint.LAST_SAVED, getattr(args, "out", None)
    if last is not None and out is not None and Path(out).resolve() == last[0].resolve() \
            and (last[0] / ".checkpoint").is_dir():
        return f"interrupted after {last[1]} chunk {last[2]} (checkpointed); rerun with --resume to continue"
    if last is not None:
        return f"interrupted after {last[1]} chunk {last[2]}; its checkpoint was in a temporary folder " \
               "(--overwrite): the old --out is unchanged"
    return f"interrupted during {args.command} before any checkpoint; nothing to resume"


if __name__ == "__main__":
    sys.exit(main())
