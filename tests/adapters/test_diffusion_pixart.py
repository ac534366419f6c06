"""PixArt-Sigma: exact without merging, rows merged alone, image queries merged in
the cross-attention while its text keys and values stay whole."""
from __future__ import annotations

import torch

import tokenmerge
from tests.adapters.diffusion_models import (
    ALL_BRANCHES,
    DITS,
    TEXT_TOKENS,
    check_exact_without_merging,
    check_merges_rows_alone,
    denoise,
)

DIT = DITS["pixart"]


def test_exact_without_merging() -> None:
    check_exact_without_merging(DIT)


def test_merges_rows_alone() -> None:
    check_merges_rows_alone(DIT)


def cross_attention_inputs(model: torch.nn.Module, inputs: dict[str, object]) -> list[tuple[torch.Tensor, ...]]:
    """(queries' tokens, text tokens) of every block's cross-attention in one call."""
    seen: list[tuple[torch.Tensor, ...]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0], kwargs["encoder_hidden_states"]))

    handles = [block.attn2.register_forward_pre_hook(record, with_kwargs=True) for block in model.transformer_blocks]
    try:
        denoise(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_only_image_tokens_merge() -> None:
    model, inputs = DIT.build(), DIT.inputs(2)
    plain = cross_attention_inputs(model, inputs)
    tokenmerge.apply(model, **ALL_BRANCHES)
    merged = cross_attention_inputs(model, inputs)
    num_tokens = DIT.grid[1] * DIT.grid[2]
    for (queries, text), (_, plain_text) in zip(merged, plain):
        assert queries.shape[1] == num_tokens // 2
        assert text.shape[1] == TEXT_TOKENS and torch.equal(text, plain_text)


def test_cross_attention_merges_only_when_asked() -> None:
    model, inputs = DIT.build(), DIT.inputs(1)
    tokenmerge.apply(model, ratio=0.5, use_rand=False)  # tomesd's default: self-attention only
    queries = cross_attention_inputs(model, inputs)
    assert [tokens.shape[1] for tokens, _ in queries] == [DIT.grid[1] * DIT.grid[2]] * 2
