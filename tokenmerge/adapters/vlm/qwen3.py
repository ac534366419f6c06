"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and its mixture-of-experts twin
``Qwen3VLMoeForConditionalGeneration``): Qwen2.5-VL's way of handing images and videos
to the language model as (t, h/2, w/2) grid cells after a 2x2 patch merger, placed with
M-RoPE, with two things more that a reduction must follow.

* Deepstack: the tower also hands on tokens of some middle layers (one per
  ``deepstack_visual_indexes``), each through a merger of its own, which the language
  model adds to its hidden states at the visual positions of its first layers. They are
  reduced with the very merges of the main tokens: every position's main and deepstack
  features are reduced together as one token (side by side on channels), matched on the
  main ones, so that every kept position carries the size-weighted mean of the same
  cells in every feature (``tome-features`` matches on all of them).
* Videos: the processor writes every frame group (temporal grid step) of a video as a run
  of placeholders of its own after a timestamp, and the language model places every run
  as a grid of one frame. So every frame group is reduced on its own, to its share of the
  video's ``K``: ``K`` split as evenly as the frame groups allow, the earlier ones taking
  the remainder, at least one token each (a video of more frame groups than ``K`` keeps
  one per frame group); a fraction applies to every frame group. The kept tokens of a
  frame stay in its run, each at the M-RoPE position of its own cell in that frame.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .base import ImageTokens, ReducingModel, ReducingProcessor, VisionLanguageState
from .qwen import QwenFamily, ReducingQwenModel


class Qwen3VL(QwenFamily):
    name = "Qwen3-VL"
    model_classes = ("Qwen3VLModel", "Qwen3VLMoeModel")
    outer_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    processor_classes = ("Qwen3VLProcessor",)

    def model_mixin(self) -> type:
        return ReducingQwen3Model

    def processor_mixin(self) -> type:
        return ReducingQwen3Processor


def frame_counts(state: VisionLanguageState, frames: int, per_frame: int) -> list[int]:
    """The tokens each of the ``frames`` frame groups of a video (an image: one group) of
    ``per_frame`` tokens each keeps: a whole ``visual_tokens`` split as evenly as can be,
    the earlier groups taking the remainder, at least one each; a fraction of every group."""
    count = state.visual_tokens
    if not isinstance(count, int):  # all of them, or the same share of every frame group
        return [state.kept(per_frame)] * frames
    whole, remainder = divmod(min(count, frames * per_frame), frames)
    return [max(1, whole + (frame < remainder)) for frame in range(frames)]


class ReducingQwen3Model(ReducingQwenModel):
    """Qwen3-VL's inner model: Qwen2.5-VL's reduction, with the deepstack features reduced
    as the main ones and videos reduced and placed frame group by frame group."""

    def _tokenmerge_encode(self, modality: str, pixels: Tensor, args: tuple, kwargs: dict) -> Any:
        # Qwen3-VL's own get_video_features only calls get_image_features, which here is the
        # patched one; the host's get_image_features encodes videos as they are, unreduced
        host = super(ReducingModel, self)  # the host class, the family's inner model, past every mixin
        return host.get_image_features(pixels, *args, **kwargs)  # type: ignore[attr-defined]

    def _tokenmerge_reduce_grids(self, outputs: Any, modality: str, grids: Tensor) -> Any:
        state = self._tokenmerge_state
        if state.visual_tokens is None:
            return self._tokenmerge_reduce_outputs(outputs, modality)
        parts = [outputs.pooler_output, *outputs.deepstack_features]  # each one (N, C) tensor per image
        widths = [part[0].shape[-1] for part in parts]
        keys = self._tokenmerge_family.keys_per_image(self, outputs)
        frames = [int(frame_count) for frame_count in grids[:, 0]]
        rows, row_keys, counts = [], [], []
        for joined, key, count in zip((torch.cat(item, dim=-1) for item in zip(*parts)), keys, frames):
            rows.extend(joined.split(len(joined) // count))
            row_keys.extend(key.split(len(key) // count))
            counts.extend(frame_counts(state, count, len(joined) // count))
        reduced = self._tokenmerge_reduce(rows, row_keys, modality, counts)
        per_frame = state.images_of(modality)
        starts = [sum(frames[:index]) for index in range(len(frames))]
        state.record(modality, [joined_frames(per_frame[start:start + count]) for start, count in zip(starts, frames)])
        items = [torch.cat(reduced[start:start + count]).split(widths, dim=-1) for start, count in zip(starts, frames)]
        outputs.pooler_output = tuple(item[0] for item in items)
        outputs.deepstack_features = [tuple(item[layer] for item in items) for layer in range(1, len(parts))]
        return outputs

    def _tokenmerge_placed_cells(self, modality: str, grids: Optional[Tensor]) -> list[Tensor]:
        # get_rope_index places every frame group of a video as a grid of its own
        images = self._tokenmerge_state.images_of(modality)
        if modality == "image" or grids is None:
            return [image.cells for image in images]
        return [cells for image, grid in zip(images, grids) for cells in frame_cells(image, int(grid[0]))]


def joined_frames(frames: Sequence[ImageTokens]) -> ImageTokens:
    """One video's record from those of its frame groups, its cells counted over the whole video."""
    offsets = [sum(frame.full for frame in frames[:index]) for index in range(len(frames))]
    return ImageTokens(sum(frame.full for frame in frames), sum(frame.kept for frame in frames),
                       torch.cat([frame.size for frame in frames]),
                       torch.cat([frame.cells + offset for frame, offset in zip(frames, offsets)]))


def frame_cells(video: ImageTokens, frames: int) -> list[Tensor]:
    """The kept cells of every one of a video's ``frames`` frame groups, counted in its frame."""
    per_frame = video.full // frames
    frame = video.cells // per_frame
    return [video.cells[frame == index] - index * per_frame for index in range(frames)]


class ReducingQwen3Processor(ReducingProcessor):
    """Qwen3-VL's processor: a video's frame groups get as many placeholders each as the
    model keeps of them (:func:`frame_counts`)."""

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        # the host class's text (ReducingProcessor's would count every frame group as a video)
        text = super(ReducingProcessor, self).replace_video_token(video_inputs, video_idx, **kwargs)  # type: ignore[misc]
        frames, height, width = (int(value) for value in video_inputs["video_grid_thw"][video_idx])
        per_frame = height * width // self.video_processor.merge_size ** 2  # type: ignore[attr-defined]
        placeholder = self._tokenmerge_placeholders["video"]
        between = text.split(placeholder * per_frame)  # the timestamps and bounds around the frames' runs
        counts = frame_counts(self._tokenmerge_state, frames, per_frame)
        return between[0] + "".join(placeholder * count + after for count, after in zip(counts, between[1:]))


FAMILY = Qwen3VL()
