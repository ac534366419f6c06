"""Stable Diffusion 3 and 3.5: exact without merging, rows merged alone, only image
tokens merged (the text stream's input to the joint attention untouched), any other
diffusers model refused in one line naming it."""
from __future__ import annotations

import types

import pytest
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

FAMILY_DITS = ["sd3", "sd3.5"]


@pytest.mark.parametrize("name", FAMILY_DITS)
def test_exact_without_merging(name: str) -> None:
    check_exact_without_merging(DITS[name])


@pytest.mark.parametrize("name", FAMILY_DITS)
def test_merges_rows_alone(name: str) -> None:
    check_merges_rows_alone(DITS[name])


def joint_attention_inputs(model: torch.nn.Module, inputs: dict[str, object]) -> list[dict[str, torch.Tensor]]:
    """The image and text tokens every block's joint attention was given in one call."""
    seen: list[dict[str, torch.Tensor]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append({"image": kwargs["hidden_states"], "text": kwargs["encoder_hidden_states"]})

    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in model.transformer_blocks]
    try:
        denoise(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_only_image_tokens_merge() -> None:
    dit = DITS["sd3"]
    model, inputs = dit.build(), dit.inputs(2)
    plain = joint_attention_inputs(model, inputs)
    tokenmerge.apply(model, **{**ALL_BRANCHES, "ratio": 0.25})
    merged = joint_attention_inputs(model, inputs)
    num_tokens = dit.grid[1] * dit.grid[2]
    assert [seen["image"].shape[1] for seen in merged] == [num_tokens - num_tokens // 4] * 2
    assert merged[0]["text"].shape[1] == TEXT_TOKENS
    # the first block's text comes straight from the embedder: merging leaves it alone
    assert torch.equal(merged[0]["text"], plain[0]["text"])


def test_a_pipeline_is_patched_through_its_transformer() -> None:
    dit = DITS["sd3"]
    model = dit.build()
    pipe = types.SimpleNamespace(transformer=model)
    assert tokenmerge.apply(pipe, ratio=0.5) is pipe
    assert tokenmerge.is_applied(model) and tokenmerge.get_state(pipe).family.name == "Stable Diffusion 3"
    tokenmerge.remove(pipe)
    assert not tokenmerge.is_applied(model)


def test_other_diffusers_models_are_refused_by_name() -> None:
    import diffusers

    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    with pytest.raises(TypeError, match="AutoencoderKL") as error:
        tokenmerge.apply(vae, ratio=0.5)
    assert "\n" not in str(error.value)
    assert not tokenmerge.is_applied(vae)


def test_a_max_downsample_below_every_block_is_refused_not_silent() -> None:
    """SD3's blocks see the latent downsampled by its patch size (2): max_downsample=1
    would merge in none of them."""
    model = DITS["sd3"].build()
    with pytest.raises(ValueError, match=r"max_downsample=1 merges in no block .* downsample 2"):
        tokenmerge.apply(model, ratio=0.5, max_downsample=1)
    assert not tokenmerge.is_applied(model)
    tokenmerge.apply(model, ratio=0.5, max_downsample=2)
    assert tokenmerge.is_applied(model)
