"""Speed of one denoiser call of diffusion models with token merging, against the
unpatched model and tomesd.

    python benchmarks/diffusion.py                          # SD 1.5's UNet, 64 x 64 latent, batch 2, 1 thread
    python benchmarks/diffusion.py --ratios 0.3,0.5 --runs 5 --threads 4
    python benchmarks/diffusion.py --merge-mlp --max-downsample 2
    python benchmarks/diffusion.py --cpu-time               # the process's CPU time: on a busy machine
    python benchmarks/diffusion.py --quick --runs 1         # tiny widths: that it runs

Section ``sd15``: diffusers' ``UNet2DConditionModel`` with Stable Diffusion 1.5's
configuration (block_out_channels 320, 640, 1280, 1280; cross-attention to 77 CLIP
tokens 768 wide; 8 heads; 4 down blocks) and random weights, a 64 x 64 latent (512 px)
at batch 2, as under classifier-free guidance, SDPA attention, one denoiser call
without gradients. Settings, timed interleaved in one run (unpatched, tomesd,
tokenmerge, unpatched, ...; warm-up rounds excluded), one UNet patched and unpatched
in turn: the unpatched UNet, tomesd's ``apply_patch`` and ``tokenmerge.apply`` at equal
options, every ``--ratios`` value. ``use_rand=False`` by default, so that both merge the
same tokens; the table gives the largest difference of tokenmerge's output to tomesd's.
Times are wall clock, or with ``--cpu-time`` the process's CPU time, which on one
thread leaves out the time other processes hold the core.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import diffusers
import torch
from torch import Tensor, nn

import tokenmerge
from tokenmerge.tools.timing import interquartile_range

#: The issue's target: tokenmerge at least this many times tomesd's speed on the SD 1.5 shape.
TARGET_OVER_TOMESD = 1.10


def sd15_unet(quick: bool) -> nn.Module:
    """SD 1.5's UNet with random weights (tiny widths with ``quick``)."""
    widths = (32, 32, 64, 64) if quick else (320, 640, 1280, 1280)
    context = 32 if quick else 768
    return diffusers.UNet2DConditionModel(
        sample_size=64, block_out_channels=widths, cross_attention_dim=context, attention_head_dim=8,
        layers_per_block=2, norm_num_groups=8 if quick else 32,
    ).eval()


def sd15_inputs(unet: nn.Module, batch: int, latent: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    context = unet.config.cross_attention_dim
    return dict(sample=torch.randn(batch, 4, latent, latent, generator=generator),
                timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=torch.randn(batch, 77, context, generator=generator))


def denoiser_call(unet: nn.Module, inputs: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """One call of ``unet``, its sample given positionally (tomesd's hook reads it so)."""
    rest = {name: value for name, value in inputs.items() if name != "sample"}

    def run(sample: Tensor) -> Tensor:
        return unet(sample, **rest, return_dict=False)[0]

    return run


def patched_runs(unet: nn.Module, options: dict[str, Any]) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """(patch, unpatch) of every setting but the unpatched one."""
    import tomesd

    return {
        "tomesd": (lambda: tomesd.apply_patch(unet, **options), lambda: tomesd.remove_patch(unet)),
        "tokenmerge": (lambda: tokenmerge.apply(unet, **options), lambda: tokenmerge.remove(unet)),
    }


def time_sd15(args: argparse.Namespace) -> list[str]:
    """The rows of the ``sd15`` section's table."""
    unet = sd15_unet(args.quick)
    inputs = sd15_inputs(unet, args.batch, args.latent)
    run = denoiser_call(unet, inputs)
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = []
    for ratio in args.ratios:
        options = dict(ratio=ratio, max_downsample=args.max_downsample, use_rand=args.use_rand,
                       merge_mlp=args.merge_mlp, merge_crossattn=args.merge_crossattn)
        settings = {"unpatched": (lambda: None, lambda: None), **patched_runs(unet, options)}
        times: dict[str, list[float]] = {name: [] for name in settings}
        outputs: dict[str, Tensor] = {}
        with torch.inference_mode():
            for round_index in range(args.warmup + args.runs):
                for name, (patch, unpatch) in settings.items():
                    patch()
                    start = clock()
                    outputs[name] = run(inputs["sample"])
                    seconds = clock() - start
                    unpatch()
                    if round_index >= args.warmup:
                        times[name].append(seconds)
        difference = (outputs["tokenmerge"] - outputs["tomesd"]).abs().max().item()
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows += [table_row(ratio, name, values, medians, difference if name == "tokenmerge" else None)
                 for name, values in times.items()]
    return rows


def table_row(ratio: float, name: str, values: list[float], medians: dict[str, float],
              difference: float | None) -> str:
    """One setting's row: median ms, its spread, the speed-ups over the unpatched UNet
    and tomesd, and (tokenmerge's row) the largest difference of its output to tomesd's."""
    median = medians[name]
    spread = 100 * interquartile_range(values) / median
    shown = "" if difference is None else f"{difference:.1e}"
    return (f"| {ratio:g} | {name} | {median * 1e3:.0f} | {spread:.1f} | {medians['unpatched'] / median:.2f}x | "
            f"{medians['tomesd'] / median:.2f}x | {shown} |")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=lambda text: [float(part) for part in text.split(",")], default=[0.5],
                        help="comma-separated merge ratios (default: 0.5)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default: 2, classifier-free guidance)")
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (default: 64, 512 px)")
    parser.add_argument("--max-downsample", type=int, default=1, help="tomesd's max_downsample (default: 1)")
    parser.add_argument("--merge-mlp", action="store_true", help="merge for the MLP too")
    parser.add_argument("--merge-crossattn", action="store_true", help="merge for cross-attention too")
    parser.add_argument("--use-rand", action="store_true", help="random destinations (then outputs differ)")
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time, not wall clock")
    parser.add_argument("--quick", action="store_true", help="tiny widths, for a check that it runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print(f"SD 1.5 UNet, random weights, {args.latent} x {args.latent} latent, batch {args.batch}, "
          f"{args.threads} thread(s), {torch.__version__}, diffusers {diffusers.__version__}; max_downsample="
          f"{args.max_downsample}, merge_mlp={args.merge_mlp}, merge_crossattn={args.merge_crossattn}, "
          f"use_rand={args.use_rand}; median of {args.runs} interleaved rounds after {args.warmup} warm-up, "
          f"{'CPU time' if args.cpu_time else 'wall clock'}\n")
    print("| ratio | setting | ms | IQR % | vs unpatched | vs tomesd | max abs diff to tomesd |")
    print("|---|---|---|---|---|---|---|")
    for row in time_sd15(args):
        print(row)
    print(f"\nTarget: tokenmerge >= {TARGET_OVER_TOMESD:.2f}x tomesd's speed.")


if __name__ == "__main__":
    main()
