"""Idefics3 and SmolVLM: images split into crops (and the whole image), every crop reduced
on its own to K tokens after the connector's pixel shuffle, matched on the tower's keys
averaged over the 2x2 cells of each token; videos' frames reduced as crops."""
import pytest
import torch
from torch.nn import functional

import tokenmerge
from tests.adapters.vlm_families.idefics3 import TOKENS_PER_CROP, build_idefics3, build_smolvlm, prompt
from tests.adapters.vlm_models import assert_unreduced_is_unpatched, logits_and_ids, pictures
from tokenmerge.adapters.vlm.base import head_mean
from tokenmerge.adapters.vlm.idefics3 import FAMILY as IDEFICS3

CROPS = 5  # every picture: 2x2 crops and the whole
BUILDERS = pytest.mark.parametrize("build", [build_idefics3, build_smolvlm], ids=["idefics3", "smolvlm"])


def split_batch(processor, images_per_prompt=(1, 2)):
    """A left-padded batch of prompts with that many pictures each, split into crops."""
    images = pictures(sum(images_per_prompt))
    nested = [images[:images_per_prompt[0]], images[images_per_prompt[0]:]][:len(images_per_prompt)]
    return processor(images=nested, text=[prompt(count) for count in images_per_prompt], return_tensors="pt",
                     padding=True)


def placeholders(model, batch):
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()




@BUILDERS
def test_split_pictures_give_every_crop_k_tokens(build):
    model, processor = build(splitting=True)
    assert placeholders(model, split_batch(processor)) == [CROPS * TOKENS_PER_CROP, 2 * CROPS * TOKENS_PER_CROP]
    tokenmerge.apply(model, visual_tokens=5, processor=processor)
    batch = split_batch(processor)
    assert placeholders(model, batch) == [CROPS * 5, 2 * CROPS * 5]
    logits_and_ids(model, batch)
    state = tokenmerge.get_state(model)
    assert state.counts == [(TOKENS_PER_CROP, 5)] * (3 * CROPS)
    assert all(size.sum() == TOKENS_PER_CROP for size in state.sizes)


@BUILDERS
def test_split_pictures_unreduced_give_the_unpatched_ids_and_logits(build):
    model, processor = build(splitting=True)
    assert_unreduced_is_unpatched(model, processor, split_batch, TOKENS_PER_CROP)


def test_a_prompt_of_one_picture_gives_the_same_alone_as_beside_one_of_two():
    # the prompt of two pictures has twice the crops: the other prompt's are padded with empty crops
    model, processor = build_idefics3(splitting=True)
    tokenmerge.apply(model, visual_tokens=6, processor=processor)
    alone = processor(images=[pictures(1)], text=[prompt(1)], return_tensors="pt")
    both = split_batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(model(**both).logits[0, -alone["input_ids"].shape[1]:], model(**alone).logits[0],
                                   atol=1e-5, rtol=1e-5)


def test_keys_are_the_towers_keys_averaged_over_the_cells_of_each_token():
    model, _ = build_idefics3()
    inner = model.model
    features = torch.randn(3, 64, 32)
    layer = IDEFICS3.layers(inner)[-1]
    keys = head_mean(layer.self_attn.k_proj(layer.layer_norm1(features)), layer.self_attn.num_heads)
    # token (i, j) of the 4x4 grid after the shuffle is made of cells (2i..2i+1, 2j..2j+1) of the 8x8 grid
    pooled = functional.avg_pool2d(keys.transpose(1, 2).reshape(3, -1, 8, 8), 2).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(IDEFICS3.keys(inner, features, 3), pooled)


def test_smolvlm_video_frames_reach_the_language_model_as_k_tokens_each():
    model, processor = build_smolvlm()
    video = (torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    text = ["USER: <video> what is this ? ASSISTANT:"]
    assert placeholders(model, processor(videos=[video], text=text, return_tensors="pt")) == [4 * TOKENS_PER_CROP]
    tokenmerge.apply(model, visual_tokens=5, processor=processor)
    batch = processor(videos=[video], text=text, return_tensors="pt")
    assert placeholders(model, batch) == [4 * 5]
    logits_and_ids(model, batch)
    assert tokenmerge.get_state(model).counts == [(TOKENS_PER_CROP, 5)] * 4
