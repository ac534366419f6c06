"""Throughput of a model with token merging against the same model unpatched.

Settings are timed interleaved (unpatched, r1, r2, ..., unpatched, r1, ...) so that
a noisy machine slows them alike; every figure is a median over the timed rounds,
warm-up rounds excluded, and speed-ups are ratios within the same run.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm import tqdm

import tokenmerge
from tokenmerge.adapters import find_adapter
from tokenmerge import schedule as schedules
from tokenmerge.flops import count_flops
from tokenmerge.state import CappedRWarning

UNPATCHED = "unpatched"


@dataclass
class BenchRow:
    setting: str
    tokens_left: int
    gflops: float
    images_per_second: float
    iqr_percent: float
    speedup: float


def set_schedule(model: torch.nn.Module, r: Optional[schedules.Schedule]) -> None:
    """Put ``model`` in one benchmark setting: unpatched for ``None``, else merging with r."""
    if r is None:
        if tokenmerge.is_applied(model):
            tokenmerge.remove(model)
    else:
        tokenmerge.apply(model, r=r)


def time_interleaved(
    model: torch.nn.Module,
    settings: dict[str, Optional[schedules.Schedule]],
    inputs: torch.Tensor,
    runs: int,
    warmup: int,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds per forward pass of every setting over ``runs`` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in settings}
    with torch.inference_mode(), tqdm(total=(runs + warmup) * len(settings), disable=not progress,
                                      desc="timing", unit="pass") as bar:
        for round_index in range(warmup + runs):
            for name, r in settings.items():
                set_schedule(model, r)
                start = time.perf_counter()
                model(inputs)
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    times[name].append(elapsed)
                bar.update()
    return times


def benchmark(
    model: torch.nn.Module,
    rs: Sequence[schedules.Schedule],
    batch_size: int = 16,
    runs: int = 8,
    warmup: int = 2,
    img_size: Optional[tuple[int, int]] = None,
    progress: bool = True,
) -> list[BenchRow]:
    """Tokens left, GFLOPs per image and images per second of ``model`` unpatched and
    for every schedule in ``rs``. Blocks that cannot merge the full r merge what they
    can without a warning: the table's token counts show it."""
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("runs and batch size must be at least 1, warm-up at least 0")
    adapter = find_adapter(model)
    adapter.check(model)
    img_size = img_size or adapter.input_size(model)
    settings: dict[str, Optional[schedules.Schedule]] = {UNPATCHED: None}
    for r in rs:
        tokenmerge.token_counts(model, r=r, img_size=img_size)  # validates r before any timing
        settings[f"r={schedules.describe(r)}"] = r
    inputs = torch.randn(batch_size, 3, *img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        return _measure(model, settings, inputs, runs, warmup, img_size, progress)


def _measure(model, settings, inputs, runs, warmup, img_size, progress) -> list[BenchRow]:
    batch_size = inputs.shape[0]
    times = time_interleaved(model, settings, inputs, runs, warmup, progress)
    base_time = statistics.median(times[UNPATCHED])
    rows = []
    for name, r in settings.items():
        set_schedule(model, r)
        median_time = statistics.median(times[name])
        counts = tokenmerge.token_counts(model, r=0 if r is None else r, img_size=img_size)
        rows.append(BenchRow(
            setting=name,
            tokens_left=counts[-1],
            gflops=count_flops(model, inputs[:1]) / 1e9,
            images_per_second=batch_size / median_time,
            iqr_percent=100 * interquartile_range(times[name]) / median_time,
            speedup=base_time / median_time,
        ))
    set_schedule(model, None)
    return rows


def interquartile_range(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def format_table(rows: Sequence[BenchRow]) -> str:
    header = f"{'setting':<16} {'tokens left':>11} {'GFLOPs':>7} {'img/s':>8} {'IQR':>7} {'speed-up':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.setting:<16} {row.tokens_left:>11} {row.gflops:>7.2f} {row.images_per_second:>8.1f} "
            f"{row.iqr_percent:>6.1f}% {row.speedup:>7.2f}x"
        )
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    from .cli import SWEEP_HELP, add_model_arguments, parse_sweep

    parser = subparsers.add_parser(
        "bench",
        help="throughput and GFLOPs for a sweep of r against the unpatched model",
        description="Measure tokens left, GFLOPs per image, images per second and speed-up over the "
        "unpatched model, all in one interleaved run.",
    )
    add_model_arguments(parser)
    parser.add_argument("--r", default="0,8,13,16", type=parse_sweep, help=SWEEP_HELP + " (default: 0,8,13,16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=8, help="timed rounds per setting (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.set_defaults(run=run)


def run(args) -> None:
    from .models import create_timm_model
    from .report import describe_environment, environment

    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_timm_model(args.model, args.checkpoint)
    print(
        f"{args.model}, batch {args.batch_size}, float32; {args.runs} timed rounds after {args.warmup} warm-up, "
        f"medians; {describe_environment(environment())}",
        flush=True,
    )
    rows = benchmark(model, args.r, batch_size=args.batch_size, runs=args.runs, warmup=args.warmup)
    print(format_table(rows))
