"""``tokenmerge eval``: top-1 and top-5 accuracy of a model on an image folder for a
sweep of r, with the throughput of every setting measured in the same run (see
:mod:`tokenmerge.tools.evaluation` for how).

For notebooks::

    from tokenmerge.tools.evaluate import evaluate
    result = evaluate(model, dataset, rs=[0, 8, 13])   # dataset yields (image, label)
    result.rows[2].top1, result.rows[2].images_per_second
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

import torch
from torch.utils.data import Dataset

from tokenmerge import schedule as schedules

from . import options
from .cli import COMMANDS
from .evaluation import MEASURES, EvalRow, Evaluation, add_evaluation_options, evaluate_settings, run_settings
from .settings import UNPATCHED, check_schedule_files, default_sweep, sweep_settings, unique


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    rs: Sequence[schedules.Schedule],
    method: Optional[str] = None,
    prop_attn: Optional[bool] = None,
    **kwargs,
) -> Evaluation:
    """Top-1 and top-5 accuracy and images per second of ``model`` unpatched and with
    ``method`` (a method or variant; default: ``tome``, or for a schedule file the
    method it was tuned with) at every schedule in ``rs``, on the (image
    tensor, label) items of ``dataset``; a schedule given twice is evaluated once.
    ``kwargs`` go to :func:`tokenmerge.tools.evaluation.evaluate_settings`."""
    settings, _ = unique(sweep_settings(rs, method, prop_attn))
    return evaluate_settings(model, dataset, settings, **kwargs)


def draw_plot(rows: Sequence[EvalRow], title: Optional[str] = None):
    """A matplotlib ``Figure`` of top-1 accuracy (without labels: the share of images
    whose top-1 differs from the unpatched model's) against measured images per
    second, one labelled point per setting. Built without pyplot, so it needs no display."""
    from matplotlib.figure import Figure

    measure = "top1" if rows[0].top1 is not None else "disagreement"
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    for row in rows:
        unpatched = row.setting == UNPATCHED
        style = dict(marker="s", markersize=11, markerfacecolor="none", color="tab:gray") if unpatched else \
            dict(marker="o", color="tab:blue")
        value = getattr(row, measure)
        ax.plot(row.images_per_second, value, linestyle="none", **style)
        ax.annotate(row.setting, (row.images_per_second, value), textcoords="offset points",
                    xytext=(6, -12) if unpatched else (6, 5), fontsize=8)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("images / s (measured)")
    ax.set_ylabel(MEASURES[measure])
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return figure


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help=COMMANDS["eval"][1],
        description="Evaluate a model unpatched and for every r on an image folder: ImageNet synset folders "
        "(n01440764/...) labelled with ImageNet-1k indices, or class folders labelled through --class-map. "
        "Images go through the model's own evaluation transform. Every batch runs through every setting, "
        "so accuracy and throughput come from the same run. Run it under torchrun to share the images "
        "between processes.",
    )
    options.add_sweep_option(parser, options.DEFAULT_SWEEP_HELP)
    options.add_method_option(parser)
    add_evaluation_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    def settings(network: torch.nn.Module):
        rs = args.r if args.r is not None else default_sweep(network)
        check_schedule_files(network, rs, args)
        return sweep_settings(rs, args.method, args.prop_attn)

    run_settings(args, "eval", settings, draw_plot)
