"""``fieldscope`` entry point.

Each package contributes its subcommands through a ``cli`` module with a
``register(subparsers)`` function. Those modules must stay light (no TensorFlow
at import time) so that ``fieldscope --help`` is instant and works on a Pi that
has only ``fieldscope[edge]``; heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# The packages that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "fieldscope.edge.cli",
    "fieldscope.edge.segment_cli",
    "fieldscope.train.cli",
    "fieldscope.convert.cli",
    "fieldscope.deploy.cli",
    "fieldscope.collect.cli",
    "fieldscope.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """Assemble the parser from every package's ``register`` function."""
    parser = argparse.ArgumentParser(
        prog="fieldscope",
        description="Species identification on a Raspberry Pi microscope: "
        "train, convert, deploy, classify, collect.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a package that has no cli module yet is skipped; a missing third-party
            # import inside a cli module is a bug, because cli modules must stay light.
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; expected failures print one line and return a non-zero code."""
    from fieldscope.edge.errors import FieldscopeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_native_libraries()
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
    except FieldscopeError as exc:
        _say(f"fieldscope {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say(f"fieldscope {args.command}: interrupted")
        return 130
    return int(result or 0)


def _quiet_native_libraries() -> None:
    """Without -v, TensorFlow's C++ log (also its "E0000 cuInit" on machines without a
    GPU) and OpenCV's codec warnings (a TIFF_Warning per odd TIFF tag, by the hundred
    when training on real TIFFs) stay off the terminal. Set before either library is
    imported (the command modules are light), inherited by child processes; a value
    the user exported wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


def _say(line: str) -> None:
    """One line to stderr; a terminal that went away (EIO) or a closed pipe must not turn
    an orderly exit code into a traceback."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
