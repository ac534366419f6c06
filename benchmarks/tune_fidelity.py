"""Tuned schedules and ``tome-attended`` against ToMe at the same measured speed, on
photographs the tuning never saw, and how close ``tune --speedup S`` lands to S.

    python benchmarks/tune_fidelity.py --shared ../shared            # about 40 minutes on 2 cores
    python benchmarks/tune_fidelity.py --shared ../shared --budget-minutes 2 --speedups 1.8

The shared ImageNet sample (one photograph for each of 500 classes) is split by
class into two halves: schedules are tuned on the first (labels unused) and every
figure is measured on the second. In order:

1. ``tune --flops`` finds a schedule at the FLOPs of ToMe r=13 and of r=16 (the same
   cost; a speed-up measured once on a shared machine moves by several percent from
   run to run, FLOPs do not);
2. ``compare`` evaluates, on the held-out half, ToMe and ``tome-attended`` at r=13 and
   r=16 and the two tuned schedules, every batch through every setting, so that their
   speeds are measured in one run, and draws disagreement and top-1 against speed;
3. ``tune --speedup S`` for every ``--speedups`` value, and ``bench`` measures every
   such schedule again in a run of its own.

It prints two Markdown tables: the held-out comparison, and the speed-up every
tuned schedule was asked for against the one ``bench`` measured (``--speedups ""``
leaves that part out).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import timm

import tokenmerge as library
from tokenmerge.tools.cli import main as tokenmerge

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CHECKPOINT = "models/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"


def split_sample(sample: Path, root: Path) -> tuple[Path, Path]:
    """Links to the sample's photographs in two synset-folder trees: even-numbered
    classes to tune on, odd-numbered ones to measure on."""
    halves = root / "tune", root / "held-out"
    for index, folder in enumerate(sorted(p for p in sample.iterdir() if p.is_dir())):
        target = halves[index % 2] / folder.name
        target.mkdir(parents=True)
        for image in folder.iterdir():
            (target / image.name).symlink_to(image.resolve())
    return halves


def run(*args: str) -> None:
    if tokenmerge(list(args)) != 0:
        raise SystemExit(f"tokenmerge {args[0]} failed")


def bench_speedups(model: list[str], r: str, batch_size: int, runs: int, output: Path) -> list[float]:
    """The speed-ups ``bench`` measures for the settings of ``r`` (a sweep), in order."""
    run("bench", *model, "--r", r, "--batch-size", str(batch_size), "--runs", str(runs), "--output", str(output))
    return [row["speedup"] for row in json.loads(output.read_text())["rows"][1:]]


def tome_gflops(r: int) -> float:
    """GFLOPs per image of the ViT-Ti with ToMe at a constant ``r``."""
    return library.flops_per_image(timm.create_model(MODEL.split(".")[0]), r) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="the folder of the shared files")
    parser.add_argument("--budget-minutes", type=float, default=5.0, help="tuning time per schedule (default: 5)")
    parser.add_argument("--speedups", default="1.5,1.8,2.0", help="speed-ups to tune for and re-measure")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of every timing (default: 16)")
    parser.add_argument("--runs", type=int, default=20, help="timed rounds of every bench run (default: 20)")
    parser.add_argument("--output", type=Path, default=Path("tune-fidelity"), help="folder for the files written")
    args = parser.parse_args()
    model = ["--model", MODEL, "--checkpoint", str(args.shared / CHECKPOINT)]
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tune_half, held_out = split_sample(args.shared / "data" / "imagenet-sample", Path(scratch))
        files = {}
        for r in (13, 16):
            files[r] = args.output / f"tuned-flops-r{r}.json"
            gflops = tome_gflops(r)
            run("tune", *model, "--data", str(tune_half), "--images", "250", "--flops", f"{gflops:.9f}",
                "--budget-minutes", str(args.budget_minutes), "--batch-size", str(args.batch_size),
                "--output", str(files[r]))
        sweep = ",".join(["13", "16", f"@{files[13]}", f"@{files[16]}"])
        run("compare", *model, "--data", str(held_out), "--methods", "tome,tome-attended", "--r", sweep,
            "--batch-size", str(args.batch_size), "--output", str(args.output / "compare.json"),
            "--plot", str(args.output / "compare.png"))
        targets = {float(s): args.output / f"tuned-{float(s):g}x.json" for s in args.speedups.split(",") if s}
        remeasured = {}
        for speedup, path in targets.items():
            run("tune", *model, "--data", str(tune_half), "--images", "250", "--speedup", str(speedup),
                "--budget-minutes", str(args.budget_minutes), "--batch-size", str(args.batch_size),
                "--output", str(path))
            (remeasured[speedup],) = bench_speedups(model, f"@{path}", args.batch_size, args.runs,
                                                    args.output / f"bench-{path.stem}.json")
    rows = json.loads((args.output / "compare.json").read_text())["rows"]
    print("\n| setting | schedule | speed-up | top-1 differs % | KL | top-1 % |\n|---|---|---|---|---|---|")
    for row in rows:
        schedule = row["r"]
        if schedule.startswith("@"):
            schedule = "/".join(map(str, json.loads(Path(schedule[1:]).read_text())["r"]))
        print(f"| {row['setting'].replace(str(args.output) + '/', '')} | {schedule} | {row['speedup']:.2f}x | "
              f"{row['disagreement']:.1f} | {row['kl']:.4f} | {row['top1']:.1f} |")
    print("\n| tune --speedup | measured by tune | measured again by bench | off by |\n|---|---|---|---|")
    for speedup, path in targets.items():
        tuned = json.loads(path.read_text())["measured_speedup"]
        print(f"| {speedup:g} | {tuned:.2f}x | {remeasured[speedup]:.2f}x | "
              f"{100 * (remeasured[speedup] / speedup - 1):+.1f}% |")


if __name__ == "__main__":
    main()
