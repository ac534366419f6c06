"""The ``tokenmerge`` command."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence

import torch

from . import __version__
from . import schedule as schedules

DEFAULT_MODEL = "vit_small_patch16_224"


def parse_sweep(text: str) -> list[schedules.Schedule]:
    """A comma-separated sweep of schedules: ``"0,8,13,16,decreasing:13"``."""
    try:
        return [schedules.parse(item) for item in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="throughput and GFLOPs for a sweep of r against the unpatched model",
        description="Measure tokens left, GFLOPs per image, images per second and speed-up over the "
        "unpatched model, all in one interleaved run.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", help="local weights file for the model (default: random weights)")
    parser.add_argument("--r", default="0,8,13,16", type=parse_sweep,
                        help="comma-separated schedules: ints, 'decreasing:R', 'increasing:R', 'linear:R:SLOPE' "
                        "or per-block lists '8/8/4/...' (default: 0,8,13,16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=8, help="timed rounds per setting (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from .bench import benchmark, format_table
    from .models import create_timm_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_timm_model(args.model, args.checkpoint)
    import timm

    print(
        f"{args.model}, batch {args.batch_size}, float32 on cpu, {torch.get_num_threads()} threads; "
        f"{args.runs} timed rounds after {args.warmup} warm-up, medians; "
        f"tokenmerge {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
        f"python {platform.python_version()}",
        flush=True,
    )
    rows = benchmark(model, args.r, batch_size=args.batch_size, runs=args.runs, warmup=args.warmup)
    print(format_table(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmerge", description="Token Merging for Vision Transformers")
    parser.add_argument("--version", action="version", version=f"tokenmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"tokenmerge {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
