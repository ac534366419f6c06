"""``tokenmerge bench``: speed of a model with token merging against the same model
unpatched, and against the zero-overhead limit.

Settings are timed interleaved (unpatched, r1, r2, ..., unpatched, r1, ...) so that a
noisy machine slows them alike; every figure is a median over the timed rounds,
warm-up rounds excluded, and speed-ups are ratios within the same run. The limit of
a schedule is the same model with the same token counts per block where the tokens
are cut instead of matched and merged: what merging would give if it cost nothing.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.adapters import find_adapter
from tokenmerge.flops import count_flops
from tokenmerge.models import unwrap
from tokenmerge.state import CappedRWarning

UNPATCHED = "unpatched"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Setting:
    """One way to run the model: unpatched (``r=None``) or reducing tokens with
    ``method``, with or without proportional attention."""

    name: str
    r: Optional[schedules.Schedule] = None
    method: str = "tome"
    prop_attn: bool = True


@dataclass
class BenchRow:
    setting: str
    tokens_per_block: list[int]
    tokens_left: int
    gflops: float
    counted_gflops: float
    images_per_second: float
    iqr_percent: float
    latency_ms: float
    speedup: float
    of_limit: Optional[float]


def make_settings(rs: Sequence[schedules.Schedule], with_limit: bool, method: str = "tome") -> list[Setting]:
    """The unpatched model, then ``method`` at every r (named ``r=R``, or ``METHOD r=R``
    for a method other than merging), each followed by its cut limit ``with_limit``."""
    settings = [Setting(UNPATCHED)]
    prefix = "" if method == "tome" else f"{method} "
    for r in rs:
        label = f"r={schedules.describe(r)}"
        settings.append(Setting(prefix + label, r, method))
        if with_limit and schedules.describe(r) != "0":
            settings.append(Setting(f"cut {prefix}{label}", r, "cut"))
    return settings


def configure(model: torch.nn.Module, setting: Setting) -> None:
    """Put ``model`` (or the network of a :class:`tokenmerge.models.ImageModel`) in ``setting``."""
    model = unwrap(model)
    if setting.r is None:
        if tokenmerge.is_applied(model):
            tokenmerge.remove(model)
    else:
        tokenmerge.apply(model, r=setting.r, method=setting.method, prop_attn=setting.prop_attn)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_runners(
    model: torch.nn.Module, settings: Sequence[Setting], compile_model: bool
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """A callable per setting. Without compilation one model switches settings before
    each pass (patching is cheap); with it, every setting gets its own compiled copy."""
    if not compile_model:
        def runner(setting: Setting) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(x: torch.Tensor) -> torch.Tensor:
                configure(model, setting)
                return model(x)
            return run
        return {s.name: runner(s) for s in settings}
    runners = {}
    for setting in settings:
        variant = copy.deepcopy(model)
        configure(variant, setting)
        runners[setting.name] = torch.compile(variant)
    return runners


def time_interleaved(
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    inputs: torch.Tensor,
    runs: int,
    warmup: int,
    progress: bool = True,
    description: str = "timing",
) -> dict[str, list[float]]:
    """Seconds per forward pass of every runner over ``runs`` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    total = (runs + warmup) * len(runners)
    with torch.inference_mode(), tqdm(total=total, disable=not progress, desc=description, unit="pass") as bar:
        for round_index in range(warmup + runs):
            for name, run in runners.items():
                synchronize(inputs.device)
                start = time.perf_counter()
                run(inputs)
                synchronize(inputs.device)
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
                bar.update()
    return times


def interquartile_range(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def counted_flops(model: torch.nn.Module, settings: Sequence[Setting], image: torch.Tensor) -> dict[str, int]:
    """FLOPs per image of every setting as ``FlopCounterMode`` counts them, a check
    on the analytic figures (merging's own small operations are not counted)."""
    counts = {}
    for setting in settings:
        configure(model, setting)
        counts[setting.name] = count_flops(model, image)
    configure(model, Setting(UNPATCHED))
    return counts


def benchmark(
    model: torch.nn.Module,
    rs: Sequence[schedules.Schedule],
    batch_size: int = 16,
    runs: int = 8,
    warmup: int = 2,
    img_size: Optional[tuple[int, int]] = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_limit: bool = False,
    compile_model: bool = False,
    latency_runs: Optional[int] = None,
    progress: bool = True,
    method: str = "tome",
) -> list[BenchRow]:
    """Tokens, GFLOPs per image, images per second at ``batch_size``, latency per
    image at batch size 1 and speed-ups of ``model`` unpatched and for every schedule
    in ``rs`` (and, ``with_limit``, their zero-overhead limits). Blocks that cannot
    merge the full r merge what they can without a warning: the token counts show it."""
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("--runs and --batch-size must be at least 1, --warmup at least 0")
    network = unwrap(model)
    adapter = find_adapter(network)
    adapter.check(network)
    img_size = img_size or adapter.input_size(network)
    settings = make_settings(rs, with_limit, method)
    counts = {s.name: tokenmerge.token_counts(network, r=s.r or 0, img_size=img_size) for s in settings}  # validates r
    device = torch.device(device)
    model = model.to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        inputs = torch.randn(batch_size, 3, *img_size, device=device, dtype=dtype)
        counted = counted_flops(model, settings, inputs[:1])
        runners = prepare_runners(model, settings, compile_model)
        times = time_interleaved(runners, inputs, runs, warmup, progress, f"batch {batch_size}")
        latencies = time_interleaved(runners, inputs[:1], latency_runs or 4 * runs, warmup, progress, "batch 1")
    configure(model, Setting(UNPATCHED))
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for setting in settings:
        limit = f"cut {setting.name}"
        rows.append(BenchRow(
            setting=setting.name,
            tokens_per_block=counts[setting.name],
            tokens_left=counts[setting.name][-1],
            gflops=tokenmerge.flops_per_image(network, r=setting.r or 0, img_size=img_size, method=setting.method) / 1e9,
            counted_gflops=counted[setting.name] / 1e9,
            images_per_second=batch_size / medians[setting.name],
            iqr_percent=100 * interquartile_range(times[setting.name]) / medians[setting.name],
            latency_ms=1000 * statistics.median(latencies[setting.name]),
            speedup=medians[UNPATCHED] / medians[setting.name],
            of_limit=medians[limit] / medians[setting.name] if limit in medians else None,
        ))
    return rows


COLUMNS = [
    ("setting", "setting", "<"),
    ("tokens_left", "tokens left", "d"),
    ("gflops", "GFLOPs", ".2f"),
    ("counted_gflops", "counted", ".2f"),
    ("images_per_second", "img/s", ".1f"),
    ("iqr_percent", "IQR %", ".1f"),
    ("latency_ms", "ms/img @1", ".1f"),
    ("speedup", "speed-up", ".2f"),
]


def format_rows(rows: Sequence[BenchRow], per_block: bool = False) -> str:
    from .report import format_table

    table = [asdict(row) for row in rows]
    columns = list(COLUMNS)
    if any(row.of_limit is not None for row in rows):
        for row in table:
            row["of_limit"] = "" if row["of_limit"] is None else f"{100 * row['of_limit']:.1f}%"
        columns.append(("of_limit", "of limit", ">"))
    if per_block:
        for row in table:
            row["tokens_per_block"] = " ".join(map(str, row["tokens_per_block"]))
        columns.append(("tokens_per_block", "tokens after each block", "<"))
    return format_table(table, columns)


def add_parser(subparsers) -> None:
    from .cli import SWEEP_HELP, add_model_arguments, parse_sweep

    parser = subparsers.add_parser(
        "bench",
        help="speed and GFLOPs for a sweep of r against the unpatched model",
        description="Measure tokens left, GFLOPs per image, images per second, latency and speed-up over "
        "the unpatched model, all in one interleaved run.",
    )
    add_model_arguments(parser)
    parser.add_argument("--r", default="0,8,13,16", type=parse_sweep, help=SWEEP_HELP + " (default: 0,8,13,16)")
    add_method_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for throughput (default: 16)")
    parser.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size for models built with dynamic_img_size (default: the model's)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every setting")
    parser.add_argument("--runs", type=int, default=8, help="timed rounds per setting (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--limit", action="store_true",
                        help="also time every schedule with tokens cut instead of merged, the zero-overhead limit")
    parser.add_argument("--per-block", action="store_true", help="show the tokens after every block")
    parser.add_argument("--output", help="write the rows to a .json or .csv file")
    parser.set_defaults(run=run)


def add_method_argument(parser) -> None:
    from .methods import METHODS

    parser.add_argument("--method", choices=[name for name in METHODS if name != "cut"], default="tome",
                        help="token reduction method (default: tome, token merging); see tokenmerge compare")


def run(args) -> None:
    from .models import load_model
    from .report import check_output_path, describe_environment, environment, write_rows

    check_output_path(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.library, args.model, args.checkpoint)
    env = environment(args.device)
    print(
        f"{args.model}, batch {args.batch_size}, {args.dtype}{', compiled' if args.compile else ''}; "
        f"{args.runs} timed rounds after {args.warmup} warm-up, interleaved, medians; {describe_environment(env)}",
        flush=True,
    )
    rows = benchmark(
        model, args.r, batch_size=args.batch_size, runs=args.runs, warmup=args.warmup,
        img_size=tuple(args.img_size) if args.img_size else None, dtype=DTYPES[args.dtype], device=args.device,
        with_limit=args.limit, compile_model=args.compile, method=args.method,
    )
    print(format_rows(rows, per_block=args.per_block))
    if args.output:
        write_rows(args.output, [asdict(row) for row in rows], env)
        print(f"wrote {args.output}")
