"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP (or SigLIP) tower whose hidden
state of layer ``vision_feature_layer`` (a list of layers: concatenated on channels)
reaches the language model through a projector of single tokens, the class token
dropped under ``vision_feature_select_strategy="default"``."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Family


class Llava(Family):
    name = "LLaVA-1.5"
    model_classes = ("LlavaModel",)
    outer_classes = ("LlavaForConditionalGeneration",)
    processor_classes = ("LlavaProcessor",)

    def tower_features(self, inner: Any, outputs: Any) -> tuple[Tensor, int]:
        index = self._deepest_layer(inner)
        features = outputs.hidden_states[index]
        return features[:, self.dropped_prefix(inner):], index

    def feature_layers(self, inner: Any) -> int:
        return self._deepest_layer(inner)

    def dropped_prefix(self, inner: Any) -> int:
        return 1 if inner.config.vision_feature_select_strategy == "default" else 0

    def _deepest_layer(self, inner: Any) -> int:
        """The index in ``hidden_states`` (0: the embeddings) of the deepest layer read:
        also the number of layers that made it."""
        layer = inner.config.vision_feature_layer
        layers = layer if isinstance(layer, (list, tuple)) else [layer]
        count = len(self.layers(inner)) + 1
        return max(index % count for index in layers)


FAMILY = Llava()
