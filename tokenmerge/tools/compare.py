"""``tokenmerge compare``: token merging against token pruning and against its own
ablations, at the same token counts, on the same images, in the same run.

Every method removes the same number of tokens in every block for a given r, so the
methods differ only in which tokens they drop or combine and what that costs. Each
batch goes through the unpatched model and every (method, r) setting in turn (see
:mod:`tokenmerge.tools.evaluation`), so accuracy and throughput of all settings come
from the same images under the same machine load. The figure plots top-1 against
measured images per second with one curve per method: at equal speed, the higher
curve loses less accuracy; a second panel plots the share of images whose top-1
differs from the unpatched model's, where the lower curve is the more faithful.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from . import options
from .cli import COMMANDS
from .evaluation import MEASURES, EvalRow, add_evaluation_options, run_settings
from .settings import UNPATCHED, check_schedule_files, comparison_settings, default_sweep, merging, variants


def curves(rows: Sequence[EvalRow]) -> dict[str, list[EvalRow]]:
    """The rows of every method, in the order of their settings; schedules read from
    files (``r=@FILE``) make a curve of their own per method, ``METHOD, tuned``."""
    by_method: dict[str, list[EvalRow]] = {}
    for row in rows:
        if row.setting != UNPATCHED:
            name = row.setting.rsplit(" r=", 1)[0] + (", tuned" if row.r.startswith("@") else "")
            by_method.setdefault(name, []).append(row)
    return by_method


def point_label(row: EvalRow) -> str:
    """``r=R``, or the file name of a schedule read from a file."""
    return Path(row.r[1:]).name if row.r.startswith("@") else f"r={row.r}"


def draw_comparison(rows: Sequence[EvalRow], title: Optional[str] = None):
    """A matplotlib ``Figure`` with one panel per measure, top-1 (with labels) and the
    share of images whose top-1 differs from the unpatched model's, each against
    measured images per second: one curve per method through its r values in order of
    speed (labelled ``r=R``; tuned schedules dotted, labelled by file), the unpatched
    model as a star."""
    from matplotlib.figure import Figure

    measures = [key for key in MEASURES if key != "top1" or rows[0].top1 is not None]
    figure = Figure(figsize=(7.5 * len(measures), 5), layout="constrained")
    for ax, measure in zip(figure.subplots(1, len(measures), squeeze=False)[0], measures):
        draw_measure(ax, rows, measure)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def draw_measure(ax, rows: Sequence[EvalRow], measure: str) -> None:
    for index, (method, points) in enumerate(curves(rows).items()):
        points = sorted(points, key=lambda p: p.images_per_second)
        style = ":" if method.endswith("tuned") else "-" if merging(method) else "--"
        width = 2.2 if method == "tome" else 1.2
        values = [getattr(p, measure) for p in points]
        ax.plot([p.images_per_second for p in points], values, style, marker="o",
                linewidth=width, markersize=4, color=f"C{index}", label=method)
        for point, value in zip(points, values):
            ax.annotate(point_label(point), (point.images_per_second, value), textcoords="offset points",
                        xytext=(3, 3), fontsize=6, color=f"C{index}")
    unpatched = next(row for row in rows if row.setting == UNPATCHED)
    ax.plot(unpatched.images_per_second, getattr(unpatched, measure), "*", markersize=12, color="black",
            label=UNPATCHED)
    ax.set_xlabel("images / s (measured)")
    ax.set_ylabel(MEASURES[measure])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left" if measure == "top1" else "upper left")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help=COMMANDS["compare"][1],
        description="Evaluate the unpatched model and every method at every r on an image folder, in one run "
        "in which every batch goes through every setting, so that accuracy and throughput are comparable. "
        f"Methods: {', '.join(variants())}.",
    )
    options.add_sweep_option(parser, "the sweep of eval without r=0, at which every method is the unpatched "
                             "model: 8,13,16 for a 197-token, 12-block ViT")
    options.add_method_option(parser, many=True)
    add_evaluation_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    def settings(network: torch.nn.Module):
        rs = args.r if args.r is not None else default_sweep(network, with_zero=False)
        check_schedule_files(network, rs, args)
        return comparison_settings(args.methods, rs, args.prop_attn)

    run_settings(args, "compare", settings, draw_comparison)
