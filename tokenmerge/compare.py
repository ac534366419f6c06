"""``tokenmerge compare``: token merging against token pruning and against its own
ablations, at the same token counts, on the same images, in the same run.

Every method removes the same number of tokens in every block for a given r, so the
methods differ only in which tokens they drop or combine and what that costs. Each
batch goes through the unpatched model and every (method, r) setting in turn (see
:mod:`tokenmerge.evaluate`), so accuracy and throughput of all settings come from the
same images under the same machine load. The figure plots top-1 against measured
images per second with one curve per method: at equal speed, the higher curve loses
less accuracy.
"""
from __future__ import annotations

from typing import Optional, Sequence

from . import schedule as schedules
from .bench import UNPATCHED, Setting
from .evaluate import EvalRow, Evaluation, add_evaluation_arguments, run_settings
from .evaluate import report as evaluation_report

#: Variants a comparison can include: a reduction method and whether attention is
#: proportional. ``tome`` is the paper's method; the ``tome-*`` variants change one
#: of its choices; ``random`` and ``evit*`` prune.
VARIANTS: dict[str, tuple[str, bool]] = {
    "tome": ("tome", True),
    "tome-no-prop-attn": ("tome", False),
    "tome-random-split": ("tome-random-split", True),
    "tome-unweighted": ("tome-unweighted", True),
    "tome-features": ("tome-features", True),
    "random": ("random", True),
    "evit": ("evit", True),
    "evit-fuse": ("evit-fuse", True),
}


def parse_variants(text: str) -> list[str]:
    """Comma-separated variant names, each known."""
    import argparse

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or '(none given)'}; known: {', '.join(VARIANTS)}"
        )
    return names


def comparison_settings(variants: Sequence[str], rs: Sequence[schedules.Schedule]) -> list[Setting]:
    """The unpatched model, then every variant at every r."""
    settings = [Setting(UNPATCHED)]
    for variant in variants:
        method, prop_attn = VARIANTS[variant]
        for r in rs:
            settings.append(Setting(f"{variant} r={schedules.describe(r)}", r, method, prop_attn))
    return settings


def curves(rows: Sequence[EvalRow]) -> dict[str, list[EvalRow]]:
    """The rows of every variant, in the order of their settings."""
    by_variant: dict[str, list[EvalRow]] = {}
    for row in rows:
        if row.setting != UNPATCHED:
            by_variant.setdefault(row.setting.rsplit(" r=", 1)[0], []).append(row)
    return by_variant


def draw_comparison(rows: Sequence[EvalRow], title: Optional[str] = None):
    """A matplotlib ``Figure`` of top-1 against measured images per second: one curve
    per variant through its r values (labelled), the unpatched model as a star."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5), layout="constrained")
    ax = figure.subplots()
    for index, (variant, points) in enumerate(curves(rows).items()):
        style = "-" if variant.startswith("tome") else "--"
        width = 2.2 if variant == "tome" else 1.2
        ax.plot([p.images_per_second for p in points], [p.top1 for p in points], style, marker="o",
                linewidth=width, markersize=4, color=f"C{index}", label=variant)
        for point in points:
            ax.annotate(point.r, (point.images_per_second, point.top1), textcoords="offset points",
                        xytext=(3, 3), fontsize=6, color=f"C{index}")
    unpatched = next(row for row in rows if row.setting == UNPATCHED)
    ax.plot(unpatched.images_per_second, unpatched.top1, "*", markersize=12, color="black", label=UNPATCHED)
    ax.set_xlabel("images / s (measured)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title, fontsize=9)
    return figure


def report(args, result: Evaluation, env: dict) -> None:
    evaluation_report(args, result, env, draw=draw_comparison)


def add_parser(subparsers) -> None:
    from .cli import SWEEP_HELP, parse_sweep

    parser = subparsers.add_parser(
        "compare",
        help="merging against pruning and against merging's ablations, accuracy against measured speed",
        description="Evaluate the unpatched model and every method at every r on an image folder, in one run "
        "in which every batch goes through every setting, so that accuracy and throughput are comparable. "
        f"Methods: {', '.join(VARIANTS)}.",
    )
    parser.add_argument("--methods", type=parse_variants, default=list(VARIANTS),
                        help=f"comma-separated (default: all: {','.join(VARIANTS)})")
    parser.add_argument("--r", "--sweep", dest="r", default="4,8,12,16", type=parse_sweep,
                        help=SWEEP_HELP + " (default: 4,8,12,16); under torchrun write --sweep")
    add_evaluation_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> None:
    run_settings(args, comparison_settings(args.methods, args.r), report)
