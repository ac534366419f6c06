"""Which rotary position a merged token takes: the rules of :mod:`tokenmerge.rope`
compared by how far each moves a merged rotary model from the unmerged one.

    python benchmarks/rope_rules.py --shared ../shared --threads 2   # about 4 minutes on 2 cores

No trained rotary model can be loaded here (no model hub), so the models are timm's
registered rotary ViTs with random weights (their own init), fed real photographs
through their own transforms; the classifier is re-drawn with unit-scale logits
(timm scales a fresh head by 0.001, which would make every KL vanish). What is
measured is how much merging perturbs a network whose attention depends on rotary
positions; it says nothing about accuracy, which needs trained weights.

Prints one Markdown table: for each model, r and rule, the mean KL divergence of the
merged model's outputs from the unmerged model's, the share of images whose top-1
class changed, and the mean cosine similarity of the pooled features.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import tokenmerge
from tokenmerge import rope
from tokenmerge.adapters.timm import MergingEvaBlock
from tokenmerge.tools.data import ImageFiles, synset_samples
from tokenmerge.tools.models import create_timm_model, timm_transform

MODELS = ("eva02_small_patch14_224", "vit_small_patch16_dinov3", "vit_small_patch16_rope_224")


def load_images(shared: Path, model: torch.nn.Module, count: int) -> Tensor:
    samples = synset_samples(shared / "data" / "imagenet-sample")[:count]
    loader = torch.utils.data.DataLoader(ImageFiles(samples, timm_transform(model)), batch_size=count)
    return next(iter(loader))[0]


def outputs(model: torch.nn.Module, images: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(logits, pooled features) of every image."""
    logits, features = [], []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            pooled = model.forward_head(model.forward_features(batch), pre_logits=True)
            features.append(pooled)
            logits.append(model.get_classifier()(pooled))
    return torch.cat(logits), torch.cat(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="the folder of the shared files")
    parser.add_argument("--images", type=int, default=100, help="photographs of the shared sample to use")
    parser.add_argument("--r", default="8,13", help="comma-separated r values")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rs = [int(r) for r in args.r.split(",")]
    print(f"random-weight rotary ViTs, {args.images} photographs, threads {torch.get_num_threads()}\n")
    print("| model | r | rule | KL from unmerged | top-1 changed % | feature cosine |\n|---|---|---|---|---|---|",
          flush=True)
    for name in MODELS:
        torch.manual_seed(0)
        model = create_timm_model(name, num_classes=1000)
        head = model.get_classifier()
        torch.nn.init.normal_(head.weight, std=model.num_features ** -0.5)
        images = load_images(args.shared, model, args.images)
        reference, reference_features = outputs(model, images, args.batch_size)
        for r in rs:
            for rule in rope.RULES:
                MergingEvaBlock.rope_rule = rule
                tokenmerge.apply(model, r=r)
                try:
                    logits, features = outputs(model, images, args.batch_size)
                finally:
                    tokenmerge.remove(model)
                    MergingEvaBlock.rope_rule = rope.DEFAULT_RULE
                kl = F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean")
                changed = (logits.argmax(1) != reference.argmax(1)).float().mean().item() * 100
                cosine = F.cosine_similarity(features, reference_features, dim=1).mean().item()
                print(f"| {name} | {r} | {rule} | {kl.item():.2e} | {changed:.1f} | {cosine:.4f} |", flush=True)


if __name__ == "__main__":
    main()
