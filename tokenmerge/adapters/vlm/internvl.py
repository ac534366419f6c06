"""InternVL (``InternVLForConditionalGeneration``): an InternViT tower over every crop of an
image (the processor tiles an image into crops and adds a thumbnail of the whole), whose
grid of layer ``vision_feature_layer`` (class token dropped) is pixel-shuffled, 1 /
``downsample_ratio`` x 1 / ``downsample_ratio`` cells to the channels of one token, before
the projector; the processor writes one run of ``image_seq_length`` placeholders per crop,
all of an image's crops in one run between ``<img>`` and ``</img>``, and every frame of a
video as an image of one crop.

The shuffle needs the whole grid, so tokens are reduced after the projector, every crop
on its own (each crop is an image of :func:`tokenmerge.get_state`), matched on the
tower's keys shuffled as the model shuffles the tokens and averaged over the cells of
each token.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .base import Family, ReducingProcessor, cell_means, head_mean


class InternVL(Family):
    name = "InternVL"
    model_classes = ("InternVLModel",)
    outer_classes = ("InternVLForConditionalGeneration",)
    processor_classes = ("InternVLProcessor",)

    def layers(self, inner: Any) -> Sequence[Any]:
        return self.tower(inner).encoder.layer

    def tower_features(self, inner: Any, outputs: Any) -> tuple[Tensor, int]:
        """The layer the model reads (its config's ``vision_feature_layer``, as
        ``get_image_features`` reads it: -1 is the tower's last hidden state)."""
        layer, depth = inner.config.vision_feature_layer, len(self.layers(inner))
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        layers_run = depth if layer == -1 else layer % (depth + 1)
        return features[:, self.dropped_prefix(inner):], layers_run

    def layer_keys(self, layer: Any, features: Tensor) -> Tensor:
        attention = layer.attention
        return head_mean(attention.k_norm(attention.k_proj(layer.layernorm_before(features))), attention.num_heads)

    def keys(self, inner: Any, features: Tensor, layers_run: int) -> Tensor:
        keys = super().keys(inner, features, layers_run)
        side = round(keys.shape[1] ** 0.5)
        ratio = inner.config.downsample_ratio
        shuffled = inner.pixel_shuffle(keys.unflatten(1, (side, side)), scale_factor=ratio)
        return cell_means(shuffled.flatten(1, 2), round(1 / ratio) ** 2)

    def dropped_prefix(self, inner: Any) -> int:
        return 1 if inner.config.vision_feature_select_strategy == "default" else 0

    def feature_layers(self, inner: Any) -> int:
        raise TypeError("tokenmerge cannot merge inside InternVL's vision tower: its pixel shuffle needs the whole "
                        "patch grid of every crop; use visual_tokens=K, which reduces the tokens after it")

    def processor_mixin(self) -> type:
        return ReducingInternVLProcessor


class ReducingInternVLProcessor(ReducingProcessor):
    """InternVL's processor, which writes all crops of an image as one run of placeholders:
    every crop's ``image_seq_length`` of them become that crop's kept count."""

    image_seq_length: int

    def _tokenmerge_count(self, placeholders: int) -> int:
        crops = placeholders // self.image_seq_length
        return crops * super()._tokenmerge_count(self.image_seq_length)


FAMILY = InternVL()
