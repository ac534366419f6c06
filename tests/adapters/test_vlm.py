"""Vision-language models: every image reduced to a fixed number of visual tokens where
the language model receives them (``visual_tokens``), or merged in the vision tower
(``r``), with the processor emitting as many placeholders; exact where nothing is
reduced; refusals named. Tiny random models of every supported family with their real
processor classes (tests/adapters/vlm_models.py)."""
import copy

import pytest
import torch

import tokenmerge
from tests.adapters.vlm_families import ALL as FAMILIES
from tests.adapters.vlm_models import GRID, make, pictures, transformers
from tokenmerge.fixed_count import reduce_to, target_count

NEW_TOKENS = 4


@pytest.fixture(params=FAMILIES, ids=[family.id for family in FAMILIES])
def family(request):
    return request.param


def inputs(family, processor, images_per_prompt=(1,), seed=0):
    """A batch of prompts, one per entry, each with that many images, left-padded."""
    images = pictures(sum(images_per_prompt), seed)
    nested, start = [], 0
    for count in images_per_prompt:
        nested.append(images[start:start + count])
        start += count
    texts = [family.prompt(count) for count in images_per_prompt]
    return processor(images=nested, text=texts, return_tensors="pt", padding=True)


def generate(model, batch):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def unreduced_counts(model, processor, family, images_per_prompt):
    """(full, full) for every image of ``inputs(...)``, read from a pass of the model patched to keep all."""
    tokenmerge.apply(model, visual_tokens=1.0)
    generate(model, inputs(family, processor, images_per_prompt))
    counts = tokenmerge.get_state(model).counts
    tokenmerge.remove(model)
    return counts


def placeholders(model, batch):
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


# --- exact where nothing is reduced ----------------------------------------------------


@pytest.mark.parametrize("setting", ["full_count", "whole_fraction", "tower_r0"])
def test_nothing_reduced_gives_the_unpatched_ids_and_logits(family, setting):
    if setting == "tower_r0" and not family.tower_merges:
        pytest.skip(f"{family.id} does not merge in its tower")
    model, processor = make(family)
    batch = inputs(family, processor, (1, 2))
    expected_ids, expected_logits = generate(model, batch), logits(model, batch)
    every = 1000 if family.dynamic else family.full  # more than any image has, or exactly all
    kwargs = {"full_count": dict(visual_tokens=every), "whole_fraction": dict(visual_tokens=1.0),
              "tower_r0": dict(r=0)}[setting]
    tokenmerge.apply(model, processor=processor, **kwargs)
    again = inputs(family, processor, (1, 2))
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(generate(model, again), expected_ids)
    torch.testing.assert_close(logits(model, again), expected_logits, atol=1e-6, rtol=0)


def test_remove_restores_the_model_and_the_processor(family):
    model, processor = make(family)
    classes = {name: type(module) for name, module in model.named_modules()}
    processor_class = type(processor)
    batch = inputs(family, processor, (2,))
    expected = generate(model, batch)
    tokenmerge.apply(model, visual_tokens=0.5, processor=processor)
    assert placeholders(model, inputs(family, processor, (2,))) < placeholders(model, batch)
    tokenmerge.remove(model)
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert type(processor) is processor_class and "_tokenmerge_state" not in vars(processor)
    assert not tokenmerge.is_applied(model)
    assert torch.equal(generate(model, inputs(family, processor, (2,))), expected)


# --- reduced -------------------------------------------------------------------------------


@pytest.mark.parametrize("visual_tokens", [5, 0.25])
def test_every_image_reaches_the_language_model_as_exactly_k_tokens(family, visual_tokens):
    model, processor = make(family)
    fulls = [full for full, _ in unreduced_counts(model, processor, family, (1, 3))]
    kept = [target_count(full, visual_tokens) for full in fulls]
    if not family.dynamic:
        expected = visual_tokens if isinstance(visual_tokens, int) else round(visual_tokens * family.full)
        assert fulls == [family.full] * 4 and kept == [expected] * 4
    else:
        assert len(set(fulls)) > 1  # images of different sizes give different counts
    tokenmerge.apply(model, visual_tokens=visual_tokens, processor=processor)
    batch = inputs(family, processor, (1, 3))
    assert placeholders(model, batch) == [kept[0], sum(kept[1:])]
    out = generate(model, batch)
    assert out.shape == (2, batch["input_ids"].shape[1] + NEW_TOKENS)
    state = tokenmerge.get_state(model)
    assert state.counts == list(zip(fulls, kept))
    for size, full, count in zip(state.sizes, fulls, kept):
        assert size.shape == (count,) and size.sum() == full and (size >= 1).all()


def test_kept_tokens_reach_the_language_model_in_grid_order(family):
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=0.25, processor=processor)
    generate(model, inputs(family, processor, (2,)))
    for image in tokenmerge.get_state(model).images:
        assert image.kept < image.full and (image.cells.diff() > 0).all()


def test_chat_template_gives_the_reduced_placeholders(family):
    if family.id == "paligemma":
        pytest.skip("PaliGemma's processor has no chat template")
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=6, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture} for picture in pictures(2)]
                 + [{"type": "text", "text": "what is this ?"}]}]
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert placeholders(model, batch) == [12]
    generate(model, batch)


def test_a_prompt_gives_the_same_answer_alone_and_in_a_batch(family):
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=7, processor=processor)
    one, other = pictures(2)
    prompt = family.prompt(1)
    first, second = (processor(images=[[picture]], text=[prompt], return_tensors="pt") for picture in (one, other))
    both = processor(images=[[one], [other]], text=[prompt, prompt], return_tensors="pt")
    alone = torch.cat([logits(model, first), logits(model, second)])
    torch.testing.assert_close(logits(model, both), alone, atol=1e-5, rtol=1e-5)


def test_a_prompt_built_for_the_full_count_is_refused_with_the_remedy(family):
    model, processor = make(family)
    batch = inputs(family, processor, (1,))
    tokenmerge.apply(model, visual_tokens=8)
    with pytest.raises(ValueError, match=r"^tokenmerge reduced .* processor=processor") as error:
        generate(model, batch)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["tome-features", "random", "cut"])
def test_other_methods_reduce_to_the_same_count(family, method):
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=6, processor=processor, method=method)
    batch = inputs(family, processor, (2,))
    generate(model, batch)
    assert [kept for _, kept in tokenmerge.get_state(model).counts] == [6, 6]


def test_tower_merging_reaches_the_language_model_with_the_processor_counts(family):
    model, processor = make(family)
    if not family.tower_merges:
        with pytest.raises(TypeError, match="visual_tokens=K"):
            tokenmerge.apply(model, r=4, processor=processor)
        assert not tokenmerge.is_applied(model)
        return
    tokenmerge.apply(model, r=4, processor=processor)
    batch = inputs(family, processor, (1, 2))
    count = placeholders(model, batch)[0]
    assert count < GRID and placeholders(model, batch)[1] == 2 * count
    generate(model, batch)
    tokenmerge.remove(model)
    tokenmerge.apply(model, r=4, visual_tokens=5, processor=processor)
    batch = inputs(family, processor, (1,))
    assert placeholders(model, batch) == [5]
    generate(model, batch)
    assert tokenmerge.get_state(model).counts == [(count, 5)]


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(visual_tokens=0), ValueError, "at least 1"),
    (dict(visual_tokens=1.5), ValueError, r"\(0, 1\]"),
    (dict(visual_tokens=True), ValueError, "whole number"),
    (dict(), TypeError, "needs visual_tokens=K"),
    (dict(visual_tokens=4, method="evit"), ValueError, "class token"),
])
def test_bad_settings_are_refused_before_anything_changes(family, kwargs, error, message):
    model, processor = make(family)
    with pytest.raises(error, match=message):
        tokenmerge.apply(model, processor=processor, **kwargs)
    assert not tokenmerge.is_applied(model) and type(processor).__module__.startswith("transformers")


def test_a_processor_of_another_family_is_refused(family):
    model, _ = make(family)
    other = next(other for other in FAMILIES if other.id != family.id)
    with pytest.raises(TypeError, match="pass the model's own processor"):
        tokenmerge.apply(model, visual_tokens=4, processor=make(other)[1])
    assert not tokenmerge.is_applied(model)


def test_a_patched_processor_saves_as_its_own_class(family, tmp_path):
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=4, processor=processor)
    processor.save_pretrained(tmp_path)
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(processor).__name__ and type(loaded).__module__.startswith("transformers")


def test_a_deep_copy_of_a_patched_model_reduces_the_same():
    family = FAMILIES[0]
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=5, processor=processor)
    twin = copy.deepcopy(model)
    batch = inputs(family, processor, (1,))
    assert torch.equal(generate(twin, batch), generate(model, batch))


def test_other_vision_language_models_are_refused_by_name():
    config = transformers.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=16, image_size=32, patch_size=4),
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64))
    model = transformers.Mistral3ForConditionalGeneration(config)
    with pytest.raises(TypeError, match="Mistral3ForConditionalGeneration yet; supported") as error:
        tokenmerge.apply(model, visual_tokens=8)
    assert "\n" not in str(error.value) and not tokenmerge.is_applied(model)


def test_visual_tokens_are_refused_for_a_vision_transformer():
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64, image_size=32, patch_size=8))
    with pytest.raises(TypeError, match="for vision-language models"):
        tokenmerge.apply(model, r=2, visual_tokens=8)


# --- the reduction itself ----------------------------------------------------------------


def test_reduce_to_keeps_exactly_count_tokens_whose_sizes_sum_to_the_input():
    tokens, keys = torch.randn(3, 576, 16), torch.randn(3, 576, 8)
    reduced = reduce_to(tokens, keys, 64)
    assert reduced.tokens.shape == (3, 64, 16)
    assert torch.equal(reduced.size.sum(dim=1).flatten(), torch.full((3,), 576.0))
    # every input token ended in a kept token, and each kept token is the size-weighted mean of its inputs
    means = torch.zeros(3, 64, 16).scatter_add_(1, reduced.source.unsqueeze(-1).expand(-1, -1, 16), tokens)
    torch.testing.assert_close(means / reduced.size, reduced.tokens, atol=1e-5, rtol=1e-5)


def test_reduce_to_merges_exact_twins_first_and_keeps_them_as_one_token_of_size_2():
    keys = torch.randn(1, 8, 4)
    keys[0, 3] = keys[0, 2]  # tokens 2 and 3 are the same
    tokens = keys.clone()
    reduced = reduce_to(tokens, keys, 7)
    assert reduced.source[0, 2] == reduced.source[0, 3]
    assert reduced.size[0, reduced.source[0, 2], 0] == 2
    torch.testing.assert_close(reduced.tokens[0, reduced.source[0, 2]], tokens[0, 2])


def test_reduce_to_a_row_alone_gives_what_it_gives_in_a_batch():
    tokens, keys = torch.randn(4, 100, 16), torch.randn(4, 100, 8)
    assert torch.equal(reduce_to(tokens[2:3], keys[2:3], 30).tokens[0], reduce_to(tokens, keys, 30).tokens[2])


# --- Qwen2.5-VL: M-RoPE positions and videos --------------------------------------------

QWEN = next(family for family in FAMILIES if family.id == "qwen2_5_vl")


def image_positions(model, batch):
    """The (3, tokens) M-RoPE positions of the image placeholders of a one-prompt batch."""
    keys = ("mm_token_type_ids", "image_grid_thw", "attention_mask")
    positions, _ = model.model.get_rope_index(batch["input_ids"], **{key: batch[key] for key in keys})
    return positions[:, 0, batch["input_ids"][0] == model.config.image_token_id]


def test_qwen_kept_tokens_keep_the_m_rope_positions_of_their_own_grid_cells():
    model, processor = make(QWEN)
    picture = pictures(1)
    full = processor(images=[picture], text=[QWEN.prompt(1)], return_tensors="pt")
    every = image_positions(model, full)
    tokenmerge.apply(model, visual_tokens=7, processor=processor)
    reduced = processor(images=[picture], text=[QWEN.prompt(1)], return_tensors="pt")
    logits(model, reduced)
    (image,) = tokenmerge.get_state(model).images
    assert image.full == every.shape[1] and len(set(image.cells.tolist())) == 7
    assert torch.equal(image_positions(model, reduced), every[:, image.cells])


def test_qwen_generate_runs_the_tower_once_per_call():
    model, processor = make(QWEN)
    tokenmerge.apply(model, visual_tokens=7, processor=processor)
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    generate(model, inputs(QWEN, processor, (1, 2)))
    assert len(calls) == 1


def test_qwen_videos_reach_the_language_model_as_k_tokens():
    model, processor = make(QWEN)
    video = (torch.rand(4, 32, 32, 3) * 255).to(torch.uint8).numpy()
    prompt = ["USER: <|vision_start|><|video_pad|><|vision_end|> what is this ? ASSISTANT:"]
    full = processor(videos=[video], text=prompt, return_tensors="pt")
    count = int((full["input_ids"] == model.config.video_token_id).sum())
    tokenmerge.apply(model, visual_tokens=6, processor=processor)
    batch = processor(videos=[video], text=prompt, return_tensors="pt")
    assert int((batch["input_ids"] == model.config.video_token_id).sum()) == 6
    generate(model, batch)
    (reduced,) = tokenmerge.get_state(model).videos
    assert (reduced.full, reduced.kept) == (count, 6) and reduced.size.sum() == count
