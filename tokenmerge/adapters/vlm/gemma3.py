"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower whose 64x64 grid of
tokens the projector average-pools to ``mm_tokens_per_image`` (16x16), so the grid is
whole until the projector: tokens are reduced after it, matched on the tower's keys
pooled as the projector pools the tokens. Pan-and-scan crops are images of their own."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Family


class Gemma3(Family):
    name = "Gemma 3"
    model_classes = ("Gemma3Model",)
    outer_classes = ("Gemma3ForConditionalGeneration",)
    processor_classes = ("Gemma3Processor",)

    def keys(self, inner: Any, features: Tensor, layers_run: int) -> Tensor:
        keys = super().keys(inner, features, layers_run)
        projector = inner.multi_modal_projector
        side = projector.patches_per_image
        grid = keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], side, side)
        return projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def feature_layers(self, inner: Any) -> int:
        raise TypeError("tokenmerge cannot merge inside Gemma 3's vision tower: its projector pools the whole patch "
                        "grid; use visual_tokens=K, which reduces the tokens after the projector")


FAMILY = Gemma3()
