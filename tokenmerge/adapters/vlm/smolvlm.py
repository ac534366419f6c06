"""SmolVLM (``SmolVLMForConditionalGeneration``): Idefics3's architecture (crops, a
pixel-shuffling connector; see :mod:`.idefics3`), with the placeholder check of
``get_placeholder_mask``; the frames of a video reach the model as crops of their own."""
from __future__ import annotations

from .idefics3 import Idefics3, ReducingCropsModel


class SmolVLM(Idefics3):
    name = "SmolVLM"
    model_classes = ("SmolVLMModel",)
    outer_classes = ("SmolVLMForConditionalGeneration",)
    processor_classes = ("SmolVLMProcessor",)

    def model_mixin(self) -> type:
        return ReducingCropsModel


FAMILY = SmolVLM()
