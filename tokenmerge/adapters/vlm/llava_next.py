"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``), LLaVA-OneVision
(``LlavaOnevisionForConditionalGeneration``) and LLaVA-NeXT-Video
(``LlavaNextVideoForConditionalGeneration``): anyres images, a base crop of the whole
image followed by high-resolution crops, whose projected tokens the model unpads and
packs into one grid per image, an ``image_newline`` token at the end of every row of
it (``pack_image_features``); the processor counts every image's tokens from its size.

``visual_tokens=K`` reduces every image's packed tokens (what ``get_image_features``
hands the language model for it) to exactly K, row ends included:

* The row ends are never merged with image tokens. An image of ``full`` tokens and
  ``rows`` row ends keeps ``round(K * rows / full)`` of them (the rows' share of its
  tokens; at least one, at most all), each at its own place, closing a band of rows of
  (nearly) equal height: the kept tokens are in grid order, so every band's tokens
  come before its row end, which stands for the row ends of the band (its size).
  K = 1 leaves no room for a row end besides a token and is refused.
* The other tokens (base crop and grid together) are merged down to the rest of K,
  matched on the tower's keys of the layer the model reads, arranged by the model's
  own ``pack_image_features`` (unpadded, and resized where OneVision resizes), so every
  key sits where its token does.
* Videos (frames pooled 2x2; OneVision's with one row end after the last frame) are
  reduced to K tokens each as well, matched on the pooled projected tokens themselves
  (NeXT-Video's pooling may be a convolution, which keys cannot follow), a row end
  kept as above.

``r=`` (merging in the tower) is refused: the packing needs every crop's whole grid.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ... import fixed_count
from .base import ImageTokens, ReducingModel, in_grid_order, per_image, unreduced
from .llava import Llava

#: Packs (crops, N, D) tensors of the images of a pass as the model packed their features,
#: with the given (D,) row end: one (tokens, D) tensor per image.
Packer = Callable[[Tensor, Tensor], list[Tensor]]


class LlavaNext(Llava):
    name = "LLaVA-NeXT"
    model_classes = ("LlavaNextModel",)
    outer_classes = ("LlavaNextForConditionalGeneration",)
    processor_classes = ("LlavaNextProcessor",)

    def feature_layers(self, inner: Any) -> int:
        raise TypeError(f"tokenmerge cannot merge inside {self.name}'s vision tower: the model packs every crop's "
                        "whole patch grid; use visual_tokens=K, which reduces the packed tokens")

    def model_mixin(self) -> type:
        return ReducingPackedModel

    def video_row_ends(self, video: Tensor) -> Tensor:
        """Where the row ends of one video's (N, C) projected tokens are, (N,), for the
        families with videos: none (NeXT-Video's pooled frames follow one another)."""
        return torch.zeros(len(video), dtype=torch.bool, device=video.device)


class LlavaOnevision(LlavaNext):
    name = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionModel",)
    outer_classes = ("LlavaOnevisionForConditionalGeneration",)
    processor_classes = ("LlavaOnevisionProcessor",)

    def model_mixin(self) -> type:
        return ReducingPackedVideoModel

    def video_row_ends(self, video: Tensor) -> Tensor:
        """One row end, after the last frame."""
        ends = super().video_row_ends(video)
        ends[-1] = True
        return ends


class LlavaNextVideo(LlavaNext):
    name = "LLaVA-NeXT-Video"
    model_classes = ("LlavaNextVideoModel",)
    outer_classes = ("LlavaNextVideoForConditionalGeneration",)
    processor_classes = ("LlavaNextVideoProcessor",)

    def model_mixin(self) -> type:
        return ReducingPackedVideoModel


class ReducingPackedModel(ReducingModel):
    """The inner model of an anyres family: every image's packed tokens reduced to its
    kept count, the ``image_newline`` row ends kept in proportion (see the module)."""

    _tokenmerge_family: LlavaNext

    def pack_image_features(self, image_features: Sequence[Tensor], image_sizes: Tensor, *args: Any,
                            **kwargs: Any) -> Any:
        # the host class, the family's inner model, defines pack_image_features
        host = super().pack_image_features  # type: ignore[misc]
        crops = [len(feature) for feature in image_features]

        def pack_like_features(tensors: Tensor, row_end: Tensor) -> list[Tensor]:
            return host(list(tensors.split(crops)), image_sizes, *args, **{**kwargs, "image_newline": row_end})[0]

        self._tokenmerge_state.placing.pack = pack_like_features  # for this thread's reduction of the pass
        return host(image_features, image_sizes, *args, **kwargs)

    def _tokenmerge_reduce_outputs(self, outputs: Any, modality: str) -> Any:
        state, family = self._tokenmerge_state, self._tokenmerge_family
        pack, state.placing.pack = getattr(state.placing, "pack", None), None
        if state.settings.visual_tokens is None:
            return super()._tokenmerge_reduce_outputs(outputs, modality)
        projected = outputs.pooler_output
        keys: Sequence[Tensor]
        row_ends: Sequence[Tensor]
        if modality == "image":
            keys, row_ends = self._tokenmerge_packed_keys(outputs, pack)
        else:
            keys, row_ends = per_image(projected), [family.video_row_ends(video) for video in per_image(projected)]
        reduced = [reduce_in_rows(tokens, key, ends, state.kept(len(tokens)), state.method, family.name)
                   for tokens, key, ends in zip(per_image(projected), keys, row_ends)]
        state.record(modality, [image for _, image in reduced])
        rows = [tokens for tokens, _ in reduced]
        outputs.pooler_output = torch.stack(rows) if isinstance(projected, Tensor) else rows
        return outputs

    def _tokenmerge_packed_keys(self, outputs: Any, pack: Optional[Packer]) -> tuple[list[Tensor], list[Tensor]]:
        """The tower's keys of every crop, packed as the model packed the features, and
        where the row ends are: packed with the keys as one more channel, 1 at row ends."""
        family = self._tokenmerge_family
        if pack is None:
            raise RuntimeError(f"tokenmerge found no packing of these images in {family.name}: the model did not "
                               "call pack_image_features, which this version of tokenmerge reads")
        features, layers_run = family.tower_features(self, outputs)
        keys = family.keys(self, features, layers_run)
        marked = torch.cat([keys, keys.new_zeros(*keys.shape[:2], 1)], dim=-1)
        row_end = keys.new_zeros(keys.shape[-1] + 1)
        row_end[-1] = 1
        packed = pack(marked, row_end)
        return [image[:, :-1] for image in packed], [image[:, -1] > 0.5 for image in packed]


class ReducingPackedVideoModel(ReducingPackedModel):
    """:class:`ReducingPackedModel` for a family with videos: every video reduced too."""

    def get_video_features(self, pixel_values_videos: Tensor, *args: Any, **kwargs: Any) -> Any:
        # the host class, the family's inner model, defines get_video_features
        outputs = super().get_video_features(pixel_values_videos, *args, **kwargs)  # type: ignore[misc]
        return self._tokenmerge_reduce_outputs(outputs, "video")

    def _tokenmerge_check_placeholders(self, input_ids: Tensor, modality: str, features: Tensor) -> None:
        # LLaVA-NeXT-Video hands its videos' features on flattened to one dimension
        if features.dim() == 1:
            features = features.view(-1, self.config.text_config.hidden_size)
        super()._tokenmerge_check_placeholders(input_ids, modality, features)


def reduce_in_rows(tokens: Tensor, keys: Tensor, row_ends: Tensor, kept: int, method: str,
                   family: str) -> tuple[Tensor, ImageTokens]:
    """One image's packed (N, C) ``tokens`` reduced to ``kept``: some row ends (where
    ``row_ends``, (N,), is True) kept as they are (:func:`row_bands`), the other tokens
    merged on ``keys`` (N, D) down to the rest, all in grid order."""
    full = len(tokens)
    if kept == full:
        return tokens, unreduced(full)
    ends = row_ends.nonzero()[:, 0]
    bands = row_bands(kept, len(ends), full, family).to(ends.device)
    kept_ends = ends[bands.cumsum(0) - 1]
    others = (~row_ends).nonzero()[:, 0]
    reduced = fixed_count.reduce_to(tokens[others][None], keys[others][None].to(tokens.dtype), kept - len(bands),
                                    method, sides={"cell": others[None, :, None]})
    merged, size, cells = in_grid_order(
        torch.cat([reduced.tokens, tokens[kept_ends][None]], dim=1),
        torch.cat([reduced.size[..., 0], bands[None].to(reduced.size)], dim=1),
        torch.cat([reduced.sides["cell"][..., 0], kept_ends[None]], dim=1))
    return merged[0], ImageTokens(full, kept, size[0], cells[0])


def row_bands(kept: int, rows: int, full: int, family: str) -> Tensor:
    """How many rows each kept row end closes, top to bottom, for an image of ``full``
    tokens with ``rows`` row ends that keeps ``kept`` tokens: ``round(kept * rows / full)``
    bands (at least one, at most ``rows``) of (nearly) equal height."""
    if rows == 0:
        return torch.zeros(0, dtype=torch.long)
    count = max(1, min(rows, round(kept * rows / full)))
    if count >= kept:
        raise ValueError(f"tokenmerge keeps an image_newline row end of every {family} image besides its tokens, "
                         f"so visual_tokens must keep at least 2 tokens of an image; it keeps {kept} of {full}")
    bottoms = (torch.arange(1, count + 1) * rows + count - 1) // count  # the last row of every band, counted from 1
    return bottoms.diff(prepend=torch.zeros(1, dtype=torch.long))


FAMILIES = (LlavaNext(), LlavaOnevision(), LlavaNextVideo())
