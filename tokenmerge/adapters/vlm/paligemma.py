"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``): a SigLIP tower
whose ``last_hidden_state`` reaches the language model through a projector of single
tokens; the processor gives every image ``image_seq_length`` placeholders."""
from __future__ import annotations

from .base import Family


class PaliGemma(Family):
    name = "PaliGemma"
    model_classes = ("PaliGemmaModel",)
    outer_classes = ("PaliGemmaForConditionalGeneration",)
    processor_classes = ("PaliGemmaProcessor",)


FAMILY = PaliGemma()
