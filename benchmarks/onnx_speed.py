"""Token merging in ONNX Runtime against eager PyTorch, on the CPU.

Every setting (unpatched, and for every r the merged model and its cut limit, the
same token counts per block with tokens cut instead of merged) is exported to ONNX
once with a dynamic batch and once more for every batch size with a static one, and
loaded into ONNX Runtime sessions with as many threads as torch uses. For each batch
size, the eager models are timed interleaved, then the dynamic-batch sessions, then
the static ones (each runtime apart, so that one's idle threads do not take the
others' cores), and a Markdown table of medians is printed:

    python benchmarks/onnx_speed.py                 # vit_small_patch16_224, r=8,13,16, batch 32 and 1
    python benchmarks/onnx_speed.py --threads 2 --batch-sizes 1 --runs 100
    python benchmarks/onnx_speed.py --threads 2 --batch-sizes 32 --r 8,16 --one-loop

"speed-up" is over the unpatched model of the same runtime, "of limit" the merged
model's throughput over its cut limit's in the same runtime, and "/ eager" the ONNX
session's throughput over the eager model's at the same setting. Needs the ``onnx``
extra.
"""
from __future__ import annotations

import statistics
import warnings

import timm
import torch
from speed_options import parse, runs_of, speed_parser

from tokenmerge.state import CappedRWarning
from tokenmerge.tools.bench import onnx_runners, prepare_runners
from tokenmerge.tools.reports import describe_environment, environment
from tokenmerge.tools.settings import Setting
from tokenmerge.tools.timing import spread_percent, time_interleaved

RUNTIMES = {"eager": "eager", "dynamic": "ONNX, dynamic batch", "static": "ONNX, static batch"}


def settings_for(rs: list[int]) -> list[Setting]:
    settings = [Setting("unpatched")]
    for r in rs:
        settings += [Setting(f"r={r}", r), Setting(f"cut r={r}", r, "cut")]
    return settings


def measure(runners: dict[str, dict], settings: list[Setting], batch_size: int, img_size: tuple[int, int],
            runs: int, warmup: int, one_loop: bool = False) -> list[dict]:
    inputs = torch.randn(batch_size, 3, *img_size)
    times = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        loops = [RUNTIMES] if one_loop else [[runtime] for runtime in RUNTIMES]
        for runtimes in loops:
            every = {(runtime, name): run for runtime in runtimes for name, run in runners[runtime].items()}
            title = "all runtimes" if one_loop else RUNTIMES[runtimes[0]]
            times |= time_interleaved(every, inputs, runs, warmup, description=f"{title}, batch {batch_size}")
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for setting in settings:
        if setting.method == "cut":
            continue
        row = {"batch": batch_size, "setting": setting.name}
        for runtime in RUNTIMES:
            name, limit = (runtime, setting.name), (runtime, f"cut {setting.name}")
            row[runtime] = {
                "img/s": batch_size / median[name],
                "IQR %": spread_percent(times[name]),
                "speed-up": median[(runtime, "unpatched")] / median[name],
                "of limit": median[limit] / median[name] if limit in median else None,
            }
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def share(value):
        return "" if value is None else f"{100 * value:.1f}%"

    lines = ["| batch | setting | runtime | img/s | IQR % | speed-up | of limit | / eager |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        eager = row["eager"]["img/s"]
        for runtime, title in RUNTIMES.items():
            figures = row[runtime]
            versus = "" if runtime == "eager" else f"{figures['img/s'] / eager:.2f}x"
            lines.append(f"| {row['batch']} | {row['setting']} | {title} | {figures['img/s']:.1f} | "
                         f"{figures['IQR %']:.1f} | {figures['speed-up']:.2f}x | {share(figures['of limit'])} | "
                         f"{versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = speed_parser(__doc__.split("\n\n")[0], runs_at_batch_1=60)
    parser.add_argument("--one-loop", action="store_true",
                        help="time every setting of every runtime in one interleaved loop, so that slow drifts of "
                        "a shared machine fall on all runtimes alike (default: each runtime in a loop of its own)")
    args = parse(parser)
    model = timm.create_model(args.model).eval()
    img_size = tuple(model.patch_embed.img_size)
    settings = settings_for(args.r)
    print(f"{args.model}, float32, random weights; {describe_environment(environment())}\n", flush=True)
    eager, (dynamic, _) = prepare_runners(model, settings, False), onnx_runners(model, settings, img_size, True)
    rows = []
    for batch_size in args.batch_sizes:
        static, _ = onnx_runners(model, settings, img_size, True, static_batch=batch_size)
        runners = {"eager": eager, "dynamic": dynamic, "static": static}
        rows += measure(runners, settings, batch_size, img_size, runs_of(args, batch_size), args.warmup,
                        args.one_loop)
    print(markdown(rows))


if __name__ == "__main__":
    main()
