"""``tokenmerge bench``: speed of a model with token merging against the same model
unpatched, and against the zero-overhead limit.

Settings are timed interleaved (unpatched, r1, r2, ..., unpatched, r1, ...) so that a
noisy machine slows them alike; every figure is a median over the timed rounds,
warm-up rounds excluded, and speed-ups are ratios within the same run. The limit of
a schedule is the same model with the same token counts per block where the tokens
are cut instead of matched and merged: what merging would give if it cost nothing.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.adapters import find_adapter
from tokenmerge.flops import count_flops
from tokenmerge.state import CappedRWarning

from . import options
from .cli import COMMANDS
from .files import Place, check_apart, check_output_path
from .messages import error_summary, model_title
from .models import load_model, sample_shape, takes_images, unwrap
from .onnx_files import export_onnx, onnx_session, require_onnx, session_runner
from .progress import ProgressBar
from .reports import describe_environment, environment, format_table, run_record, write_rows
from .settings import (
    UNPATCHED,
    Setting,
    cap_notes,
    check_schedule_files,
    configure,
    default_sweep,
    setting_runner,
    sweep_settings,
    unique,
)
from .timing import speed_warnings, spread_percent, time_interleaved, timed, too_few_rounds


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
    compile_seconds: Optional[float] = None
    export_seconds: Optional[float] = None


RUNTIMES = ("eager", "onnxruntime")


def check_bench_runtime(runtime: str, compile_model: bool, device: torch.device, dtype: torch.dtype, amp: str) -> None:
    """A one-line error for what ONNX Runtime cannot be timed with, before any work."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "eager":
        return
    refused = [(compile_model, "--compile (ONNX Runtime runs the exported graph; drop --compile)"),
               (device.type != "cpu", "--device other than cpu (ONNX Runtime is timed on its CPU execution provider)"),
               (dtype != torch.float32, "--dtype other than float32 (the exported graph is float32)"),
               (amp != "none", "--amp (the exported graph is float32; drop --amp)")]
    for refuse, why in refused:
        if refuse:
            raise ValueError(f"--runtime onnxruntime does not take {why}")
    require_onnx()


#: Graphs torch may compile of one forward. Every compiled copy of a model class, and
#: every setting, dtype and shape, is one more graph of the same code; past torch's own
#: limit (8) a compiled copy would fail (``fullgraph=True``) or silently run eagerly.
RECOMPILE_LIMIT = 256


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Let torch compile at least ``limit`` graphs of one function."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def prepare_runners(
    model: torch.nn.Module, settings: Sequence[Setting], compile_model: bool, amp: str = "none",
    **compile_kwargs,
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """A callable per setting, under autocast to ``amp``. Without compilation one model
    switches settings before each pass (patching is cheap); with it, every setting
    gets its own copy compiled by :func:`tokenmerge.compile` (``compile_kwargs`` go to
    it), with room for as many graphs as the copies need."""
    def under_amp(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run_with_amp(x: torch.Tensor) -> torch.Tensor:
            with options.autocast(x.device, amp):
                return run(x)
        return run_with_amp

    if not compile_model:
        return {s.name: under_amp(setting_runner(model, s)) for s in settings}
    allow_recompiles()
    runners = {}
    for setting in settings:
        variant = copy.deepcopy(model)
        configure(variant, setting)
        runners[setting.name] = under_amp(tokenmerge.compile(variant, **compile_kwargs))
    return runners


def onnx_runners(
    model: torch.nn.Module, settings: Sequence[Setting], shape: tuple[int, ...], progress: bool = False,
    static_batch: Optional[int] = None,
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, float]]:
    """Every setting of ``model`` exported to ONNX with a dynamic batch (or for
    ``static_batch`` inputs only) and loaded into an ONNX Runtime session on the CPU,
    as a function of inputs of ``shape``; and the seconds each export and session took."""
    example = torch.randn(static_batch or 2, *shape)
    runners, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="tokenmerge-bench-") as directory:
        for index, setting in enumerate(ProgressBar(settings, desc="exporting to ONNX", disable=not progress)):
            start = time.perf_counter()
            configure(model, setting)
            path = export_onnx(model, Path(directory) / f"setting{index}.onnx", example, static_batch is None)
            runners[setting.name] = session_runner(onnx_session(path))
            seconds[setting.name] = time.perf_counter() - start
    configure(model, Setting(UNPATCHED))
    return runners, seconds


def first_calls(runners: dict[str, Callable[[torch.Tensor], torch.Tensor]], inputs: torch.Tensor) -> dict[str, float]:
    """Seconds of the first calls of every runner, at the batch size and at batch size 1:
    for compiled runners, the compile time, kept apart from the timed rounds."""
    with torch.inference_mode():
        return {name: timed(run, inputs)[1] + timed(run, inputs[:1])[1] for name, run in runners.items()}


def check_input_size(
    model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> None:
    """One input of ``shape`` through the unpatched model, so that a size the model
    cannot take is a one-line error before any timing."""
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *shape, device=device, dtype=dtype))
    except (AssertionError, RuntimeError, ValueError) as error:
        reason = error_summary(error)
        size = "x".join(str(side) for side in shape[1:]) if len(shape) == 3 else "x".join(map(str, shape))
        raise ValueError(f"the model cannot take {size} inputs ({reason}); give the size it "
                         "was built for, or build it for this one (--img-size builds timm models for it)") from None


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
    method: Optional[str] = None,
    prop_attn: Optional[bool] = None,
    with_limit: bool = False,
    **kwargs,
) -> list[BenchRow]:
    """Tokens, GFLOPs per image, images per second, latency at batch size 1 and
    speed-ups of ``model`` unpatched and with ``method`` (a method or variant, see
    :func:`tokenmerge.tools.settings.variants`; default: ``tome``, or for a schedule
    file the method and attention it was tuned with) at every schedule in ``rs`` and,
    ``with_limit``, their zero-overhead limits; ``kwargs`` go to :func:`benchmark_settings`."""
    settings, _ = unique(sweep_settings(rs, method, prop_attn, with_limit))
    return benchmark_settings(model, settings, **kwargs)


def benchmark_settings(
    model: torch.nn.Module,
    settings: Sequence[Setting],
    batch_size: int = 16,
    runs: int = 8,
    warmup: int = 2,
    img_size: Optional[tuple[int, int]] = None,
    dtype: torch.dtype = torch.float32,
    amp: str = "none",
    device: str | torch.device = "cpu",
    compile_model: bool = False,
    runtime: str = "eager",
    latency_runs: Optional[int] = None,
    progress: bool = True,
) -> list[BenchRow]:
    """Tokens, GFLOPs per image, images per second at ``batch_size``, latency per
    image at batch size 1 and speed-ups of ``model`` in every setting (the first the
    unpatched model; a setting named ``cut NAME`` is the limit of setting ``NAME``),
    timed interleaved; with ``runtime="onnxruntime"`` every setting is exported to ONNX
    and timed in ONNX Runtime, the export times apart. Blocks that cannot merge the
    full r merge what they can without a warning here (see
    :func:`tokenmerge.tools.settings.cap_notes`): the token counts show it."""
    device = torch.device(device)
    check_bench_runtime(runtime, compile_model, device, dtype, amp)
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("--runs and --batch-size must be at least 1, --warmup at least 0")
    if not settings or settings[0].r is not None:
        raise ValueError("the first setting must be the unpatched model, which the speed-ups are relative to")
    network = unwrap(model)
    adapter = find_adapter(network)
    adapter.check(network)
    shape = sample_shape(model, img_size)
    img_size = tuple(shape[1:]) if takes_images(model) else None  # the token counts of other inputs are the model's
    counts = {s.name: tokenmerge.token_counts(network, r=s.r or 0, img_size=img_size) for s in settings}  # validates r
    model = model.to(device=device, dtype=dtype)
    check_input_size(model, shape, device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        inputs = torch.randn(batch_size, *shape, device=device, dtype=dtype)
        counted = counted_flops(model, settings, inputs[:1])
        if runtime == "onnxruntime":
            runners, export_seconds = onnx_runners(model, settings, shape, progress)
        else:
            runners, export_seconds = prepare_runners(model, settings, compile_model, amp), {}
        compile_seconds = first_calls(runners, inputs) if compile_model else {}
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
            gflops=tokenmerge.flops_per_image(network, setting.r or 0, img_size, setting.method) / 1e9,
            counted_gflops=counted[setting.name] / 1e9,
            images_per_second=batch_size / medians[setting.name],
            iqr_percent=spread_percent(times[setting.name]),
            latency_ms=1000 * statistics.median(latencies[setting.name]),
            speedup=medians[UNPATCHED] / medians[setting.name],
            of_limit=medians[limit] / medians[setting.name] if limit in medians else None,
            compile_seconds=compile_seconds.get(setting.name),
            export_seconds=export_seconds.get(setting.name),
        ))
    return rows


def bench_warnings(rows: Sequence[BenchRow], runs: int) -> list[str]:
    """The warnings for every figure of ``rows`` not to be taken as fact (the shared
    rule of :func:`tokenmerge.tools.timing.speed_warnings`), and for too few ``runs``."""
    merged = [row for row in rows[1:] if not row.setting.startswith("cut ")]
    few = too_few_rounds({"every setting": runs})
    return ([few] if few else []) + speed_warnings(
        {row.setting: row.speedup for row in merged},
        {row.setting: row.iqr_percent for row in rows},
        {row.setting: row.of_limit for row in merged if row.of_limit is not None},
    )


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
    table = [asdict(row) for row in rows]
    columns = list(COLUMNS)
    if any(row.of_limit is not None for row in rows):
        for row in table:
            row["of_limit"] = "" if row["of_limit"] is None else f"{100 * row['of_limit']:.1f}%"
        columns.append(("of_limit", "of limit", ">"))
    if any(row.compile_seconds is not None for row in rows):
        columns.append(("compile_seconds", "compile s", ".1f"))
    if any(row.export_seconds is not None for row in rows):
        columns.append(("export_seconds", "export s", ".1f"))
    if per_block:
        for row in table:
            row["tokens_per_block"] = " ".join(map(str, row["tokens_per_block"]))
        columns.append(("tokens_per_block", "tokens after each block", "<"))
    return format_table(table, columns)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help=COMMANDS["bench"][1],
        description="Measure tokens left, GFLOPs per image, images per second, latency and speed-up over "
        "the unpatched model, all in one interleaved run: settings take turns, every figure is a median over "
        "the timed rounds, warm-up excluded, and a spread too large to trust is said.",
    )
    options.add_model_options(parser, default_model=options.DEFAULT_MODEL)
    options.add_sweep_option(parser, options.DEFAULT_SWEEP_HELP)
    options.add_method_option(parser)
    parser.add_argument("--batch-size", type=options.positive_int, default=16,
                        help="images per batch for throughput (default: 16)")
    options.add_runtime_options(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every setting; the first calls, which compile, are timed apart "
                        "('compile s') and never counted in the rounds")
    parser.add_argument("--runtime", choices=RUNTIMES, default="eager",
                        help="eager: the PyTorch model; onnxruntime: every setting exported to ONNX (dynamic batch) "
                        "and timed in ONNX Runtime on the CPU, as many threads as torch's, export times apart "
                        "('export s'); needs the onnx extra (default: eager)")
    parser.add_argument("--runs", type=options.positive_int, default=8, help="timed rounds per setting (default: 8)")
    parser.add_argument("--warmup", type=options.non_negative_int, default=2,
                        help="untimed rounds first (default: 2)")
    parser.add_argument("--cut-limit", action="store_true",
                        help="also time every schedule with tokens cut instead of merged, the zero-overhead limit")
    parser.add_argument("--limit", action=options.Renamed,
                        message="bench times the cut limit with --cut-limit; --limit N counts images in eval "
                        "and compare")
    parser.add_argument("--per-block", action="store_true", help="show the tokens after every block")
    parser.add_argument("--output", metavar="FILE",
                        help="write the rows, the options and the environment to a .json or .csv file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.output)
    check_apart(args, [Place("--output", args.output)])
    device = options.check_runtime(args)
    check_bench_runtime(args.runtime, args.compile, device, options.DTYPES[args.dtype], args.amp)
    model = load_model(args.library, args.model, args.checkpoint, num_classes=args.num_classes,
                       model_kwargs=args.model_kwargs, img_size=args.img_size)
    network = unwrap(model)
    rs = args.r if args.r is not None else default_sweep(network)
    check_schedule_files(network, rs, args)
    settings, notes = unique(sweep_settings(rs, args.method, args.prop_attn, args.cut_limit))
    for text in notes + cap_notes(network, settings):
        options.note("bench", text)
    env = environment(device)
    amp = f", autocast {args.amp}" if args.amp != "none" else ""
    where = ", compiled" if args.compile else ", ONNX Runtime" if args.runtime == "onnxruntime" else ""
    print(
        f"{model_title(args.model, model.weights)}, batch {args.batch_size}, {args.dtype}{amp}"
        f"{where}; {args.runs} timed rounds after {args.warmup} warm-up, "
        f"interleaved, medians; {describe_environment(env)}",
        flush=True,
    )
    rows = benchmark_settings(
        model, settings, batch_size=args.batch_size, runs=args.runs, warmup=args.warmup,
        dtype=options.DTYPES[args.dtype], amp=args.amp, device=device, compile_model=args.compile,
        runtime=args.runtime,
    )
    print(format_rows(rows, per_block=args.per_block))
    for warning in bench_warnings(rows, args.runs):
        options.note("bench", warning, kind="warning")
    if args.output:
        record = run_record(args) | {"r": [schedules.describe(r) for r in rs]}
        write_rows(args.output, [asdict(row) for row in rows], record, env)
        print(f"wrote {args.output}")
