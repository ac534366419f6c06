"""How close merging comes to its zero-overhead limit, and that r=0 costs nothing.

For each batch size, times interleaved in one run (unpatched, r=0, and for every r the
merged model and the same model with tokens cut instead of merged, which has the same
token counts per block at no cost) and prints a Markdown table of medians:

    python benchmarks/speed.py                      # vit_small_patch16_224, batch 32 and 1
    python benchmarks/speed.py --batch-sizes 1 --runs 100
    python benchmarks/speed.py --compile            # every setting through tokenmerge.compile

"of limit" is the merged model's throughput over the cut model's; "speed-up" is over
the unpatched model. With ``--compile`` every setting is a copy of the model compiled
once for each batch size (static shapes, ``tokenmerge.compile``); the first call,
which compiles, is timed apart ("compile s") and the warm-up rounds follow it.
"""
from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Sequence

import timm
import torch
from speed_options import parse, runs_of, speed_parser

from tokenmerge.state import CappedRWarning
from tokenmerge.tools.bench import prepare_runners
from tokenmerge.tools.reports import describe_environment, environment
from tokenmerge.tools.settings import Setting
from tokenmerge.tools.timing import interquartile_range, time_interleaved, timed

Runner = Callable[[torch.Tensor], torch.Tensor]


def settings_for(rs: list[int]) -> list[Setting]:
    settings = [Setting("unpatched"), Setting("r=0", 0)]
    for r in rs:
        settings += [Setting(f"r={r}", r), Setting(f"cut r={r}", r, "cut")]
    return settings


def compiled_runners(
    model: torch.nn.Module, settings: Sequence[Setting], inputs: torch.Tensor, **compile_kwargs
) -> tuple[dict[str, Runner], dict[str, float]]:
    """Every setting as its own compiled copy of ``model`` (:func:`prepare_runners`) for
    the shape of ``inputs`` (``dynamic=False`` unless given), and the seconds of each
    copy's first call, which compiles it."""
    compile_kwargs.setdefault("dynamic", False)
    runners = prepare_runners(model, settings, True, **compile_kwargs)
    with torch.inference_mode():
        return runners, {name: timed(run, inputs)[1] for name, run in runners.items()}


def measure(
    model: torch.nn.Module, batch_size: int, rs: list[int], runs: int, warmup: int, compile_model: bool = False
) -> list[dict]:
    settings = settings_for(rs)
    inputs = torch.randn(batch_size, 3, *model.patch_embed.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        if compile_model:
            runners, compile_seconds = compiled_runners(model, settings, inputs)
        else:
            runners, compile_seconds = prepare_runners(model, settings, False), {}
        times = time_interleaved(runners, inputs, runs, warmup, description=f"batch {batch_size}")
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for setting in settings:
        if setting.method == "cut":
            continue
        limit = median.get(f"cut {setting.name}")
        rows.append({
            "batch": batch_size,
            "setting": setting.name,
            "img/s": batch_size / median[setting.name],
            "IQR %": 100 * interquartile_range(times[setting.name]) / median[setting.name],
            "speed-up": median["unpatched"] / median[setting.name],
            "limit img/s": batch_size / limit if limit else None,
            "of limit": limit / median[setting.name] if limit else None,
            "compile s": compile_seconds.get(setting.name),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    compiled = any(row.get("compile s") is not None for row in rows)
    lines = ["| batch | setting | img/s | IQR % | speed-up | limit img/s | of limit |" + (" compile s |" * compiled),
             "|---|---|---|---|---|---|---|" + ("---|" * compiled)]
    for row in rows:
        limit = "" if row["limit img/s"] is None else f"{row['limit img/s']:.1f}"
        share = "" if row["of limit"] is None else f"{100 * row['of limit']:.1f}%"
        compile_seconds = f" {row['compile s']:.1f} |" if compiled else ""
        lines.append(f"| {row['batch']} | {row['setting']} | {row['img/s']:.1f} | {row['IQR %']:.1f} | "
                     f"{row['speed-up']:.2f}x | {limit} | {share} |" + compile_seconds)
    return "\n".join(lines)


def main() -> None:
    parser = speed_parser(__doc__.split("\n\n")[0], runs_at_batch_1=80)
    parser.add_argument("--compile", action="store_true",
                        help="time every setting compiled by tokenmerge.compile, once per batch size; the first "
                        "call, which compiles, is timed apart")
    args = parse(parser)
    model = timm.create_model(args.model).eval()
    how = ", compiled (tokenmerge.compile, static shapes)" if args.compile else ""
    print(f"{args.model}, float32, random weights{how}; {describe_environment(environment())}\n")
    rows = []
    for batch_size in args.batch_sizes:
        rows += measure(model, batch_size, args.r, runs_of(args, batch_size), args.warmup, args.compile)
    print(markdown(rows))


if __name__ == "__main__":
    main()
