"""LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video: anyres images packed with an
``image_newline`` at every row end. The row ends a reduced image keeps are the model's
own, at their own places, each after the tokens of its band of rows; the processor's
count of every image shape is the model's; videos reach the language model as K tokens."""
import pytest
import torch

import tokenmerge
from tests.adapters.test_vlm import generate, logits, placeholders
from tests.adapters.vlm_families.llava_next import FAMILIES, FRAMES
from tests.adapters.vlm_models import make, pictures
from tokenmerge.adapters.vlm.llava_next import row_bands

ONEVISION = next(family for family in FAMILIES if family.id == "llava_onevision")
VIDEO_FAMILIES = [family for family in FAMILIES if family.id != "llava_next"]


@pytest.fixture(params=FAMILIES, ids=[family.id for family in FAMILIES])
def family(request):
    return request.param


def packed(model, batch):
    """The packed tokens of every image of ``batch``, as ``get_image_features`` hands them on."""
    with torch.no_grad():
        return model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                              return_dict=True).pooler_output


def test_the_kept_row_ends_are_the_models_own_each_after_its_band_of_rows(family):
    model, processor = make(family)
    newline = model.model.image_newline.detach()
    batch = processor(images=[pictures(1)], text=[family.prompt(1)], return_tensors="pt")
    (full,) = packed(model, batch)
    ends = (full == newline).all(dim=1).nonzero()[:, 0]
    assert len(ends) == 8 and ends[-1] == len(full) - 1  # the picture's 8 rows of the 32x64 crops
    tokenmerge.apply(model, visual_tokens=40, processor=processor)
    (reduced,) = packed(model, processor(images=[pictures(1)], text=[family.prompt(1)], return_tensors="pt"))
    (image,) = tokenmerge.get_state(model).images
    is_end = torch.isin(image.cells, ends)
    # round(40 * 8 / 152) = 2 row ends, closing 4 rows each, the image's last token one of them
    assert image.cells[is_end].tolist() == [ends[3], ends[7]] and image.size[is_end].tolist() == [4, 4]
    assert is_end[-1] and torch.equal(reduced[is_end], newline.expand(2, -1))
    # the other kept tokens stand for every token that is no row end, and for nothing else
    assert not (reduced[~is_end] == newline).all(dim=1).any() and not torch.isin(image.cells[~is_end], ends).any()
    assert image.size[~is_end].sum() == len(full) - 8 and len(reduced) == 40


def test_onevision_grids_resized_to_fewer_rows_keep_the_row_ends_where_the_model_puts_them():
    model, processor = make(ONEVISION)
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"  # at most one crop's tokens
    newline = model.model.image_newline.detach()
    batch = processor(images=[pictures(1)], text=[ONEVISION.prompt(1)], return_tensors="pt")
    (full,) = packed(model, batch)
    ends = (full == newline).all(dim=1).nonzero()[:, 0]
    assert placeholders(model, batch) == [len(full)] == [64 + 7 * 8 + 7]  # 8x10 patches resized to 7x8
    tokenmerge.apply(model, visual_tokens=len(full) - 5, processor=processor)  # round(122 * 7 / 127) = 7 row ends
    (reduced,) = packed(model, processor(images=[pictures(1)], text=[ONEVISION.prompt(1)], return_tensors="pt"))
    (image,) = tokenmerge.get_state(model).images
    is_end = torch.isin(image.cells, ends)
    assert torch.equal(image.cells[is_end], ends) and torch.equal(reduced[is_end], newline.expand(7, -1))


def test_the_processor_counts_every_image_shape_as_the_model_packs_it(family):
    model, processor = make(family)
    shapes = [(40, 48), (48, 40), (32, 32), (30, 70), (70, 30)]
    full_counts, kept = [], 9
    for height, width in shapes:
        picture = pictures(1)[0].resize((width, height))
        batch = processor(images=[[picture]], text=[family.prompt(1)], return_tensors="pt")
        (tokens,) = packed(model, batch)
        assert placeholders(model, batch) == [len(tokens)]
        full_counts.append(len(tokens))
    assert len(set(full_counts)) >= 3
    tokenmerge.apply(model, visual_tokens=kept, processor=processor)
    for (height, width), full in zip(shapes, full_counts):
        picture = pictures(1)[0].resize((width, height))
        batch = processor(images=[[picture]], text=[family.prompt(1)], return_tensors="pt")
        assert placeholders(model, batch) == [kept]
        logits(model, batch)
        assert tokenmerge.get_state(model).counts == [(full, kept)]


def test_one_token_per_image_leaves_no_room_for_a_row_end_and_is_refused(family):
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=1, processor=processor)
    batch = processor(images=[pictures(1)], text=[family.prompt(1)], return_tensors="pt")
    with pytest.raises(ValueError, match=r"^tokenmerge keeps an image_newline row end .* at least 2") as error:
        logits(model, batch)
    assert "\n" not in str(error.value)


def test_row_bands_split_the_rows_in_proportion_to_the_kept_tokens():
    assert row_bands(5, 8, 152, "LLaVA-NeXT").tolist() == [8]  # at least one row end
    assert row_bands(76, 8, 152, "LLaVA-NeXT").tolist() == [2, 2, 2, 2]
    assert row_bands(50, 7, 100, "LLaVA-NeXT").tolist() == [2, 2, 2, 1]  # round(3.5) = 4 bands
    assert row_bands(151, 8, 152, "LLaVA-NeXT").tolist() == [1] * 8  # at most every row end
    assert row_bands(3, 0, 64, "LLaVA-NeXT").tolist() == []


@pytest.mark.parametrize("video_family", VIDEO_FAMILIES, ids=[family.id for family in VIDEO_FAMILIES])
def test_videos_reach_the_language_model_as_k_tokens_ending_with_their_row_end(video_family):
    model, processor = make(video_family)
    row_ends = 1 if video_family is ONEVISION else 0  # OneVision ends every video with a row end
    video = (torch.rand(FRAMES, 32, 32, 3) * 255).to(torch.uint8).numpy()
    prompt = ["USER: <video> what is this ? ASSISTANT:"]
    full = processor(videos=[video], text=prompt, return_tensors="pt")
    count = int((full["input_ids"] == model.config.video_token_id).sum())
    assert count == FRAMES * 4 * 4 + row_ends  # frames pooled from 8x8 to 4x4
    expected = generate(model, full)
    tokenmerge.apply(model, visual_tokens=count, processor=processor)
    assert torch.equal(generate(model, processor(videos=[video], text=prompt, return_tensors="pt")), expected)
    tokenmerge.remove(model)
    tokenmerge.apply(model, visual_tokens=6, processor=processor)
    batch = processor(videos=[video], text=prompt, return_tensors="pt")
    assert int((batch["input_ids"] == model.config.video_token_id).sum()) == 6
    generate(model, batch)
    (reduced,) = tokenmerge.get_state(model).videos
    assert (reduced.full, reduced.kept) == (count, 6) and reduced.size.sum() == count
    assert (reduced.cells[-1] == count - 1 and reduced.size[-1] == 1) == bool(row_ends)
