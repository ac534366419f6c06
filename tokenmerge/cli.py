"""The ``tokenmerge`` command: ``bench``, ``eval``, ``compare`` and ``visualize``.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``;
the parser it adds sets ``run`` to the function that carries it out.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__
from . import schedule as schedules

DEFAULT_MODEL = "vit_small_patch16_224"
SUBCOMMAND_MODULES = ("tokenmerge.bench", "tokenmerge.evaluate", "tokenmerge.compare", "tokenmerge.visualize",
                      "tokenmerge.train")


def parse_sweep(text: str) -> list[schedules.Schedule]:
    """A comma-separated sweep of schedules: ``"0,8,13,16,decreasing:13"``."""
    try:
        return [schedules.parse(item) for item in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_schedule(text: str) -> schedules.Schedule:
    """One schedule: ``"13"``, ``"decreasing:13"``, ``"8/8/4/..."``."""
    try:
        return schedules.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


SWEEP_HELP = (
    "comma-separated schedules: ints, 'decreasing:R', 'increasing:R', 'linear:R:SLOPE' "
    "or per-block lists '8/8/4/...'"
)


def add_model_arguments(
    parser: argparse.ArgumentParser, default_model: Optional[str] = DEFAULT_MODEL, libraries: bool = True
) -> None:
    """``--library``, ``--model`` and ``--checkpoint``, the same in every subcommand."""
    from .models import LIBRARIES

    if libraries:
        parser.add_argument("--library", choices=LIBRARIES, default="timm",
                            help="the library the model comes from (default: timm)")
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="model name in its library: timm or torchvision model name, open_clip architecture, "
                        "transformers hub name or local folder" + (f" (default: {default_model})" if default_model else ""))
    parser.add_argument("--checkpoint", help="local weights: a file (timm: loaded through the model's pretrained config; "
                        "torchvision: a state dict; open_clip: a checkpoint), or for transformers a folder written by "
                        "save_pretrained (default: random weights)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmerge", description="Token Merging for Vision Transformers")
    parser.add_argument("--version", action="version", version=f"tokenmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"tokenmerge {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
