"""The options every speed benchmark shares: the model, the r values and batch sizes
to time, how many rounds, and the thread count."""
from __future__ import annotations

import argparse

import torch


def ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def speed_parser(description: str, runs_at_batch_1: int) -> argparse.ArgumentParser:
    """A parser with the shared options; ``runs_of`` turns its ``--runs`` into a count
    per batch size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", type=ints, default=[8, 13, 16], help="comma-separated r values (default: 8,13,16)")
    parser.add_argument("--batch-sizes", type=ints, default=[32, 1], help="comma-separated (default: 32,1)")
    parser.add_argument("--runs", type=int,
                        help=f"timed rounds (default: 10 at batch > 1, {runs_at_batch_1} at batch 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.set_defaults(runs_at_batch_1=runs_at_batch_1)
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, with torch's thread count set from ``--threads``."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def runs_of(args: argparse.Namespace, batch_size: int) -> int:
    """Timed rounds at ``batch_size``: ``--runs``, or more rounds of the short batch-1 calls."""
    return args.runs or (args.runs_at_batch_1 if batch_size == 1 else 10)
