"""``tokenmerge tune``: the r schedule (one r per block) and the method that keep a
model closest to its unmerged outputs on calibration images while meeting a target:
a speed-up measured on this device, a FLOP budget or a latency.

How it searches, so that it is cheap enough to need no resuming:

1. **What a FLOP costs here.** The unpatched model and four constant schedules are
   timed interleaved; a line through their (FLOPs, seconds) points turns a target
   speed-up or latency into a FLOP budget per image.
2. **Shapes.** For every method, schedules that change linearly over depth (merging
   early, evenly or late) are scaled to the budget and scored: the mean KL
   divergence of their outputs from the unmerged model's on the calibration images
   (labels are never needed).
3. **Moves.** From the best, merges are moved between two blocks (and the schedule
   refitted to the budget) and kept when the divergence falls, until no move helps or
   ``--budget-minutes`` runs out.
4. **Measured.** The best schedule is timed against the unpatched model; if the
   speed-up or latency misses the target, the FLOP line is corrected through the
   measured point and the schedule refitted, a few times.

This module is the command; the targets, the search, the measuring and the
:class:`~tokenmerge.tools.tuning.tuner.TuneResult` the file is written from live in
:mod:`tokenmerge.tools.tuning`. The schedule file holds ``{"r": [...], "method",
"prop_attn", "measured_speedup", "target", ...}`` and the environment; every command
reads it as ``--r @FILE`` and Python as
``tokenmerge.apply(model, r=tokenmerge.load_schedule(FILE))``.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tokenmerge import methods
from tokenmerge.adapters import find_adapter

from . import options
from .cli import COMMANDS
from .data import TolerantImageFiles, balanced_subset, collate_readable, folder_samples
from .files import Place, check_apart, check_output_path, write_text
from .models import load_model, require_images, unwrap
from .reports import environment
from .settings import merging, variant, variants
from .timing import speed_warnings
from .tuning.search import Space
from .tuning.targets import Target
from .tuning.tuner import tune

DEFAULT_METHODS = ("tome", "tome-attended")


def parse_speedup(text: str) -> float:
    value = _positive_float(text, "--speedup")
    if value <= 1:
        raise argparse.ArgumentTypeError(f"a speed-up must be more than 1 (the unpatched model is 1), got {text}")
    return value


def parse_flops(text: str) -> Target:
    """GFLOPs per image (``1.2``) or a share of the unpatched model's (``60%``)."""
    if not text.endswith("%"):
        return Target("flops", _positive_float(text, "--flops"))
    share = _positive_float(text[:-1], "--flops") / 100
    if share >= 1:
        raise argparse.ArgumentTypeError(f"--flops {text}: a share of the unpatched model's FLOPs below 100%")
    return Target("flops_share", share)


def parse_latency(text: str) -> float:
    return _positive_float(text, "--latency-ms")


def parse_minutes(text: str) -> float:
    """A search budget: minutes the clock can count down, so neither 0 nor infinite."""
    return _positive_float(text, "--budget-minutes")


def _positive_float(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{option}: expected a finite number, got {text}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{option}: expected a positive number, got {text}")
    return value


def calibration_images(args: argparse.Namespace, found: list[tuple[Path, int]], transform: Callable) -> torch.Tensor:
    """The decoded calibration images: ``--images`` of the image files ``found`` in
    ``--data``, after saying how many it holds; unreadable files are left out with a note."""
    samples = balanced_subset(found, args.images, args.seed)
    sample = f" (a sample of {len(found)}, seed {args.seed})" if len(samples) < len(found) else ""
    print(f"{args.model}: calibrating on {len(samples)} image files{sample} in {args.data}", flush=True)
    loader = DataLoader(TolerantImageFiles(samples, transform), batch_size=64, collate_fn=collate_readable)
    batches, unreadable = [], []
    for batch in loader:
        unreadable += batch.unreadable
        if batch.images is not None:
            batches.append(batch.images)
    if unreadable:
        options.note("tune", f"{len(unreadable)} unreadable images left out: "
                     f"{', '.join(item.path for item in unreadable)}")
    if not batches:
        raise ValueError(f"none of the {len(samples)} images in {args.data} could be read")
    return torch.cat(batches)


def check_names(names: Sequence[str], num_protected: int) -> list[str]:
    """The variants to search: merging ones only (pruning loses more), those that need
    a class token only where there is one."""
    merges = [name for name in names if merging(name)]
    if not merges:
        raise ValueError(f"--methods {','.join(names)}: tune searches merging methods; give some of "
                         f"{', '.join(n for n in variants() if merging(n))}")
    usable = [name for name in merges if num_protected >= 1 or not methods.resolve(variant(name)[0]).needs_class_token]
    if not usable:
        raise ValueError(f"{', '.join(merges)} need a class token, and the model has none; give --methods tome")
    return usable


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help=COMMANDS["tune"][1],
        description="Search per-block r schedules (and the merging method) for the one that keeps the model "
        "closest to its unmerged outputs on unlabelled calibration images (mean KL divergence), at a speed-up "
        "measured on this device, a FLOP budget or a latency, and write it to a JSON file that every command "
        "reads as --r @FILE.",
    )
    options.add_model_options(parser)
    group = parser.add_argument_group("target (one of)")
    targets = group.add_mutually_exclusive_group(required=True)
    targets.add_argument("--speedup", type=parse_speedup, metavar="S",
                         help="throughput over the unpatched model, measured here at --batch-size, e.g. 1.8")
    targets.add_argument("--flops", type=parse_flops, metavar="G",
                         help="GFLOPs per image (e.g. 1.2), or a share of the unpatched model's (e.g. 60%%)")
    targets.add_argument("--latency-ms", type=parse_latency, metavar="MS",
                         help="milliseconds per image at batch size 1, measured here")
    group = parser.add_argument_group("search")
    group.add_argument("--data", required=True, metavar="DIR",
                       help="calibration images: any image files under DIR, at any depth; no labels needed")
    group.add_argument("--images", type=options.positive_int, default=256, metavar="N",
                       help="calibration images to use, drawn with --seed (default: 256)")
    group.add_argument("--seed", type=int, default=0, help="seed of the image draw and of the search (default: 0)")
    group.add_argument("--methods", type=options.parse_methods, default=list(DEFAULT_METHODS), metavar="M,M,...",
                       help=f"merging methods to search (default: {','.join(DEFAULT_METHODS)}; tome-attended where "
                       "the model has a class token)")
    group.add_argument("--budget-minutes", type=parse_minutes, default=10.0, metavar="M",
                       help="stop searching after M minutes with the best found (default: 10)")
    group.add_argument("--batch-size", type=options.positive_int, default=16,
                       help="images per batch when timing a speed-up, as in bench (default: 16)")
    group.add_argument("--runs", type=options.positive_int, default=20,
                       help="timed rounds per measurement (default: 20)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the schedule file to write (.json)")
    options.add_runtime_options(parser, dtype=False, amp=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.output, (".json",))
    check_apart(args, [Place("--output", args.output)])
    device = options.check_runtime(args)
    found = folder_samples(args.data, labels=False)  # a missing or empty folder fails before the model loads
    model = load_model(args.library, args.model, args.checkpoint, num_classes=args.num_classes,
                       model_kwargs=args.model_kwargs, img_size=args.img_size)
    require_images(model, "tune")
    model = model.eval().to(device)
    network = unwrap(model)
    space = Space(network, tuple(find_adapter(network).input_size(network)))
    names = check_names(args.methods, space.num_protected)
    result = tune(model, space, calibration_images(args, found, model.transform).to(device), target_of(args), names,
                  args.budget_minutes, args.batch_size, args.runs, args.seed)
    record = result.record(args.model, args.library, args.checkpoint, args.data, environment(device))
    write_text(args.output, json.dumps(record, indent=2) + "\n")
    print(f"{args.model}: {result.describe()}; wrote {args.output}", flush=True)
    tuned = "the tuned schedule"
    for warning in speed_warnings({tuned: result.measured_speedup}, {tuned: result.measured_spread_percent}):
        options.note("tune", warning, kind="warning")


def target_of(args: argparse.Namespace) -> Target:
    if args.speedup is not None:
        return Target("speedup", args.speedup)
    if args.latency_ms is not None:
        return Target("latency_ms", args.latency_ms)
    return args.flops

