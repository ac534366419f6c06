"""Flux.1 and FLUX.2: exact without merging, rows merged alone, only image tokens merged in the
double- and single-stream blocks, and every merged token rotated at the position of
the image token it sits at (its destination's, or a kept source's own)."""
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

FAMILY_DITS = ["flux", "flux2"]
GRID = DITS["flux"].grid
NUM_TOKENS = GRID[1] * GRID[2]
KEPT_SOURCES = NUM_TOKENS * 3 // 4 - NUM_TOKENS // 2  # ratio 0.5: r = N / 2 of the 3N / 4 sources


@pytest.mark.parametrize("name", FAMILY_DITS)
def test_exact_without_merging(name: str) -> None:
    check_exact_without_merging(DITS[name])


@pytest.mark.parametrize("name", FAMILY_DITS)
def test_merges_rows_alone(name: str) -> None:
    check_merges_rows_alone(DITS[name])


def attention_calls(model: torch.nn.Module, inputs: dict[str, object]) -> dict[str, list[dict]]:
    """The inputs of every call of the first double- and single-stream block's attention."""
    calls: dict[str, list[dict]] = {"double": [], "single": []}

    def recorder(kind: str):
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            calls[kind].append(kwargs)
        return record

    handles = [model.transformer_blocks[0].attn.register_forward_pre_hook(recorder("double"), with_kwargs=True),
               model.single_transformer_blocks[0].attn.register_forward_pre_hook(recorder("single"),
                                                                                 with_kwargs=True)]
    try:
        denoise(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def rotary_positions(table: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The image token whose row of the full rotary table every row of ``table`` is
    (every image token's row is distinct on the grid)."""
    same = (table[:, None, :] == full[None, TEXT_TOKENS:, :]).all(dim=-1)
    assert bool((same.sum(dim=1) == 1).all())
    return same.float().argmax(dim=1)


@pytest.mark.parametrize("name,batch", [("flux", 1), ("flux", 2), ("flux2", 2)])
def test_merged_tokens_carry_their_rotary_positions(name: str, batch: int) -> None:
    model, inputs = DITS[name].build(), DITS[name].inputs(batch)
    full = attention_calls(model, inputs)["double"][0]["image_rotary_emb"]
    tokenmerge.apply(model, **ALL_BRANCHES)
    calls = attention_calls(model, inputs)
    for kind in ("double", "single"):
        assert len(calls[kind]) == batch  # diffusers' tables have no batch axis: one call per row
        for call in calls[kind]:
            for table, full_table in zip(call["image_rotary_emb"], full):
                assert torch.equal(table[:TEXT_TOKENS], full_table[:TEXT_TOKENS])
                check_merged_positions(rotary_positions(table[TEXT_TOKENS:], full_table), GRID, KEPT_SOURCES)


@pytest.mark.parametrize("name", FAMILY_DITS)
def test_only_image_tokens_merge(name: str) -> None:
    model, inputs = DITS[name].build(), DITS[name].inputs(1)
    plain = attention_calls(model, inputs)
    tokenmerge.apply(model, **ALL_BRANCHES)
    merged = attention_calls(model, inputs)
    double, single = merged["double"][0], merged["single"][0]
    assert double["hidden_states"].shape[1] == NUM_TOKENS // 2
    assert torch.equal(double["encoder_hidden_states"], plain["double"][0]["encoder_hidden_states"])
    # the single-stream block's joint sequence: every text token, half the image tokens
    assert single["hidden_states"].shape[1] == TEXT_TOKENS + NUM_TOKENS // 2


def test_a_call_of_no_single_grid_is_refused() -> None:
    model, inputs = DITS["flux"].build(), DITS["flux"].inputs(1)
    ids = inputs["img_ids"].clone()
    ids[-1, 2] = 20  # a token off the 8 x 8 grid
    tokenmerge.apply(model, ratio=0.5)
    with pytest.raises(ValueError, match="img_ids"):
        denoise(model, {**inputs, "img_ids": ids})


def test_flux2_reference_image_cache_is_refused() -> None:
    model, inputs = DITS["flux2"].build(), DITS["flux2"].inputs(1)
    tokenmerge.apply(model, ratio=0.5)
    with pytest.raises(TypeError, match="kv_cache_mode"):
        denoise(model, {**inputs, "kv_cache_mode": "extract"})
