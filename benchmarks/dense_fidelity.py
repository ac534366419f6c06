"""Dense features from a merged model: how close the patch grid that ``dense=True``
returns (every patch takes the features of the token it ended in) comes to the
unmerged model's, beside the obvious alternative at the same cost, a smaller input
whose feature grid is upsampled back.

    python benchmarks/dense_fidelity.py --shared ../shared --threads 2   # about 2 minutes on 2 cores

The shared ViT-Ti checkpoint on the shared photographs. For every r the smaller input
is the multiple of the patch size whose FLOPs come closest to the merged model's (the
same weights, position embeddings resampled by timm); its grid is upsampled
bilinearly to the full grid. Prints one Markdown table: per-patch cosine similarity to
the unmerged model's final patch features (mean and 5th percentile over every patch
of every photograph) and FLOPs per image.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import tokenmerge
from tokenmerge.tools.data import ImageFiles, synset_samples
from tokenmerge.tools.models import create_timm_model, timm_transform

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CHECKPOINT = "models/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"


def patch_features(model: torch.nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """(B, grid, grid, C) final patch features, prefix tokens left out."""
    out = []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            tokens = model.forward_features(batch)[:, model.num_prefix_tokens:]
            side = int(tokens.shape[1] ** 0.5)
            out.append(tokens.reshape(len(batch), side, side, -1))
    return torch.cat(out)


def cosine_stats(features: Tensor, reference: Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(features, reference, dim=-1).flatten()
    return cosine.mean().item(), cosine.quantile(0.05).item()


def upsampled(features: Tensor, grid: int) -> Tensor:
    """(B, g, g, C) features bilinearly resized to (B, grid, grid, C)."""
    resized = F.interpolate(features.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="the folder of the shared files")
    parser.add_argument("--images", type=int, default=100, help="photographs of the shared sample to use")
    parser.add_argument("--r", default="4,8,13", help="comma-separated r values")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_timm_model(MODEL, args.shared / CHECKPOINT, dynamic_img_size=True)
    samples = synset_samples(args.shared / "data" / "imagenet-sample")[:args.images]
    loader = torch.utils.data.DataLoader(ImageFiles(samples, timm_transform(model)), batch_size=args.images)
    images = next(iter(loader))[0]
    size, patch = images.shape[-1], model.patch_embed.patch_size[0]
    reference = patch_features(model, images, args.batch_size)
    grid = reference.shape[1]
    full_flops = tokenmerge.flops_per_image(model, r=0)
    print(f"{MODEL}, {args.images} photographs, threads {torch.get_num_threads()}; unmerged: {full_flops / 1e9:.2f} "
          "GFLOPs per image\n")
    print("| r | merged, dense: cosine mean | 5th pct | GFLOPs | smaller input | upsampled: cosine mean | 5th pct "
          "| GFLOPs |\n|---|---|---|---|---|---|---|---|", flush=True)
    for r in (int(r) for r in args.r.split(",")):
        tokenmerge.apply(model, r=r, dense=True)
        try:
            dense = patch_features(model, images, args.batch_size)
            merged_flops = tokenmerge.flops_per_image(model)
        finally:
            tokenmerge.remove(model)
        sides = range(patch * 2, size, patch)
        flops = {side: tokenmerge.flops_per_image(model, r=0, img_size=(side, side)) for side in sides}
        side = min(sides, key=lambda s: abs(flops[s] - merged_flops))
        small = F.interpolate(images, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        low = upsampled(patch_features(model, small, args.batch_size), grid)
        dense_mean, dense_low = cosine_stats(dense, reference)
        low_mean, low_low = cosine_stats(low, reference)
        print(f"| {r} | {dense_mean:.4f} | {dense_low:.4f} | {merged_flops / 1e9:.2f} | {side}x{side} | {low_mean:.4f} "
              f"| {low_low:.4f} | {flops[side] / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
