"""Merging rules tried against ToMe on the shared ViT-Ti, at ToMe's token counts, on
the same held-out photographs as ``tune_fidelity.py``: the exploratory round that
the documentation reports under Results, "Tuned schedules".

    python benchmarks/merge_rules.py --shared ../shared        # about 6 minutes on 2 cores

Every rule removes exactly ToMe's tokens in every block, so all of them cost the same
and only their outputs are compared (FLOPs differ only in the matching). The rules
here are not methods of the library: each is a :class:`tokenmerge.methods.Method`
registered with :func:`tokenmerge.methods.register` for the length of its row. Some
rows scale the log-size bias of proportional attention, which the library has no
setting for: their rule carries every size s as s ** scale, which proportional
attention (and the class attention of ``tome-attended``) turns into ``scale * log s``,
and merges with the sizes themselves (the model pools its class token, so no pooling
reads the sizes).

Prints one Markdown table: for every rule at every schedule, the KL divergence from
the unmerged model's outputs and the share of images whose top-1 changed, on the
tuning half and on the held-out half (top-1 accuracy on the held-out half too).
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import tokenmerge
from tokenmerge import methods
from tokenmerge.kernels import merge_weighted
from tokenmerge.merge import Matching, descending_order, in_index_order
from tokenmerge.methods import Evidence, Method, Reduction, class_attention, follow_merge, merge, sum_over_heads
from tokenmerge.tools.data import ImageFiles, class_folders, synset_samples
from tokenmerge.tools.models import create_timm_model, timm_transform

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CHECKPOINT = "models/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
#: The schedules ``tune_fidelity.py`` found at the FLOPs of ToMe r=13 and r=16 (Results).
TUNED = {13: [8, 6, 15, 13, 14, 20, 17, 18, 19, 12, 17, 6], 16: [16, 12, 20, 18, 16, 20, 16, 14, 13, 12, 12, 4]}
#: The name every row's rule is registered under while its row runs.
EXPLORED = "explored"

Similarity = Callable[[Tensor, Tensor, Evidence, int], Tensor]


def cosine(v: Tensor, p: int) -> Tensor:
    """(B, |A|, |B|) cosine similarities of the A and B tokens of ``v``."""
    v = F.normalize(v, dim=-1)
    return v[:, p::2] @ v[:, p + 1::2].mT


def ward(v: Tensor, size: Tensor, p: int) -> Tensor:
    """(B, |A|, |B|) minus Ward's cost of merging each pair: the growth of the
    size-weighted squared spread, s_a s_b / (s_a + s_b) |v_a - v_b|^2."""
    a, b = v[:, p::2], v[:, p + 1::2]
    size_a, size_b = size[:, p::2], size[:, p + 1::2].mT
    distance = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1)[:, None] - 2 * a @ b.mT
    return -(size_a * size_b / (size_a + size_b)) * distance


SIMILARITIES: dict[str, Similarity] = {
    "keys": lambda x, size, evidence, p: cosine(sum_over_heads(evidence.keys), p),
    "tokens after attention": lambda x, size, evidence, p: cosine(x, p),
    "Ward on tokens after attention": lambda x, size, evidence, p: ward(x, size, p),
    "Ward on keys": lambda x, size, evidence, p: ward(sum_over_heads(evidence.keys), size, p),
}


def rule(similarity: Similarity, attended_cost: float = 0.0, partner_by_cost: bool = False,
         norm_preserving: bool = False) -> Method[Any]:
    """A merging rule: bipartite matching by ``similarity`` of the tokens after the
    attention branch; with ``attended_cost``, every link's score lowered by the class
    attention of its two tokens as in ``tome-attended`` (charged after the partner is
    chosen, or with ``partner_by_cost`` in choosing it); with ``norm_preserving``,
    every merged token rescaled to the size-weighted mean norm of its parts."""

    def plan(evidence: Evidence, r: int, num_protected: int):
        cost = None
        if attended_cost:
            attended = class_attention(evidence)
            cost = attended_cost * attended.shape[1] * attended
        return evidence, r, num_protected, cost

    def reduce(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], planned):
        evidence, r, p, cost = planned
        weights = torch.ones(*x.shape[:2], 1) if size is None else size
        scores = similarity(x, weights, evidence, p)
        if cost is not None and partner_by_cost:
            scores = scores - cost[:, p::2, None] - cost[:, None, p + 1::2]
        best, partner = scores.max(dim=-1)
        if cost is not None and not partner_by_cost:
            best = best - cost[:, p::2] - cost[:, p + 1::2].gather(1, partner)
        matching = Matching(in_index_order(descending_order(best), r), partner, r, p, x.shape[1])
        out, new_size, source = merge(x, size, source, matching)
        if norm_preserving:
            norms, _ = merge_weighted(x.norm(dim=-1, keepdim=True), size, matching)
            out = out * (norms / out.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return out, new_size, source

    return Method(plan, reduce, follow_merge, merges=True, matches=True)


def size_bias_scaled(method: Method[Any], scale: float) -> Method[Any]:
    """``method`` with proportional attention biased by ``scale * log s`` instead of
    ``log s``: the blocks carry every size s as s ** scale, and ``method`` merges with
    the sizes themselves."""

    def reduce(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], plan: Any) -> Reduction:
        x, size, source = method.reduce(x, None if size is None else size ** (1 / scale), source, plan)
        return x, None if size is None else size ** scale, source

    return dataclasses.replace(method, reduce=reduce)


class Row(NamedTuple):
    """One row of the table: a rule and whether its attention is proportional."""

    name: str
    method: Method[Any]
    prop_attn: bool = True


def rows(tuned: bool) -> list[Row]:
    """Every row: at a constant r, the rules; at a tuned schedule, ``tome-attended``'s variants."""
    keys, attended = SIMILARITIES["keys"], methods.ATTENDED_COST
    if tuned:
        return [
            Row("tome-attended", rule(keys, attended)),
            Row("tome-attended, partner chosen by class attention", rule(keys, attended, partner_by_cost=True)),
            Row("tome-attended, partner chosen by class attention, log-size bias x0.8",
                size_bias_scaled(rule(keys, attended, partner_by_cost=True), 0.8)),
            *[Row(f"tome-attended, class-attention weight {cost:g}", rule(keys, cost)) for cost in (0.03, 0.08, 0.12)],
            *[Row(f"tome-attended, class-attention weight {cost:g}, partner chosen by it",
                  rule(keys, cost, partner_by_cost=True)) for cost in (0.03, 0.08, 0.12)],
        ]
    return [
        Row("tome", rule(keys)),
        Row("tome-attended", rule(keys, attended)),
        Row("tome, norm-preserving", rule(keys, norm_preserving=True)),
        Row("tome-attended, norm-preserving", rule(keys, attended, norm_preserving=True)),
        *[Row(f"tome-attended, log-size bias x{scale:g}", size_bias_scaled(rule(keys, attended), scale))
          for scale in (0.5, 0.65, 0.8, 1.2, 1.5)],
        Row("tome-attended, no log-size bias", rule(keys, attended), prop_attn=False),
        *[Row(f"tome, {name}", rule(similarity)) for name, similarity in SIMILARITIES.items() if name != "keys"],
        Row("tome-attended, partner chosen by class attention", rule(keys, attended, partner_by_cost=True)),
    ]


def row_logits(model: torch.nn.Module, row: Row, r: Any, images: Tensor, batch_size: int) -> Tensor:
    """The model's outputs with ``row``'s rule at schedule ``r``, registered for this row only."""
    methods.register(EXPLORED, row.method)
    tokenmerge.apply(model, r=r, method=EXPLORED, prop_attn=row.prop_attn)
    try:
        return logits(model, images, batch_size)
    finally:
        tokenmerge.remove(model)
        methods.unregister(EXPLORED)


def load_sample(shared: Path, batch_size: int) -> tuple[Tensor, Tensor, Tensor, torch.nn.Module]:
    """The sample's photographs through the model's transform, their labels, which half
    each is in (0: tuning, the even-numbered classes; 1: held out) and the model."""
    model = create_timm_model(MODEL, shared / CHECKPOINT)
    root = shared / "data" / "imagenet-sample"
    half_of = {folder.name: index % 2 for index, folder in enumerate(class_folders(root))}
    samples = synset_samples(root)
    loader = torch.utils.data.DataLoader(ImageFiles(samples, timm_transform(model)), batch_size=batch_size)
    images, labels = map(torch.cat, zip(*loader))
    halves = torch.tensor([half_of[path.parent.name] for path, _ in samples])
    return images, labels, halves, model


def logits(model: torch.nn.Module, images: Tensor, batch_size: int) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(batch) for batch in images.split(batch_size)])


def fidelity(out: Tensor, reference: Tensor, labels: Tensor) -> tuple[float, float, float]:
    """Mean KL divergence from the reference outputs, % of top-1 changed, top-1 %."""
    kl = F.kl_div(out.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="none").sum(1)
    differs = (out.argmax(1) != reference.argmax(1)).float().mean().item() * 100
    return kl.mean().item(), differs, (out.argmax(1) == labels).float().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="the folder of the shared files")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels, halves, model = load_sample(args.shared, args.batch_size)
    reference = logits(model, images, args.batch_size)
    schedules = {"r=13": 13, "r=16": 16, "tuned at r=13's FLOPs": TUNED[13], "tuned at r=16's FLOPs": TUNED[16]}
    print("| schedule | rule | tuning KL | tuning differs % | held-out KL | held-out differs % | held-out top-1 % |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for schedule_name, r in schedules.items():
        for row in rows(tuned=schedule_name.startswith("tuned")):
            out = row_logits(model, row, r, images, args.batch_size)
            tuning = fidelity(out[halves == 0], reference[halves == 0], labels[halves == 0])
            held = fidelity(out[halves == 1], reference[halves == 1], labels[halves == 1])
            print(f"| {schedule_name} | {row.name} | {tuning[0]:.4f} | {tuning[1]:.1f} | {held[0]:.4f} | "
                  f"{held[1]:.1f} | {held[2]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
