"""Counting correct predictions and differences from a reference model: the one
top-1/top-5 counter and the fidelity measures of every tool."""
from __future__ import annotations

import torch


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many labels are the top prediction, and how many are among the top five;
    a label below 0 (an image without one) counts as neither."""
    if len(labels) == 0:
        return 0, 0
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return int(hits[:, 0].sum()), int(hits.any(dim=-1).sum())


def disagreements(logits: torch.Tensor, reference: torch.Tensor) -> int:
    """How many images' top prediction differs from the reference model's on the same
    images: a paired measure of what merging changes, which needs no labels."""
    if len(logits) == 0:
        return 0
    return int((logits.argmax(dim=-1) != reference.argmax(dim=-1)).sum())


def kl_divergence_sum(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The sum over images of KL(reference || model), the divergence of the model's
    softmax distribution from the reference model's, in nats, computed in float64."""
    if len(logits) == 0:
        return 0.0
    log_p, log_q = reference.double().log_softmax(dim=-1), logits.double().log_softmax(dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum())
