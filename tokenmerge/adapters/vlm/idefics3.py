"""Idefics3 (``Idefics3ForConditionalGeneration``): a SigLIP tower over every crop of an
image (the processor splits an image into square crops and adds the whole image, the
global crop, resized to one), whose grid the connector pixel-shuffles, ``scale_factor``
x ``scale_factor`` cells to the channels of one token, before its projection; the
processor writes one run of ``image_seq_len`` placeholders per crop.

The shuffle needs the whole grid, so tokens are reduced after the connector, every crop
on its own (each crop is an image of :func:`tokenmerge.get_state`, as Gemma 3's
pan-and-scan crops are), matched on the tower's keys shuffled as the connector shuffles
the tokens and averaged over the cells of each token.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .base import Family, ReducingModel, cell_means


class Idefics3(Family):
    name = "Idefics3"
    model_classes = ("Idefics3Model",)
    outer_classes = ("Idefics3ForConditionalGeneration",)
    processor_classes = ("Idefics3Processor",)

    def tower(self, inner: Any) -> Any:
        return inner.vision_model

    def layers(self, inner: Any) -> Sequence[Any]:
        return self.tower(inner).encoder.layers

    def language_model(self, inner: Any) -> Any:
        return inner.text_model

    def keys(self, inner: Any, features: Tensor, layers_run: int) -> Tensor:
        keys = super().keys(inner, features, layers_run)
        connector = inner.connector
        return cell_means(connector.pixel_shuffle(keys, connector.scale_factor), connector.scale_factor ** 2)

    def feature_layers(self, inner: Any) -> int:
        raise TypeError(f"tokenmerge cannot merge inside {self.name}'s vision tower: its connector pixel-shuffles the "
                        "whole patch grid of every crop; use visual_tokens=K, which reduces the tokens after it")

    def model_mixin(self) -> type:
        return ReducingIdefics3Model


class ReducingCropsModel(ReducingModel):
    """An inner model whose ``get_image_features`` gives one (crops * M, C) tensor per prompt
    (Idefics3's and SmolVLM's): every crop's M tokens reduced on its own, then regrouped per prompt."""

    def _tokenmerge_reduce_outputs(self, outputs: Any, modality: str) -> Any:
        prompts = list(outputs.pooler_output)
        per_crop = outputs.last_hidden_state.shape[1] // self.config.scale_factor ** 2  # the tower's grid, shuffled
        outputs.pooler_output = torch.cat(prompts).unflatten(0, (-1, per_crop))
        outputs = super()._tokenmerge_reduce_outputs(outputs, modality)
        crops = [len(tokens) // per_crop for tokens in prompts]
        outputs.pooler_output = [tokens.flatten(0, 1) for tokens in outputs.pooler_output.split(crops)]
        return outputs


class ReducingIdefics3Model(ReducingCropsModel):
    """Idefics3's inner model, which scatters the visual tokens in ``inputs_merger`` rather
    than through ``get_placeholder_mask``: prompts whose placeholders do not match are refused there."""

    def inputs_merger(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor],
                      image_hidden_states: Optional[Tensor]) -> Tensor:
        if input_ids is not None and image_hidden_states is not None:
            self._tokenmerge_check_placeholders(input_ids, "image", image_hidden_states)
        # the host class, Idefics3Model, defines inputs_merger
        return super().inputs_merger(input_ids, inputs_embeds, image_hidden_states)  # type: ignore[misc]


FAMILY = Idefics3()
