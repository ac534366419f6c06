"""timm integration: exactness, invariants, gradients, restore, errors (random weights)."""
import copy
import warnings

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

import tokenmerge
from tests.adapters.invariants import assert_sizes_and_sources_agree
from tokenmerge.adapters import find_adapter
from tokenmerge.merge import unmerge

# (id, model name, create_model kwargs, input size)
VARIANTS = [
    ("vit_tiny", "vit_tiny_patch16_224", {}, (224, 224)),
    ("vit_small", "vit_small_patch16_224", {}, (224, 224)),
    ("vit_base", "vit_base_patch16_224", {}, (224, 224)),
    ("layerscale_deit3", "deit3_small_patch16_224", {}, (224, 224)),
    ("dinov2", "vit_small_patch14_dinov2", {"img_size": 224}, (224, 224)),
    ("dinov2_registers", "vit_small_patch14_reg4_dinov2", {"img_size": 224}, (224, 224)),
    ("registers_gap", "vit_medium_patch16_reg4_gap_256", {}, (256, 256)),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", {}, (224, 224)),
    ("qk_norm", "vit_tiny_patch16_224", {"qk_norm": True}, (224, 224)),
    ("scale_norms", "vit_tiny_patch16_224", {"scale_attn_norm": True, "scale_mlp_norm": True}, (224, 224)),
    ("gated_attention", "vit_tiny_patch16_224", {"gated": True}, (224, 224)),
    ("avg_pool", "vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}, (224, 224)),
    ("avgmax_pool", "vit_tiny_patch16_224", {"global_pool": "avgmax"}, (224, 224)),
    ("map_pool", "vit_tiny_patch16_224", {"global_pool": "map", "class_token": False}, (224, 224)),
    ("img_size_160", "vit_tiny_patch16_224", {"img_size": 160}, (160, 160)),
    ("dynamic_img_size", "vit_tiny_patch16_224", {"dynamic_img_size": True}, (192, 256)),
]
IDS = [v[0] for v in VARIANTS]


def make_model(name, kwargs):
    """A randomly initialised model in eval mode, with LayerScale and norm weights far
    from their neutral init so that dropping any of them changes the outputs."""
    kwargs = dict(kwargs)
    gated = kwargs.pop("gated", False)
    model = timm.create_model(name, **kwargs).eval()
    if gated:  # timm's Attention supports a sigmoid output gate; no registered model uses it yet
        for block in model.blocks:
            block.attn.gate = torch.nn.Linear(model.embed_dim, block.attn.attn_dim)
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if "gamma" in module_name or "norm" in module_name and module_name.endswith("weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def variant(request):
    _, name, kwargs, size = request.param
    torch.manual_seed(0)
    return make_model(name, kwargs), size


def test_r0_matches_unpatched_model(variant):
    model, size = variant
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = model(x)
        tokenmerge.apply(model, r=0)
        try:
            actual = model(x)
        finally:
            tokenmerge.remove(model)
        restored = model(x)
    # Blocks that merge nothing run their own forward, so r=0 is bitwise exact.
    assert torch.equal(actual, expected)
    assert torch.equal(restored, expected)


def paired_input(model, size, batch=2):
    """Images whose patch columns come in identical pairs (2j, 2j+1), for a model whose
    position embedding is made to repeat the same way: every patch token then has an
    exact twin, the one it is matched with in the alternate A/B split."""
    patch = model.patch_embed.patch_size[0]
    grid_w = size[1] // patch
    x = torch.randn(batch, 3, *size)
    for j in range(0, grid_w, 2):
        x[..., (j + 1) * patch:(j + 2) * patch] = x[..., j * patch:(j + 1) * patch]
    if model.pos_embed is not None:
        offset = 0 if model.no_embed_class else model.num_prefix_tokens
        with torch.no_grad():
            grid = model.pos_embed[:, offset:].view(1, -1, model.embed_dim)
            pos = model.patch_embed.grid_size
            grid = grid.view(1, pos[0], pos[1], -1)
            grid[:, :, 1::2] = grid[:, :, 0::2]
    return x


@pytest.mark.parametrize("fraction", [2, 4])
def test_merging_exact_twins_changes_nothing(variant, fraction):
    """Merged with proportional attention, two identical tokens behave like one of
    size 2: a model whose first block merges only exact twins must reproduce the
    unmerged outputs. This fails for any patch that skips part of a block (LayerScale,
    q/k-norm, scale norms) or mishandles sizes in attention or pooling."""
    model, size = variant
    model = copy.deepcopy(model)
    x = paired_input(model, size)
    num_tokens, num_protected = find_adapter(model).token_layout(model, size)
    num_patches = num_tokens - num_protected
    r = [num_patches // fraction] + [0] * (len(model.blocks) - 1)
    with torch.no_grad():
        expected = model(x)
        tokenmerge.apply(model, r=r, trace_source=True)
        actual = model(x)
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


def test_token_counts_are_fixed_per_block_for_any_content(variant):
    model, size = variant
    model = copy.deepcopy(model)
    tokenmerge.apply(model, r=5)
    counts = []
    hooks = [block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for block in model.blocks]
    with torch.no_grad():
        for x in [torch.zeros(2, 3, *size), torch.randn(3, 3, *size), torch.rand(1, 3, *size) * 10]:
            counts.clear()
            model(x)
            assert counts == tokenmerge.token_counts(model, img_size=size)
    for hook in hooks:
        hook.remove()
    assert counts[-1] == counts[0] - 5 * (len(counts) - 1)


def test_sizes_sum_to_token_count_and_protected_tokens_are_never_merged(variant):
    model, size = variant
    model = copy.deepcopy(model)
    tokenmerge.apply(model, r=9, trace_source=True)
    with torch.no_grad():
        model(torch.randn(3, 3, *size))
    state = tokenmerge.get_state(model)
    num_tokens, p = state.num_input_tokens, state.num_protected
    assert p == model.num_prefix_tokens
    assert_sizes_and_sources_agree(state, num_tokens, 3)


def test_pooling_sees_sizes(variant):
    """Pooling merged tokens equals pooling them spread back over their patches: the
    size-weighted mean for avg, the log-size bias for attention pooling."""
    model, size = variant
    model = copy.deepcopy(model)
    tokenmerge.apply(model, r=8, trace_source=True)
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, *size))
        pooled = model.forward_head(features, pre_logits=True)
        spread = unmerge(features, tokenmerge.get_state(model).source)
        original_head = type(model)._tokenmerge_original.forward_head
        expected = original_head(model, spread, pre_logits=True)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_an_image_gives_the_same_output_alone_and_in_a_batch(variant):
    model, size = variant
    model = copy.deepcopy(model)
    tokenmerge.apply(model, r=8)
    x = torch.randn(4, 3, *size)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_forward_features_and_head_compose_to_forward():
    model = make_model("vit_tiny_patch16_224", {"global_pool": "avg"})
    tokenmerge.apply(model, r=8)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))


def test_forward_intermediates_refuses_merged_grids_but_works_at_r0():
    model = make_model("vit_tiny_patch16_224", {})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=2)
        tokenmerge.apply(model, r=0)
        actual = model.forward_intermediates(x, indices=2)
        tokenmerge.apply(model, r=4)
        with pytest.raises(NotImplementedError, match="forward_intermediates"):
            model.forward_intermediates(x, indices=2)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=0)


def test_gradients_flow_through_merged_blocks_in_training():
    torch.manual_seed(0)
    reference = make_model("deit3_small_patch16_224", {"drop_path_rate": 0.1}).train()
    merged = copy.deepcopy(reference)
    tokenmerge.apply(merged, r=12)
    x = torch.randn(2, 3, 224, 224)
    for model in (reference, merged):
        model(x).logsumexp(-1).sum().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), merged.named_parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
    assert merged.patch_embed.proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model("vit_tiny_patch16_224", {})
    tokenmerge.apply(model, r=10)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 224, 224)
    losses = []
    for m in (model, checkpointed):
        loss = m(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, p), (_, q) in zip(model.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_too_large_r_is_capped_with_one_warning():
    model = make_model("vit_tiny_patch16_224", {})
    tokenmerge.apply(model, r=60)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(1, 3, 224, 224))
        model(torch.randn(1, 3, 224, 224))
    messages = [str(w.message) for w in caught if issubclass(w.category, tokenmerge.CappedRWarning)]
    # 197 tokens: 60 in blocks 0 and 1, then half of the mergeable ones left (a class token protected)
    assert messages == ["r=60 is more than blocks 2-11 can merge (1 protected token, at most half of the others per "
                        "block); they merge 60/60/38/19/9/5/2/1/1/0/0/0 instead, leaving 2 tokens. Lower r to "
                        "silence this warning."]
    assert tokenmerge.get_state(model).size.shape[1] == tokenmerge.token_counts(model)[-1] == 2


@pytest.mark.parametrize(
    "r, error, message",
    [(-3, ValueError, ">= 0"), (1.5, TypeError, "must be an int"), ("big", TypeError, "must be an int"),
     ([2] * 13, ValueError, "12 blocks"), ({"r": 8}, TypeError, "must be an int")],
)
def test_bad_r_is_a_clear_error_and_leaves_the_model_alone(r, error, message):
    model = make_model("vit_tiny_patch16_224", {})
    with pytest.raises(error, match=message):
        tokenmerge.apply(model, r=r)
    assert not tokenmerge.is_applied(model) and type(model) is VisionTransformer


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: timm.create_model("resnet10t"), "ResNet"),
        (lambda: timm.create_model("beit_base_patch16_224", depth=1, embed_dim=64, num_heads=2), "Beit"),
        (lambda: VisionTransformer(depth=2, embed_dim=64, num_heads=2, block_fn=ResPostBlock), "ResPostBlock"),
        (lambda: timm.create_model("vit_tiny_patch16_224", global_pool="prr"), "AttentionPoolPrr"),
        (lambda: torch.nn.Linear(3, 3), "Linear"),
    ],
)
def test_unsupported_models_are_refused_by_name(build, name):
    with pytest.raises(TypeError, match=name) as info:
        tokenmerge.apply(build(), r=4)
    assert "Supported" in str(info.value)


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tokenmerge.apply("vit_tiny_patch16_224", r=4)


def test_bfloat16_autocast_merges_without_overflow():
    model = make_model("vit_tiny_patch16_224", {"global_pool": "avg"})
    tokenmerge.apply(model, r=12)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(x)
    assert tokenmerge.get_state(model).size.dtype == torch.float32
    assert torch.isfinite(actual).all()
    assert torch.nn.functional.cosine_similarity(actual.float(), expected).min() > 0.95


def test_forward_head_pools_the_features_it_is_given_with_their_own_sizes():
    """forward_features(A), forward_features(B), forward_head(A): A is pooled with A's
    sizes, also when the batches differ in size."""
    model = make_model("vit_tiny_patch16_224", {"global_pool": "avg"})
    tokenmerge.apply(model, r=13)
    a, b = torch.randn(2, 3, 224, 224), torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = model(a)
        features_a = model.forward_features(a)
        model.forward_features(b)
        assert torch.equal(model.forward_head(features_a), expected)


def test_forward_head_refuses_merged_tokens_it_cannot_know_the_sizes_of():
    model = make_model("vit_tiny_patch16_224", {"global_pool": "avg"})
    tokenmerge.apply(model, r=13)
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 224, 224))
        with pytest.raises(ValueError, match="no forward pass of this model left"):
            model.forward_head(features * 2)
        tokenmerge.apply(model, r=0)
        unmerged = model.forward_features(torch.randn(2, 3, 224, 224))
        tokenmerge.apply(model, r=13)
        model.forward_head(unmerged * 2)  # a whole grid of tokens: each stands for one patch


def test_a_copy_of_merged_features_as_many_as_a_whole_grid_is_refused_not_pooled_as_patches():
    """A 320 px pass of a dynamic-size ViT merged to 197 tokens, as many as a 224 px grid:
    a clone of its features cannot be told from an unmerged grid, so the head refuses it
    instead of pooling 197 merged tokens as single patches; the features themselves pool."""
    model = make_model("vit_tiny_patch16_224", {"dynamic_img_size": True, "global_pool": "avg"})
    tokenmerge.apply(model, r=17)  # 401 tokens at 320 px, 17 fewer in each of 12 blocks: 197
    x = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        expected = model(x)
        features = model.forward_features(x)
        assert features.shape[1] == model.patch_embed.num_patches + 1
        with pytest.raises(ValueError, match="cannot be told from an unmerged grid"):
            model.forward_head(features.clone())
        assert torch.equal(model.forward_head(features), expected)


def test_blocks_run_directly_protect_the_class_token_and_merge_like_forward_features():
    model = make_model("vit_tiny_patch16_224", {})
    tokenmerge.apply(model, r=13, trace_source=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_features(x)
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        out = model.norm(model.blocks(tokens))
    state = tokenmerge.get_state(model)
    assert torch.equal(out, expected)
    assert torch.equal(state.source[:, 0], torch.zeros(2, dtype=torch.long)) and (state.source[:, 1:] > 0).all()


def test_each_thread_reads_the_sizes_of_its_own_last_pass():
    import threading

    model = make_model("vit_tiny_patch16_224", {})
    tokenmerge.apply(model, r=13)
    seen = {}

    def call(batch):
        with torch.no_grad():
            model(torch.randn(batch, 3, 224, 224))
        seen[batch] = tokenmerge.get_state(model).size.shape

    thread = threading.Thread(target=call, args=(3,))
    thread.start()
    thread.join()
    call(2)
    assert seen == {3: (3, 41, 1), 2: (2, 41, 1)}


def test_reentrant_gradient_checkpointing_is_refused_with_what_to_use():
    """Reentrant checkpointing recomputes blocks from detached copies of their tokens,
    whose pass cannot be found: a clear error rather than merging them afresh."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    model = make_model("vit_tiny_patch16_224", {}).train()
    model.set_grad_checkpointing(True)
    tokenmerge.apply(model, r=8)
    previous = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        out = model(torch.randn(2, 3, 224, 224, requires_grad=True))
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            out.sum().backward()
    finally:
        set_reentrant_ckpt(previous)
