"""Counting correct predictions: the one top-1/top-5 counter of every tool."""
from __future__ import annotations

import torch


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many labels are the top prediction, and how many are among the top five."""
    if len(labels) == 0:
        return 0, 0
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return int(hits[:, 0].sum()), int(hits.any(dim=-1).sum())
