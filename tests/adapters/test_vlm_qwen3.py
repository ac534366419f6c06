"""Qwen3-VL: every kept token at the M-RoPE position of its own grid cell, the deepstack
features reduced with the very merges of the main ones, videos reduced and placed frame
group by frame group, generate encoding once; and the mixture-of-experts twin. Tiny
random models (tests/adapters/vlm_families/qwen3.py)."""
import pytest
import torch

import tokenmerge
from tests.adapters.vlm_families.qwen3 import FAMILIES, FRAMES, QWEN3_VIDEO, qwen3_vl_moe
from tests.adapters.vlm_models import QWEN_IMAGE, make, pictures
from tokenmerge.fixed_count import reduce_to

QWEN3 = FAMILIES[0]
FRAME_GROUPS, PER_FRAME = FRAMES // 2, 16  # a 32x32 video: 4 frame groups of 4x4 cells


def video_prompt(images=0):
    """A prompt with a video, then ``images`` images."""
    return "USER: " + QWEN3_VIDEO + QWEN_IMAGE * images + "what is this ? ASSISTANT:"


def a_video(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(FRAMES, 32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()


def positions(model, batch, modality):
    """The (3, tokens) M-RoPE positions of the ``modality`` placeholders of a one-prompt batch."""
    keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    found, _ = model.model.get_rope_index(batch["input_ids"], **{key: batch[key] for key in keys if key in batch})
    token_id = getattr(model.config, f"{modality}_token_id")
    return found[:, 0, batch["input_ids"][0] == token_id]


def placeholder_runs(batch, token_id):
    """The lengths of the runs of ``token_id`` in the one prompt of ``batch``."""
    runs, length = [], 0
    for token in batch["input_ids"][0].tolist() + [None]:
        if token == token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def test_kept_image_tokens_keep_the_m_rope_positions_of_their_own_grid_cells():
    model, processor = make(QWEN3)
    picture = pictures(1)
    every = positions(model, processor(images=[picture], text=[QWEN3.prompt(1)], return_tensors="pt"), "image")
    tokenmerge.apply(model, visual_tokens=7, processor=processor)
    reduced = processor(images=[picture], text=[QWEN3.prompt(1)], return_tensors="pt")
    with torch.no_grad():
        model(**reduced)
    (image,) = tokenmerge.get_state(model).images
    assert image.full == every.shape[1] and len(set(image.cells.tolist())) == 7
    assert torch.equal(positions(model, reduced, "image"), every[:, image.cells])


def language_model_inputs(model, batch):
    """What the language model receives in a forward pass of ``batch``: its keyword arguments."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen


def test_deepstack_features_are_the_size_weighted_means_of_the_cells_the_main_tokens_merge():
    model, processor = make(QWEN3)
    batch = processor(images=[pictures(2)], text=[QWEN3.prompt(2)], return_tensors="pt")
    with torch.no_grad():
        full = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    tokenmerge.apply(model, visual_tokens=9, processor=processor)
    received = language_model_inputs(model, processor(images=[pictures(2)], text=[QWEN3.prompt(2)],
                                                      return_tensors="pt"))
    mask = received["visual_pos_masks"][0]
    main, deepstack = received["inputs_embeds"][0, mask], received["deepstack_visual_embeds"]
    assert len(deepstack) == 2 and all(layer.shape == main.shape == (18, main.shape[1]) for layer in deepstack)
    start = 0
    for index, image in enumerate(tokenmerge.get_state(model).images):
        # the groups the model merged: reduce_to's on the same unreduced tokens, matched on them
        tokens = full.pooler_output[index]
        source = reduce_to(tokens[None], tokens[None], image.kept).source[0]
        for row, cell in enumerate(image.cells.tolist()):
            group = source == source[cell]
            assert image.size[row] == group.sum()
            torch.testing.assert_close(main[start + row], tokens[group].mean(dim=0), atol=1e-5, rtol=1e-5)
            for layer, features in zip(deepstack, full.deepstack_features):
                torch.testing.assert_close(layer[start + row], features[index][group].mean(dim=0), atol=1e-5,
                                           rtol=1e-5)
        start += image.kept


def test_deepstack_features_reach_the_language_model_unchanged_when_nothing_is_reduced():
    model, processor = make(QWEN3)
    batch = processor(images=[pictures(2)], text=[QWEN3.prompt(2)], return_tensors="pt")
    expected = language_model_inputs(model, batch)["deepstack_visual_embeds"]
    tokenmerge.apply(model, visual_tokens=1000, processor=processor)
    received = language_model_inputs(model, batch)["deepstack_visual_embeds"]
    assert all(torch.equal(got, want) for got, want in zip(received, expected, strict=True))


@pytest.mark.parametrize("visual_tokens, shares", [(6, [2, 2, 1, 1]), (0.5, [8] * 4), (2, [1] * 4), (1000, [16] * 4)])
def test_a_video_is_reduced_frame_group_by_frame_group(visual_tokens, shares):
    model, processor = make(QWEN3)
    full = processor(videos=[a_video()], text=[video_prompt()], return_tensors="pt")
    assert placeholder_runs(full, model.config.video_token_id) == [PER_FRAME] * FRAME_GROUPS
    every = positions(model, full, "video")
    tokenmerge.apply(model, visual_tokens=visual_tokens, processor=processor)
    batch = processor(videos=[a_video()], text=[video_prompt()], return_tensors="pt")
    assert placeholder_runs(batch, model.config.video_token_id) == shares
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    (video,) = tokenmerge.get_state(model).videos
    assert (video.full, video.kept) == (FRAME_GROUPS * PER_FRAME, sum(shares)) and video.size.sum() == video.full
    # the kept tokens of every frame group stay in its run, each at the position of its own cell
    assert torch.bincount(video.cells // PER_FRAME, minlength=FRAME_GROUPS).tolist() == shares
    assert (video.cells.diff() > 0).all()
    assert torch.equal(positions(model, batch, "video"), every[:, video.cells])


def test_images_and_a_video_in_one_prompt_generate_once_with_their_own_counts():
    model, processor = make(QWEN3)
    tokenmerge.apply(model, visual_tokens=5, processor=processor)
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    batch = processor(images=[pictures(2)], videos=[a_video()], text=[video_prompt(images=2)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert len(calls) == 2  # the images once and the video once, not again in the forward pass
    state = tokenmerge.get_state(model)
    assert [image.kept for image in state.images] == [5, 5] and [video.kept for video in state.videos] == [5]
    assert placeholder_runs(batch, model.config.video_token_id) == [2, 1, 1, 1]


def test_the_mixture_of_experts_twin_is_exact_unreduced_and_reduces_to_k():
    torch.manual_seed(0)
    model, processor = qwen3_vl_moe()
    batch = processor(images=[pictures(2)], text=[QWEN3.prompt(2)], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=3, do_sample=False)
    tokenmerge.apply(model, visual_tokens=1.0, processor=processor)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), expected)
    tokenmerge.remove(model)
    tokenmerge.apply(model, visual_tokens=4, processor=processor)
    with torch.no_grad():
        model.generate(**processor(images=[pictures(2)], text=[QWEN3.prompt(2)], return_tensors="pt"),
                       max_new_tokens=3, do_sample=False)
    assert [kept for _, kept in tokenmerge.get_state(model).counts] == [4, 4]


def test_a_video_prompt_gives_the_same_logits_alone_and_in_a_padded_batch():
    model, processor = make(QWEN3)
    tokenmerge.apply(model, visual_tokens=7, processor=processor)
    first, second = video_prompt(), video_prompt(images=1)
    with torch.no_grad():
        alone = [model(**processor(videos=[a_video(0)], text=[first], return_tensors="pt")).logits[0],
                 model(**processor(videos=[a_video(1)], images=[pictures(1)], text=[second],
                                   return_tensors="pt")).logits[0]]
        both = model(**processor(videos=[a_video(0), a_video(1)], images=[[], pictures(1)], text=[first, second],
                                 return_tensors="pt", padding=True)).logits
    for row, logits in enumerate(alone):  # left-padded: each prompt's logits end its row
        torch.testing.assert_close(both[row, -len(logits):], logits, atol=1e-5, rtol=1e-5)
    assert [video.kept for video in tokenmerge.get_state(model).videos] == [7, 7]
