"""Wan 2.x: exact without merging, rows merged alone, every merged token at its 3D
rotary position (destinations in every frame), the text keys and values of the cross-attention whole;
per-token timesteps refused."""
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

DIT = DITS["wan"]
NUM_TOKENS = DIT.grid[0] * DIT.grid[1] * DIT.grid[2]
KEPT_SOURCES = NUM_TOKENS * 3 // 4 - NUM_TOKENS // 2


def test_exact_without_merging() -> None:
    check_exact_without_merging(DIT)


def test_merges_rows_alone() -> None:
    check_merges_rows_alone(DIT)


def attention_inputs(model: torch.nn.Module, inputs: dict[str, object], name: str) -> list[tuple]:
    """The positional arguments of the first block's ``name`` attention in one call."""
    seen: list[tuple] = []
    handle = getattr(model.blocks[0], name).register_forward_pre_hook(lambda module, args: seen.append(args))
    try:
        denoise(model, inputs)
    finally:
        handle.remove()
    return seen


def test_merged_tokens_carry_their_rotary_positions() -> None:
    model, inputs = DIT.build(), DIT.inputs(2)
    full = attention_inputs(model, inputs, "attn1")[0][3]
    tokenmerge.apply(model, **ALL_BRANCHES)
    (call,) = attention_inputs(model, inputs, "attn1")
    assert call[0].shape[1] == NUM_TOKENS // 2
    for table, full_table in zip(call[3], full):
        assert table.shape == (2, NUM_TOKENS // 2, 1, full_table.shape[-1])  # one table per row
        for row in range(2):
            same = (table[row, :, None, 0] == full_table[0, None, :, 0]).all(dim=-1)
            assert bool((same.sum(dim=1) == 1).all())
            check_merged_positions(same.float().argmax(dim=1), DIT.grid, KEPT_SOURCES)


def test_text_tokens_stay_whole() -> None:
    model, inputs = DIT.build(), DIT.inputs(1)
    (plain,) = attention_inputs(model, inputs, "attn2")
    tokenmerge.apply(model, **ALL_BRANCHES)
    (merged,) = attention_inputs(model, inputs, "attn2")
    assert merged[0].shape[1] == NUM_TOKENS // 2
    assert merged[1].shape[1] == TEXT_TOKENS and torch.equal(merged[1], plain[1])


def test_per_token_timesteps_are_refused() -> None:
    model = DITS["wan"].build()
    block = model.blocks[0]
    tokenmerge.apply(model, ratio=0.5)
    hidden = torch.randn(1, NUM_TOKENS, 32)
    with pytest.raises(TypeError, match="per-token timesteps"):
        block(hidden, torch.randn(1, TEXT_TOKENS, 32), torch.randn(1, NUM_TOKENS, 6, 32), None)


def test_a_pipeline_of_two_denoisers_is_refused_and_each_can_be_patched() -> None:
    """Wan 2.2 A14B runs a high-noise and a low-noise transformer: patching the pipeline
    through one of them would leave the other's steps unmerged, so it is refused."""
    from types import SimpleNamespace

    pipe = SimpleNamespace(transformer=DIT.build(), transformer_2=DIT.build())
    with pytest.raises(TypeError, match=r"two denoisers \(pipe.transformer and pipe.transformer_2\)"):
        tokenmerge.apply(pipe, ratio=0.5)
    assert not tokenmerge.is_applied(pipe.transformer) and not tokenmerge.is_applied(pipe.transformer_2)
    for denoiser in (pipe.transformer, pipe.transformer_2):
        tokenmerge.apply(denoiser, ratio=0.5)
        assert tokenmerge.is_applied(denoiser)
