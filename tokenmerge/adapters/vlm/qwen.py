"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a ViT with 2D rotary positions
and window attention whose 2x2 ``PatchMerger`` hands every image (at its own
resolution) and every video to the language model as (t, h/2, w/2) grid cells, which
the language model places with M-RoPE (a temporal, a height and a width position).

Tokens are reduced after the merger, matched on the merged tokens themselves (the
tower's own keys are in window order there); every kept token keeps the M-RoPE
position of its own grid cell, the cell of the token it was built on."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .base import Family, ReducingModel, per_image


class QwenFamily(Family):
    """What the Qwen VL families share: the tower ``visual``, tokens matched on the merged
    tokens themselves, no merging in the tower, :class:`ReducingQwenModel`."""

    def tower(self, inner: Any) -> Any:
        return inner.visual

    def keys_per_image(self, inner: Any, outputs: Any) -> Sequence[Tensor]:
        return per_image(outputs.pooler_output)

    def feature_layers(self, inner: Any) -> int:
        raise TypeError(f"tokenmerge cannot merge inside {self.name}'s vision tower: its patch merger needs every "
                        "2x2 group of the grid; use visual_tokens=K, which reduces the tokens after it")

    def model_mixin(self) -> type:
        return ReducingQwenModel


class Qwen25VL(QwenFamily):
    name = "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLModel",)
    outer_classes = ("Qwen2_5_VLForConditionalGeneration",)
    processor_classes = ("Qwen2_5_VLProcessor",)


class ReducingQwenModel(ReducingModel):
    """Qwen2.5-VL's inner model: images and videos reduced, and the M-RoPE positions of
    the kept tokens taken from their own grid cells."""

    def get_image_features(self, pixel_values: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._tokenmerge_features("image", pixel_values, args, kwargs)

    def get_video_features(self, pixel_values_videos: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._tokenmerge_features("video", pixel_values_videos, args, kwargs)

    def _tokenmerge_features(self, modality: str, pixels: Tensor, args: tuple, kwargs: dict) -> Any:
        """The reduced features of ``pixels``: those :meth:`get_rope_index` computed for these
        very pixels if it did (``generate`` places tokens before it encodes them), else new ones."""
        computed = getattr(self._tokenmerge_state.placing, "computed", {})
        if modality in computed and computed[modality][0] is pixels:
            return computed.pop(modality)[1]
        outputs = self._tokenmerge_encode(modality, pixels, args, kwargs)  # the host has read the grids there
        return self._tokenmerge_reduce_grids(outputs, modality, args[0] if args else kwargs[f"{modality}_grid_thw"])

    def _tokenmerge_encode(self, modality: str, pixels: Tensor, args: tuple, kwargs: dict) -> Any:
        """The host's own, unreduced outputs for ``pixels`` of ``modality``."""
        host = super(ReducingModel, self)  # the host class, the family's inner model, past every mixin
        encode = host.get_image_features if modality == "image" else host.get_video_features  # type: ignore[attr-defined]
        return encode(pixels, *args, **kwargs)

    def _tokenmerge_reduce_grids(self, outputs: Any, modality: str, grids: Tensor) -> Any:
        """``outputs`` of images (or videos) of the (t, h, w) patch ``grids`` reduced:
        Qwen2.5-VL reduces every image and video as a whole, whatever its grid."""
        return self._tokenmerge_reduce_outputs(outputs, modality)

    def get_rope_index(self, input_ids: Tensor, *args: Any, **kwargs: Any) -> Any:
        state = self._tokenmerge_state
        context = state.placing  # for the calling thread: the cells still to place, the features computed
        context.computed = {}
        for modality, pixels, grids in (("image", "pixel_values", "image_grid_thw"),
                                        ("video", "pixel_values_videos", "video_grid_thw")):
            if kwargs.get(pixels) is not None:  # not encoded yet: encode now, and keep them for the model's call
                encode = self.get_image_features if modality == "image" else self.get_video_features
                outputs = encode(kwargs[pixels], kwargs.get(grids), return_dict=True)
                self._tokenmerge_check_placeholders(input_ids, modality, torch.cat(list(outputs.pooler_output)))
                context.computed[modality] = (kwargs[pixels], outputs)
        context.image_grids = kwargs.get("image_grid_thw")
        context.cells = {modality: iter(self._tokenmerge_placed_cells(modality, kwargs.get(f"{modality}_grid_thw")))
                         for modality in ("image", "video")}
        try:
            # the host class, the family's inner model, defines get_rope_index
            return super().get_rope_index(input_ids, *args, **kwargs)  # type: ignore[misc]
        finally:
            context.cells = None

    def get_vision_position_ids(self, start_position: int, grid_thw: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # the host class, the family's inner model, defines get_vision_position_ids
        positions = super().get_vision_position_ids(start_position, grid_thw, *args, **kwargs)  # type: ignore[misc]
        context = self._tokenmerge_state.placing
        cells: Optional[dict[str, Iterator[Tensor]]] = getattr(context, "cells", None)
        if cells is None:
            return positions
        # an image's grid is a row of image_grid_thw; a video's may be a row of a copy (Qwen3-VL's frames)
        modality = "image" if _part_of(grid_thw, context.image_grids) else "video"
        kept = next(cells[modality], None)
        if kept is None:
            return positions
        return positions[:, kept.to(positions.device)]

    def _tokenmerge_placed_cells(self, modality: str, grids: Optional[Tensor]) -> list[Tensor]:
        """The kept cells of every grid :meth:`get_rope_index` places, in turn, of the last
        pass's images (or videos) of the (t, h, w) patch ``grids``: one grid per image or video."""
        return [image.cells for image in self._tokenmerge_state.images_of(modality)]


def _part_of(row: Tensor, grids: Optional[Tensor]) -> bool:
    """Whether ``row`` is a row of ``grids`` (the rows get_rope_index iterates over share its storage)."""
    return grids is not None and row.untyped_storage().data_ptr() == grids.untyped_storage().data_ptr()


FAMILY = Qwen25VL()
