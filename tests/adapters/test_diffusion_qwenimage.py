"""Qwen-Image: exact without merging, rows merged alone (text padding masked), every
merged token at the image rotary position of the token it sits at, the text table and
text tokens whole, and several images per sample refused."""
from __future__ import annotations

import pytest
import torch

import tokenmerge
from tests.adapters.diffusion_models import (
    ALL_BRANCHES,
    DITS,
    TEXT_TOKENS,
    check_exact_without_merging,
    check_merged_positions,
    check_merges_rows_alone,
    denoise,
)

DIT = DITS["qwenimage"]
NUM_TOKENS = DIT.grid[1] * DIT.grid[2]
KEPT_SOURCES = NUM_TOKENS * 3 // 4 - NUM_TOKENS // 2


def test_exact_without_merging() -> None:
    check_exact_without_merging(DIT)


def test_merges_rows_alone() -> None:
    check_merges_rows_alone(DIT)


def attention_calls(model: torch.nn.Module, inputs: dict[str, object]) -> list[dict]:
    """The inputs of every call of the first block's joint attention."""
    calls: list[dict] = []
    handle = model.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        denoise(model, inputs)
    finally:
        handle.remove()
    return calls


def test_merged_tokens_carry_their_rotary_positions_and_text_stays_whole() -> None:
    model, inputs = DIT.build(), DIT.inputs(2)
    (plain,) = attention_calls(model, inputs)
    full_image, full_text = plain["image_rotary_emb"]
    tokenmerge.apply(model, **ALL_BRANCHES)
    calls = attention_calls(model, inputs)
    assert len(calls) == 2  # the image table has no batch axis: one call per row
    for row, call in enumerate(calls):
        image_table, text_table = call["image_rotary_emb"]
        assert torch.equal(text_table, full_text)
        same = (image_table[:, None, :] == full_image[None, :, :]).all(dim=-1)
        assert bool((same.sum(dim=1) == 1).all())
        check_merged_positions(same.float().argmax(dim=1), DIT.grid, KEPT_SOURCES)
        assert call["hidden_states"].shape[1] == NUM_TOKENS // 2
        assert torch.equal(call["encoder_hidden_states"], plain["encoder_hidden_states"][row:row + 1])
        assert call["encoder_hidden_states"].shape[1] == TEXT_TOKENS


def test_several_images_per_sample_are_refused() -> None:
    model, inputs = DIT.build(), DIT.inputs(1)
    tokenmerge.apply(model, ratio=0.5)
    with pytest.raises(ValueError, match="one image grid per sample"):
        denoise(model, {**inputs, "img_shapes": [[(1, 4, 8), (1, 4, 8)]]})
