"""The ``tokenmerge`` command: ``bench``, ``eval``, ``compare``, ``tune``, ``visualize``, ``train`` and
``export``.

Each command lives in its own module, which provides ``add_parser(subparsers)``; the
parser it adds sets ``run`` to the function that carries it out. A mistake in what
the user asked for (a ``ValueError`` or ``OSError`` from the checks before the work)
is one line on stderr and exit status 2; anything else is a bug and keeps its
traceback. ``--debug`` or ``TOKENMERGE_DEBUG=1`` shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional

from tokenmerge import __version__

from .options import debugging

COMMANDS = ("bench", "evaluate", "compare", "tune", "visualize", "train", "export")
#: What a user's mistake raises; any other exception is a bug in tokenmerge.
USER_ERRORS = (ValueError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmerge", description="Token Merging for Vision Transformers")
    parser.add_argument("--version", action="version", version=f"tokenmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"tokenmerge.tools.{name}").add_parser(subparsers)
    for command in subparsers.choices.values():
        command.add_argument("--debug", action="store_true",
                             help="show the traceback of an error (also: TOKENMERGE_DEBUG=1)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        if debugging(args):
            raise
        print(f"tokenmerge {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
