"""Size-aware attention in a vision-language model's language model (``prop_attn=True``):
every visual token attended to as if it appeared as often as the visual tokens it
stands for, in the prefill and in every cached decoding step; nothing changes where
nothing is reduced; refused where the bias could not reach the attention."""
import pytest
import torch

import tokenmerge
from tests.adapters.test_vlm import NEW_TOKENS, inputs
from tests.adapters.vlm_families import ALL as FAMILIES
from tests.adapters.vlm_models import GRID, make, transformers
from tokenmerge.adapters.vlm.key_bias import aligned, check_implementation


@pytest.fixture(params=FAMILIES, ids=[family.id for family in FAMILIES])
def family(request):
    return request.param


def forward_logits(model, batch, **replaced):
    with torch.no_grad():
        return model(**{**batch, **replaced}).logits


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_with_nothing_reduced_the_logits_are_the_unpatched_ones(family, implementation):
    model, processor = make(family)
    model.set_attn_implementation(implementation)
    batch = inputs(family, processor, (1, 2))
    expected = forward_logits(model, batch)
    tokenmerge.apply(model, visual_tokens=1.0, processor=processor, prop_attn=True)
    real = batch["attention_mask"].bool()  # left padding: positions no output is read from
    torch.testing.assert_close(forward_logits(model, batch)[real], expected[real], atol=1e-6, rtol=0)


def test_every_cached_decoding_step_sees_the_bias_the_prefill_saw(family):
    """The logits of each generated token equal those of generating without a cache (every
    step one pass over the whole sequence): the bias of the visual keys stays with them in
    the cache."""
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=0.25, processor=processor, prop_attn=True)
    batch = inputs(family, processor, (1, 2))
    cached, uncached = (generated_logits(model, batch, use_cache) for use_cache in (True, False))
    for step, (with_cache, without) in enumerate(zip(cached, uncached)):
        torch.testing.assert_close(with_cache, without, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def generated_logits(model, batch, use_cache):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, use_cache=use_cache).logits


def test_the_bias_changes_the_answer_the_same_way_in_eager_and_sdpa(family):
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=0.25, processor=processor)
    batch = inputs(family, processor, (1, 2))
    real = batch["attention_mask"].bool()
    unbiased = forward_logits(model, batch)[real]
    tokenmerge.remove(model)
    results = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        tokenmerge.apply(model, visual_tokens=0.25, processor=processor, prop_attn=True)
        results[implementation] = forward_logits(model, batch)[real]
        tokenmerge.remove(model)
    torch.testing.assert_close(results["eager"], results["sdpa"], atol=1e-5, rtol=1e-5)
    assert (results["sdpa"] - unbiased).abs().max() > 1e-4


def test_a_prompt_gives_the_same_logits_alone_and_in_a_batch(family):
    model, processor = make(family)
    tokenmerge.apply(model, visual_tokens=7, processor=processor, prop_attn=True)
    both = inputs(family, processor, (1, 1))
    alone = inputs(family, processor, (1,))
    last = forward_logits(model, both)[:, -1]
    torch.testing.assert_close(last[0], forward_logits(model, alone)[0, -1], atol=1e-5, rtol=1e-5)


def test_remove_restores_the_language_model(family):
    model, processor = make(family)
    classes = {name: type(module) for name, module in model.named_modules()}
    tokenmerge.apply(model, visual_tokens=0.5, processor=processor, prop_attn=True)
    assert tokenmerge.get_state(model).prop_attn
    tokenmerge.remove(model)
    assert {name: type(module) for name, module in model.named_modules()} == classes


def test_with_tower_merging_sizes_count_the_patches(family):
    if not family.tower_merges:
        pytest.skip(f"{family.id} does not merge in its tower")
    model, processor = make(family)
    tokenmerge.apply(model, r=4, visual_tokens=5, processor=processor, prop_attn=True)
    batch = inputs(family, processor, (1, 2))
    forward_logits(model, batch)
    for image in tokenmerge.get_state(model).images:
        assert image.kept == 5 and image.size.sum() == GRID and (image.size >= 1).all()


def test_an_attention_implementation_that_ignores_the_mask_bias_is_refused():
    model, processor = make(FAMILIES[0])
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(TypeError, match="attn_implementation='flash_attention_2'.*'sdpa' or 'eager'"):
        tokenmerge.apply(model, visual_tokens=8, processor=processor, prop_attn=True)
    assert not tokenmerge.is_applied(model)
    with pytest.raises(TypeError, match="flex_attention"):
        check_implementation(transformers.LlamaConfig(attn_implementation="flex_attention"))


@pytest.mark.parametrize("option", ["trace_source", "dense"])
def test_vision_transformer_options_are_refused(option):
    model, processor = make(FAMILIES[0])
    with pytest.raises(TypeError, match="for vision transformers"):
        tokenmerge.apply(model, visual_tokens=8, processor=processor, **{option: True})
    assert not tokenmerge.is_applied(model)


def test_aligned_pads_a_static_cache_and_keeps_the_last_keys_of_a_sliding_one():
    bias = torch.arange(6.0).view(1, 6)
    assert aligned(bias, 8).tolist() == [[0, 1, 2, 3, 4, 5, 0, 0]]
    assert aligned(bias, 4).tolist() == [[2, 3, 4, 5]]
