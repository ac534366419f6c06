"""Fine-tuning with and without merging: training throughput and test accuracy.

Fine-tunes copies of the same pretrained ViT on the same images for the same number
of steps, one unmerged (r=0), one merged (r=13 by default) and, with ``--limit``, one
whose blocks simply cut the same number of tokens (the zero-overhead limit of the
merged copy's speed), and evaluates each on a test set at the r it was trained with.
The copies take their steps in turn on the very same batches (A, B, C, C, B, A, ...),
so the throughput ratios are measured under the same machine load; only the training
steps are timed (loading and augmenting images is shared and left out). Prints a
Markdown table:

    python benchmarks/train_speed.py                     # ViT-Ti on the shared CIFAR-10 images
    python benchmarks/train_speed.py --limit             # and the cut copy
    python benchmarks/train_speed.py --steps 50 --test-images 500   # a quick look

Defaults read the shared pretrained ViT-Ti and CIFAR-10 images from ../shared beside
the project root (``--checkpoint``, ``--train``, ``--test`` to point elsewhere).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import timm
import timm.optim
import timm.scheduler
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

import tokenmerge
from tokenmerge.tools.data import ImageFiles, class_folders, images_in
from tokenmerge.tools.models import create_timm_model, timm_transform
from tokenmerge.tools.reports import describe_environment, environment
from tokenmerge.tools.train import evaluate_accuracy, train_step

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def folder_dataset(root: Path, transform, limit: int | None = None) -> ImageFiles:
    """``<class>/<image>`` files labelled by the sorted class folder names; with
    ``limit``, an even share of every class."""
    folders = class_folders(root)
    per_class = None if limit is None else max(1, limit // len(folders))
    samples = [(path, label) for label, folder in enumerate(folders) for path in images_in(folder)[:per_class]]
    return ImageFiles(samples, transform)


def shown(path: Path) -> str:
    """``path`` relative to the working directory, as a user would type it."""
    return os.path.relpath(path)


def pretrained(checkpoint: Path, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same new classifier for both copies
    return create_timm_model(MODEL, checkpoint, num_classes=num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "models" / f"{MODEL}.safetensors")
    parser.add_argument("--train", type=Path, default=SHARED / "data" / "cifar10" / "train")
    parser.add_argument("--test", type=Path, default=SHARED / "data" / "cifar10" / "test")
    parser.add_argument("--r", type=int, default=13, help="r of the merged copy, in training and test (default: 13)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of each copy (default: 400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--test-images", type=int, help="evaluate on this many test images (default: all)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--limit", action="store_true", help="also train a copy that cuts r tokens per block")
    args = parser.parse_args()
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps must be more than the {args.warmup_steps} warm-up steps left out of the timing")
    if args.threads:
        torch.set_num_threads(args.threads)

    methods = {"r=0": None, f"r={args.r}": "tome"} | ({f"cut r={args.r}": "cut"} if args.limit else {})
    names = list(methods)
    models = {name: pretrained(args.checkpoint, 10, args.seed) for name in names}
    for name, method in methods.items():
        if method is not None:
            tokenmerge.apply(models[name], r=args.r, method=method)
    random.seed(args.seed)  # timm's augmentation draws from Python's generator
    train_set = folder_dataset(args.train, timm_transform(models["r=0"], is_training=True))
    test_set = folder_dataset(args.test, timm_transform(models["r=0"]), args.test_images)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, num_workers=0, drop_last=True,
                        sampler=RandomSampler(train_set, num_samples=args.steps * args.batch_size, generator=generator))
    optimizers = {name: timm.optim.create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=0.05)
                  for name, model in models.items()}
    schedulers = {name: timm.scheduler.create_scheduler_v2(optimizer, "cosine", num_epochs=args.steps,
                                                           warmup_epochs=args.steps // 20, warmup_lr=args.lr / 10)[0]
                  for name, optimizer in optimizers.items()}
    print(f"{MODEL} fine-tuned on {len(train_set)} images of {shown(args.train)} for {args.steps} steps of "
          f"{args.batch_size}, tested on {len(test_set)} images of {shown(args.test)}; steps of {', '.join(names)} "
          f"interleaved on the same batches; {describe_environment(environment('cpu'))}", flush=True)

    seconds = {name: [] for name in models}
    losses = {name: [] for name in models}
    for step, (images, labels) in enumerate(tqdm(loader, desc="training", unit="step")):
        for name in (names if step % 2 == 0 else reversed(names)):
            start = time.perf_counter()
            loss, _ = train_step(models[name], optimizers[name], images, labels)
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(loss)
            schedulers[name].step(step + 1)

    test_loader = DataLoader(test_set, batch_size=100, num_workers=2)
    rows = []
    for name, model in models.items():
        start = time.perf_counter()
        accuracy = evaluate_accuracy(model, test_loader, torch.device("cpu"))
        timed = seconds[name][args.warmup_steps:]
        rows.append({
            "copy": name,
            "img/s": args.batch_size / statistics.median(timed),
            "train s": sum(seconds[name]),
            "last loss": statistics.mean(losses[name][-20:]),
            "test top-1": accuracy,
            "test s": time.perf_counter() - start,
        })
    base = rows[0]["img/s"]
    print("| copy (r in training and test) | train img/s | speed-up | training time s | final loss (mean of last 20) "
          "| test top-1 % |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['copy']} | {row['img/s']:.1f} | {row['img/s'] / base:.2f}x | {row['train s']:.0f} | "
              f"{row['last loss']:.3f} | {row['test top-1']:.2f} |")


if __name__ == "__main__":
    main()
