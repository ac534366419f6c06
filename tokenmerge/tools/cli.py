"""The ``tokenmerge`` command: ``bench``, ``eval``, ``compare``, ``tune``, ``visualize``, ``train``,
``export``, ``agree`` and ``fidelity``.

Each command lives in its own module, which provides ``add_parser(subparsers)``; the
parser it adds sets ``run`` to the function that carries it out. Only the module of
the command asked for is imported (and with it torch): ``tokenmerge --help`` and
``--version`` list the commands from :data:`COMMANDS` alone, at once. A mistake in what
the user asked for (a ``ValueError`` or ``OSError`` from the checks before the work,
or a file an option names that cannot be used) is one line on stderr and exit status
2; anything else is a bug and keeps its traceback. ``--debug`` or
``TOKENMERGE_DEBUG=1`` shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Optional

from tokenmerge import __version__

from .messages import UnusableFile

#: Every command: the module that implements it, and its line in ``tokenmerge --help``
#: (which the module's own parser repeats).
COMMANDS = {
    "bench": ("bench", "speed and GFLOPs for a sweep of r against the unpatched model"),
    "eval": ("evaluate", "top-1/top-5 accuracy and throughput on an image folder for a sweep of r"),
    "compare": ("compare", "merging against pruning and against merging's ablations, accuracy against measured speed"),
    "tune": ("tune", "find the r schedule that keeps the model closest to its unmerged outputs at a target speed"),
    "visualize": ("visualize", "paint which patches merge into the same token"),
    "train": ("train",
              "fine-tune a timm model with token merging on an image folder, on one process or under torchrun"),
    "export": ("export", "write a model with token merging to an ONNX file, checked in ONNX Runtime"),
    "agree": ("agree", "how often a vision-language model with fewer visual tokens answers as the full one, and how "
              "much sooner"),
    "fidelity": ("fidelity", "how close a diffusion pipeline's images stay with token merging, from the same seeds, "
                 "and how much sooner they come"),
}
#: What a user's mistake raises; any other exception is a bug in tokenmerge.
USER_ERRORS = (ValueError, OSError, ImportError)


def asked_command(argv: Sequence[str]) -> str:
    """The command ``argv`` names: its first word that is not an option ("" if none)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser of ``tokenmerge``: with ``argv``, complete for the command it names
    and a one-line entry for the others; without, complete for every command."""
    asked = None if argv is None else asked_command(argv)
    parser = argparse.ArgumentParser(prog="tokenmerge", description="Token Merging for Vision Transformers")
    parser.add_argument("--version", action="version", version=f"tokenmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module, summary) in COMMANDS.items():
        if asked is None or asked == name:
            importlib.import_module(f"tokenmerge.tools.{module}").add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    for command in subparsers.choices.values():
        command.add_argument("--debug", action="store_true",
                             help="show the traceback of an error (also: TOKENMERGE_DEBUG=1)")
    return parser


def debugging(debug: bool = False) -> bool:
    """Whether errors show their traceback: ``--debug`` (``debug``) or ``TOKENMERGE_DEBUG=1``."""
    return debug or os.environ.get("TOKENMERGE_DEBUG", "") not in ("", "0")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command ``argv`` (default: the process's arguments) names; its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except UnusableFile as error:
        return refuse(asked_command(argv), error, "--debug" in argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        return refuse(args.command, error, args.debug)
    return 0


def refuse(command: str, error: Exception, debug: bool) -> int:
    """Say a user's mistake in one line on stderr and return the exit status 2; raise
    it again, with its traceback, when debugging (see :func:`debugging`)."""
    if debugging(debug):
        raise error
    print(f"tokenmerge {command}: error: {error}", file=sys.stderr)
    return 2
