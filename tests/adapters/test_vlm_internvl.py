"""InternVL: images tiled into crops (and a thumbnail), every crop reduced on its own to K
tokens after the pixel shuffle, though the processor writes all of an image's crops as one
run of placeholders; matched on the tower's keys averaged over the 2x2 cells of each token;
videos' frames reduced as crops."""
import torch
from torch.nn import functional

import tokenmerge
from tests.adapters.vlm_families.internvl import TOKENS_PER_CROP, build_internvl, prompt
from tests.adapters.vlm_models import assert_unreduced_is_unpatched, logits_and_ids, pictures
from tokenmerge.adapters.vlm.base import head_mean
from tokenmerge.adapters.vlm.internvl import FAMILY as INTERNVL


def crops_batch(processor):
    """Two left-padded prompts, of one picture and of two, each picture tiled into crops."""
    one, two, three = pictures(3)
    return processor(images=[[one], [two, three]], text=[prompt(1), prompt(2)], return_tensors="pt", padding=True)


def placeholders(model, batch):
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()




def test_every_crop_of_a_picture_reaches_the_language_model_as_k_tokens():
    model, processor = build_internvl(crops=True)
    crops = len(crops_batch(processor)["pixel_values"])
    full = placeholders(model, crops_batch(processor))
    assert crops > 3 and sum(full) == crops * TOKENS_PER_CROP
    tokenmerge.apply(model, visual_tokens=5, processor=processor)
    batch = crops_batch(processor)
    assert [count // 5 for count in placeholders(model, batch)] == [count // TOKENS_PER_CROP for count in full]
    # one run per picture between <img> and </img>, as the unpatched processor writes it
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    start = tokens.index("<img>")
    assert tokens[start + 1:tokens.index("</img>")] == ["<IMG_CONTEXT>"] * placeholders(model, batch)[0]
    logits_and_ids(model, batch)
    assert tokenmerge.get_state(model).counts == [(TOKENS_PER_CROP, 5)] * crops


def test_crops_unreduced_give_the_unpatched_ids_and_logits():
    model, processor = build_internvl(crops=True)
    assert_unreduced_is_unpatched(model, processor, crops_batch, TOKENS_PER_CROP)


def test_keys_are_the_towers_keys_averaged_over_the_cells_of_each_token():
    model, _ = build_internvl()
    inner = model.model
    features = torch.randn(3, 64, 32)
    layer = INTERNVL.layers(inner)[-1]
    attention = layer.attention
    keys = head_mean(attention.k_norm(attention.k_proj(layer.layernorm_before(features))), attention.num_heads)
    # token (i, j) of the 4x4 grid after the shuffle is made of cells (2i..2i+1, 2j..2j+1) of the 8x8 grid
    pooled = functional.avg_pool2d(keys.transpose(1, 2).reshape(3, -1, 8, 8), 2).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(INTERNVL.keys(inner, features, 3), pooled)


def test_an_earlier_feature_layer_is_matched_on_the_keys_of_the_layer_after_it():
    model, processor = build_internvl()
    model.config.vision_feature_layer = -2  # the output of layer 2 of 3: layer 3 computes the keys
    batch = processor(images=[pictures(1)], text=[prompt(1)], return_tensors="pt")
    with torch.no_grad():
        outputs = model.model.get_image_features(batch["pixel_values"], return_dict=True)
        features, layers_run = INTERNVL.tower_features(model.model, outputs)
    assert len(outputs.hidden_states) == 4  # the embeddings, then every layer's output
    assert layers_run == 2 and torch.equal(features, outputs.hidden_states[2][:, 1:])
    expected_logits, expected_ids = logits_and_ids(model, batch)
    tokenmerge.apply(model, visual_tokens=TOKENS_PER_CROP, processor=processor)
    logits, ids = logits_and_ids(model, processor(images=[pictures(1)], text=[prompt(1)], return_tensors="pt"))
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logits, expected_logits, atol=1e-6, rtol=0)


def test_video_frames_reach_the_language_model_as_k_tokens_each():
    model, processor = build_internvl()
    video = (torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    text = ["USER: <video> what is this ? ASSISTANT:"]
    assert placeholders(model, processor(videos=[video], text=text, return_tensors="pt")) == [4 * TOKENS_PER_CROP]
    tokenmerge.apply(model, visual_tokens=5, processor=processor)
    batch = processor(videos=[video], text=text, return_tensors="pt")
    assert placeholders(model, batch) == [4 * 5]
    logits_and_ids(model, batch)
    assert tokenmerge.get_state(model).counts == [(TOKENS_PER_CROP, 5)] * 4
