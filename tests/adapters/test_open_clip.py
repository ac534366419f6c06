"""open_clip integration: exactness, invariants, pooling, gradients, restore, errors (random weights)."""
import copy
import pickle

import pytest
import torch
from open_clip.coca_model import CoCa, MultimodalCfg
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from open_clip.transformer import PatchDropout, ResidualAttentionBlock, VisionTransformer

import tokenmerge
from tests.adapters.invariants import assert_sizes_and_sources_agree
from tokenmerge.adapters import find_adapter
from tokenmerge.flops import count_flops
from tokenmerge.merge import unmerge

IMAGE = 48  # a 6x6 grid of 8-pixel patches: 37 tokens with the class token
TEXT_CFG = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
ATTENTION_POOL = dict(attn_pooler_queries=4, attn_pooler_heads=2)

# (id, CLIPVisionCfg kwargs, embed_dim); "sequence_first" also runs the transformer as (N, B, C)
VARIANTS = [
    ("tok", {}, 32),
    ("avg", {"pool_type": "avg"}, 32),
    ("layerscale", {"ls_init_value": 0.5}, 32),
    ("avg_final_ln_after_pool", {"pool_type": "avg", "final_ln_after_pool": True}, 32),
    ("no_ln_pre_sincos", {"no_ln_pre": True, "pos_embed_type": "sin_cos_2d"}, 32),
    ("rectangular", {"image_size": (IMAGE, 32)}, 32),
    ("attentional_pool", {"attentional_pool": True, **ATTENTION_POOL}, 32),
    # open_clip applies ln_post of the pooled width to the tokens here: it runs only when they match
    ("attentional_pool_parallel", {"attentional_pool": "parallel", **ATTENTION_POOL}, 64),
    ("attentional_pool_cascade", {"attentional_pool": "cascade", **ATTENTION_POOL}, 64),
    ("sequence_first", {"ls_init_value": 0.5, "pool_type": "avg"}, 32),
]
IDS = [v[0] for v in VARIANTS]


def make_clip(vision=None, embed_dim=32, layers=3, cls=CLIP, **overrides):
    """A random CLIP in eval mode whose norm weights, LayerScales and biases are far from
    their neutral init, so that dropping any of them changes the outputs."""
    vision_cfg = CLIPVisionCfg(
        **{"layers": layers, "width": 64, "head_width": 16, "patch_size": 8, "image_size": IMAGE, **(vision or {})}
    )
    model = cls(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=CLIPTextCfg(**TEXT_CFG), **overrides).eval()
    with torch.no_grad():
        for name, param in model.visual.named_parameters():
            if name.endswith("gamma") or (name.startswith("ln") or ".ln" in name) and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def run_sequence_first(visual):
    """Make ``visual`` run its transformer sequence-first (N, B, C), as open_clip's
    Transformer does with batch_first=False; the weights and outputs stay the same."""
    visual.transformer.batch_first = False
    for block in visual.transformer.resblocks:
        block.attn.batch_first = False


def image_size(model):
    return tuple(model.visual.image_size)


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def variant(request):
    name, vision, embed_dim = request.param
    torch.manual_seed(0)
    model = make_clip(vision, embed_dim)
    if name == "sequence_first":
        run_sequence_first(model.visual)
    return model


def block_output_counts(model):
    """Hooks recording the token count leaving every visual block, whatever the layout."""
    counts = []
    transformer = model.visual.transformer
    dim = 1 if transformer.batch_first else 0
    hooks = [block.register_forward_hook(lambda m, i, o: counts.append(o.shape[dim]))
             for block in transformer.resblocks]
    return counts, hooks


def test_r0_matches_unpatched_model(variant):
    x = torch.randn(2, 3, *image_size(variant))
    with torch.no_grad():
        expected = variant.encode_image(x)
        tokenmerge.apply(variant, r=0)
        try:
            actual = variant.encode_image(x)
        finally:
            tokenmerge.remove(variant)
        restored = variant.encode_image(x)
    # Blocks that merge nothing run their own forward, so r=0 is bitwise exact.
    assert torch.equal(actual, expected)
    assert torch.equal(restored, expected)


def paired_input(model, batch=2):
    """Images whose patch columns come in identical pairs (2j, 2j+1), for a model whose
    position embedding is made to repeat the same way: every patch token then has an
    exact twin, the one it is matched with in the alternate A/B split."""
    visual = model.visual
    patch = visual.patch_size[1]
    grid_h, grid_w = visual.grid_size
    x = torch.randn(batch, 3, *image_size(model))
    for j in range(0, grid_w, 2):
        x[..., (j + 1) * patch:(j + 2) * patch] = x[..., j * patch:(j + 1) * patch]
    with torch.no_grad():
        grid = visual.positional_embedding[1:].view(grid_h, grid_w, -1)
        grid[:, 1::2] = grid[:, 0::2]
    return x


@pytest.mark.parametrize("fraction", [2, 4])
def test_merging_exact_twins_changes_nothing(variant, fraction):
    """Merged with proportional attention, two identical tokens behave like one of
    size 2: a model whose first block merges only exact twins must reproduce the
    unmerged outputs. This fails for any patch that skips part of a block (LayerScale,
    biases, norms) or mishandles sizes in attention or pooling."""
    model = copy.deepcopy(variant)
    x = paired_input(model)
    num_tokens, num_protected = find_adapter(model).token_layout(model)
    num_patches = num_tokens - num_protected
    r = [num_patches // fraction] + [0] * (len(model.visual.transformer.resblocks) - 1)
    with torch.no_grad():
        expected = model.encode_image(x)
        tokenmerge.apply(model, r=r, trace_source=True)
        actual = model.encode_image(x)
        state = tokenmerge.get_state(model)
    assert state.size.shape[1] == num_tokens - r[0]
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)
    # and every merge joined two twins: sources in the same column pair and row
    source = state.source[:, num_protected:] - num_protected
    patch_index = torch.arange(num_patches)
    for b in range(x.shape[0]):
        for token in source[b].unique():
            members = patch_index[source[b] == token]
            assert len(members) <= 2 and (members // 2).unique().numel() == 1


def test_proportional_attention_is_what_makes_twins_exact():
    """The twin test's counter-check: without proportional attention the same merges
    change the outputs, so the test above does test the sizes."""
    model = make_clip({"attentional_pool": True, **ATTENTION_POOL})
    x = paired_input(model)
    with torch.no_grad():
        expected = model.encode_image(x)
        tokenmerge.apply(model, r=[18, 0, 0], prop_attn=False)
        actual = model.encode_image(x)
    assert (actual - expected).abs().max() > 1e-3


def test_token_counts_are_fixed_per_block_for_any_content(variant):
    model = copy.deepcopy(variant)
    tokenmerge.apply(model, r=5)
    counts, hooks = block_output_counts(model)
    size = image_size(model)
    with torch.no_grad():
        for x in [torch.zeros(2, 3, *size), torch.randn(3, 3, *size), torch.rand(1, 3, *size) * 10]:
            counts.clear()
            model.encode_image(x)
            assert counts == tokenmerge.token_counts(model)
    for hook in hooks:
        hook.remove()
    assert counts[-1] == counts[0] - 5 * (len(counts) - 1)


def test_sizes_sum_to_token_count_and_protected_tokens_are_never_merged(variant):
    model = copy.deepcopy(variant)
    tokenmerge.apply(model, r=6, trace_source=True)
    with torch.no_grad():
        model.encode_image(torch.randn(3, 3, *image_size(model)))
    state = tokenmerge.get_state(model)
    num_tokens, p = state.num_input_tokens, state.num_protected
    assert (num_tokens, p) == find_adapter(model).token_layout(model)
    assert_sizes_and_sources_agree(state, num_tokens, 3)


def test_pooling_sees_sizes(variant):
    """Pooling merged tokens equals pooling them spread back over their patches: the
    size-weighted mean for avg, the log-size bias for attention pooling."""
    model = copy.deepcopy(variant)
    visual = model.visual
    tokenmerge.apply(model, r=6, trace_source=True)
    features = []
    hook = visual.transformer.register_forward_hook(lambda m, i, o: features.append(o))
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, *image_size(model)))
        hook.remove()
        merged = features[0]
        spread = unmerge(merged, tokenmerge.get_state(model).source)
        pooled, _ = visual._pool(merged)
        expected, _ = type(visual)._tokenmerge_original._pool(visual, spread)
    assert merged.shape[1] < spread.shape[1]
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_an_image_gives_the_same_output_alone_and_in_a_batch(variant):
    model = copy.deepcopy(variant)
    tokenmerge.apply(model, r=6)
    x = torch.randn(4, 3, *image_size(model))
    with torch.no_grad():
        batched = model.encode_image(x)
        alone = torch.cat([model.encode_image(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_sequence_first_transformer_merges_like_batch_first():
    batch_first = make_clip({"ls_init_value": 0.5})
    sequence_first = copy.deepcopy(batch_first)
    run_sequence_first(sequence_first.visual)
    x = torch.randn(3, 3, IMAGE, IMAGE)
    outputs = []
    for model in (batch_first, sequence_first):
        tokenmerge.apply(model, r=[4, 6, 2], trace_source=True)
        with torch.no_grad():
            outputs.append((model.encode_image(x), tokenmerge.get_state(model).source))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs[1][1], outputs[0][1])


def _timm_tower_clip():
    from tests.adapters.test_contract import CASES_BY_ID, make

    return make(CASES_BY_ID["open_clip_timm_tower"])


@pytest.mark.parametrize("build", [lambda: make_clip({"pool_type": "avg"}), _timm_tower_clip],
                         ids=["open_clip_tower", "timm_tower"])
def test_text_tower_is_untouched_and_zero_shot_logits_use_merged_images(build):
    model = build()
    text = torch.randint(0, model.vocab_size, (5, model.context_length))
    size = model.visual.image_size
    images = torch.randn(2, 3, *((size, size) if isinstance(size, int) else size))
    text_classes = {name: type(m) for name, m in model.named_modules() if not name.startswith("visual")}
    with torch.no_grad():
        expected_text = model.encode_text(text)
        unmerged_logits, _ = model.get_logits(images, text)
        tokenmerge.apply(model, r=6)
        merged_text = model.encode_text(text)
        image_logits, text_logits = model.get_logits(images, text)
        image_features, text_features, logit_scale = model(images, text)
        merged_images = model.encode_image(images, normalize=True)
    assert {name: type(m) for name, m in model.named_modules() if not name.startswith("visual")} == text_classes
    assert torch.equal(merged_text, expected_text)
    assert tokenmerge.get_state(model).size.shape[1] == tokenmerge.token_counts(model)[-1]
    assert torch.equal(image_features, merged_images)
    torch.testing.assert_close(image_logits, logit_scale * merged_images @ text_features.T)
    torch.testing.assert_close(text_logits, image_logits.T)
    assert not torch.allclose(image_logits, unmerged_logits)


def test_vision_transformer_alone_merges_like_inside_clip():
    model = make_clip({"ls_init_value": 0.5, "pool_type": "avg"})
    visual = copy.deepcopy(model.visual)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected_r0 = visual(x)
        tokenmerge.apply(visual, r=0)
        assert torch.equal(visual(x), expected_r0)
        tokenmerge.apply(visual, r=5)
        tokenmerge.apply(model, r=5)
        assert torch.equal(visual(x), model.encode_image(x))
    assert tokenmerge.token_counts(visual) == tokenmerge.token_counts(model) == [32, 27, 22]
    tokenmerge.remove(visual)
    assert type(visual) is VisionTransformer and not tokenmerge.is_applied(visual)


def test_custom_text_clip_merges_its_visual_tower_only():
    model = make_clip({"pool_type": "avg"}, cls=CustomTextCLIP)
    visual = copy.deepcopy(model.visual)
    text = torch.randint(0, TEXT_CFG["vocab_size"], (3, TEXT_CFG["context_length"]))
    x = torch.randn(2, 3, IMAGE, IMAGE)
    text_classes = {name: type(m) for name, m in model.text.named_modules()}
    with torch.no_grad():
        expected_text = model.encode_text(text)
        tokenmerge.apply(model, r=4)
        tokenmerge.apply(visual, r=4)
        assert torch.equal(model.encode_image(x), visual(x))
        assert torch.equal(model.encode_text(text), expected_text)
    assert {name: type(m) for name, m in model.text.named_modules()} == text_classes
    assert tokenmerge.get_state(model).size.shape[1] == 37 - 3 * 4


def test_token_outputs_are_the_merged_tokens():
    """output_tokens=True and pool_type='none' give the merged tokens: fewer than the
    patches, with their sizes in the state."""
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with_tokens = make_clip({"output_tokens": True})
    tokenmerge.apply(with_tokens.visual, r=4)
    no_pool = make_clip({"pool_type": "none"})
    tokenmerge.apply(no_pool, r=4)
    with torch.no_grad():
        pooled, tokens = with_tokens.visual(x)
        all_tokens = no_pool.encode_image(x)
    assert pooled.shape == (2, 32) and tokens.shape == (2, 37 - 12 - 1, 64)
    assert tokenmerge.get_state(with_tokens.visual).size[:, 1:].sum(1).flatten().tolist() == [36.0, 36.0]
    assert all_tokens.shape == (2, 37 - 12, 32)


def test_forward_intermediates_refuses_merged_grids_but_works_at_r0():
    model = make_clip()
    x = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = model.forward_intermediates(x, image_indices=2)
        tokenmerge.apply(model, r=0)
        actual = model.forward_intermediates(x, image_indices=2)
        tokenmerge.apply(model, r=4)
        with pytest.raises(NotImplementedError, match="forward_intermediates"):
            model.forward_intermediates(x, image_indices=2)
    assert torch.equal(actual["image_features"], expected["image_features"])
    assert all(torch.equal(a, e) for a, e in zip(actual["image_intermediates"], expected["image_intermediates"]))


def test_attention_masks_and_cross_attention_are_refused_while_merging():
    model = make_clip()
    tokenmerge.apply(model, r=4)
    tokens = torch.randn(1, 37, 64)
    block = model.visual.transformer.resblocks[0]
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="attn_mask"):
            model.visual.transformer(tokens, attn_mask=torch.zeros(37, 37))
        with pytest.raises(NotImplementedError, match="cross attention"):
            block(tokens, tokens, tokens)
        tokenmerge.apply(model, r=0)
        expected = type(block)._tokenmerge_original.forward(block, tokens, attn_mask=torch.zeros(37, 37))
        assert torch.equal(block(tokens, attn_mask=torch.zeros(37, 37)), expected)


def test_gradients_flow_through_merged_blocks_in_training():
    reference = make_clip({"ls_init_value": 0.5, "attentional_pool": True, **ATTENTION_POOL}).train()
    merged = copy.deepcopy(reference)
    tokenmerge.apply(merged, r=6)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    text = torch.randint(0, TEXT_CFG["vocab_size"], (2, TEXT_CFG["context_length"]))
    for model in (reference, merged):
        image_logits, _ = model.get_logits(images, text)
        image_logits.logsumexp(-1).sum().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), merged.named_parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
    assert merged.visual.conv1.weight.grad.abs().sum() > 0
    assert merged.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_clip({"ls_init_value": 0.5, "pool_type": "avg"})
    tokenmerge.apply(model, r=5)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    losses = []
    for m in (model, checkpointed):
        loss = m.encode_image(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, p), (_, q) in zip(model.named_parameters(), checkpointed.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_patch_dropout_in_training_merges_the_kept_tokens():
    """Patch dropout keeps half the patches in training: blocks merge among those and
    sizes sum to them; in evaluation nothing is dropped and counts follow the schedule."""
    model = make_clip({"patch_dropout": 0.5, "pool_type": "avg"}).train()
    tokenmerge.apply(model, r=3, trace_source=True)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    counts, hooks = block_output_counts(model)
    model.encode_image(x).sum().backward()
    state = tokenmerge.get_state(model)
    kept = 1 + 36 // 2
    assert state.num_input_tokens == kept and counts == [kept - 3, kept - 6, kept - 9]
    assert torch.equal(state.size.sum(1).flatten(), torch.full((2,), float(kept)))
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    model.eval()
    counts.clear()
    with torch.no_grad():
        model.encode_image(x)
    assert counts == tokenmerge.token_counts(model)
    for hook in hooks:
        hook.remove()


def test_bfloat16_autocast_merges_without_overflow():
    model = make_clip({"attentional_pool": True, **ATTENTION_POOL})
    tokenmerge.apply(model, r=6)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = model.encode_image(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model.encode_image(x)
    assert tokenmerge.get_state(model).size.dtype == torch.float32
    assert torch.isfinite(actual).all()
    assert torch.nn.functional.cosine_similarity(actual.float(), expected).min() > 0.95


def test_patched_model_pickles_and_stays_patched():
    model = make_clip({"pool_type": "avg"})
    tokenmerge.apply(model, r=6)
    x = torch.randn(1, 3, IMAGE, IMAGE)
    copy_ = pickle.loads(pickle.dumps(model))
    assert tokenmerge.get_state(copy_).r == 6 and tokenmerge.get_state(copy_) is copy_.visual._tokenmerge_state
    with torch.no_grad():
        assert torch.equal(copy_.encode_image(x), model.encode_image(x))
    tokenmerge.remove(copy_)
    assert type(copy_.visual) is VisionTransformer


def test_other_image_sizes_are_refused():
    model = make_clip()
    assert tokenmerge.token_counts(model, r=2, img_size=(IMAGE, IMAGE)) == [35, 33, 31]
    with pytest.raises(ValueError, match="48x48"):
        tokenmerge.token_counts(model, r=2, img_size=(64, 64))


def _replace_block(model, block):
    model.visual.transformer.resblocks[1] = block
    return model


def _mismatched_layout(model):
    model.visual.transformer.resblocks[1].attn.batch_first = False
    return model


def _replace_pooler(model):
    model.visual.attn_pool = torch.nn.Identity()
    return model


def _class_token_dropout(model):
    model.visual.patch_dropout = PatchDropout(0.5, exclude_first_token=False)
    return model


def _layer_norm_replaced(model):
    model.visual.transformer.resblocks[0].ln_2 = torch.nn.BatchNorm1d(64)
    return model


def _build_coca():
    vision = CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32, attentional_pool=True,
                           output_tokens=True, **ATTENTION_POOL)
    return CoCa(32, MultimodalCfg(width=32, heads=2, layers=1, context_length=16, vocab_size=100),
                CLIPTextCfg(**TEXT_CFG), vision)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: make_clip({"layers": (1, 1, 1, 1), "width": 16, "image_size": 64}), "ModifiedResNet"),
        (lambda: make_clip({"timm_model_name": "resnet18", "timm_pool": "abs_attn", "image_size": 64}),
         "AttentionPool2d"),
        (lambda: make_clip({"timm_model_name": "resnet18", "timm_pool": "avg", "image_size": 64}), "ResNet"),
        (lambda: make_clip({"qk_norm": True}), "CustomResidualAttentionBlock"),
        (lambda: make_clip({"scale_attn": True}), "CustomResidualAttentionBlock"),
        (lambda: make_clip({"scale_fc": True}).visual, "CustomResidualAttentionBlock"),
        (_build_coca, "CoCa"),
        (lambda: make_clip().transformer, "Transformer"),
        (lambda: _replace_block(make_clip(), ResidualAttentionBlock(64, 4, is_cross_attention=True)), "ln_1_kv"),
        (lambda: _replace_pooler(make_clip({"attentional_pool": True, **ATTENTION_POOL})), "Identity"),
        (lambda: _replace_block(make_clip(), torch.nn.Identity()), "Identity"),
    ],
    ids=["resnet", "timm_attention_pool", "timm_resnet", "qk_norm", "scale_attn", "scale_fc", "coca",
         "text_transformer", "cross_attention",
         "pooler", "block"],
)
def test_unsupported_models_are_refused_by_name(build, message):
    model = build()
    with pytest.raises(TypeError, match=message) as info:
        tokenmerge.apply(model, r=4)
    assert "Supported" in str(info.value)
    assert not tokenmerge.is_applied(model)


@pytest.mark.parametrize(
    "build, message",
    [
        (_mismatched_layout, "batch_first=False"),
        (_class_token_dropout, "exclude_first_token=False"),
        (_layer_norm_replaced, "BatchNorm1d"),
    ],
    ids=["layout", "patch_dropout", "norm"],
)
def test_unsupported_features_are_refused_by_name(build, message):
    model = build(make_clip())
    with pytest.raises(TypeError, match=message):
        tokenmerge.apply(model, r=4)
    assert type(model.visual) is VisionTransformer


@pytest.mark.parametrize(
    "vision",
    [{}, {"pool_type": "avg", "ls_init_value": 0.5}, {"attentional_pool": True, **ATTENTION_POOL}],
    ids=["tok", "avg", "attentional_pool"],
)
@pytest.mark.parametrize("r", [0, 8])
def test_analytic_flops_agree_with_the_counter(vision, r):
    model = make_clip({"image_size": 64, **vision}, layers=4)
    tokenmerge.apply(model, r=r)
    counted = count_flops(model, torch.randn(1, 3, 64, 64))
    estimated = tokenmerge.flops_per_image(model)
    assert estimated == counted


def test_full_size_vit_b_32_applies_and_removes():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.encode_image(x)
        tokenmerge.apply(model, r=0)
        assert torch.equal(model.encode_image(x), expected)
        tokenmerge.apply(model, r=3)
        model.encode_image(x)
        assert tokenmerge.get_state(model).size.shape[1] == 50 - 12 * 3 == tokenmerge.token_counts(model)[-1]
        tokenmerge.remove(model)
        assert torch.equal(model.encode_image(x), expected)
