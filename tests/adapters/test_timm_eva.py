"""timm Eva (EVA-02, DINOv3, RoPE-ViT, the Perception Encoder): registered configurations
at small depth and image size, rotary positions that follow the merges, exact twins,
dense features, patch dropout and refusals (random weights)."""
import copy

import pytest
import timm
import torch
from timm.models.eva import Eva, EvaBlock

import tokenmerge
from tests.adapters.test_timm import make_model, paired_input
from tokenmerge import rope
from tokenmerge.adapters import find_adapter
from tokenmerge.adapters import timm as timm_adapter
from tokenmerge.adapters.timm import MergingEvaBlock
from tokenmerge.merge import unmerge

# (id, registered model, create_model kwargs): two blocks and small images, each family's own settings otherwise
VARIANTS = [
    ("eva02_rope_cat_swiglu", "eva02_tiny_patch14_224", {"img_size": 84}),
    ("dinov3_rope_registers", "vit_small_patch16_dinov3", {"img_size": 96}),
    ("dinov3_grouped_kv", "vit_small_patch16_lingbot", {"img_size": 96}),
    ("rope_mixed", "vit_small_patch16_rope_mixed_224", {"img_size": 96}),
    ("rope_gap_registers", "vit_medium_patch16_rope_reg1_gap_256", {"img_size": 96}),
    ("pe_core_map", "vit_pe_core_tiny_patch16_384", {"img_size": 96}),
    ("post_norm", "eva_giant_patch14_224", {"img_size": 56, "embed_dim": 64, "num_heads": 2}),
]
IDS = [variant[0] for variant in VARIANTS]


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def variant(request):
    _, name, kwargs = request.param
    torch.manual_seed(0)
    model = make_model(name, {"depth": 2, **kwargs})
    return model, tuple(model.patch_embed.img_size)


def images(model, size, batch=2, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, *size)


def test_r0_is_bitwise_the_unpatched_model_and_merging_keeps_counts_and_prefix_tokens(variant):
    model, size = variant
    model = copy.deepcopy(model)
    x = images(model, size)
    num_tokens, num_protected = find_adapter(model).token_layout(model)
    r = (num_tokens - num_protected) // 4
    with torch.no_grad():
        expected = model(x)
        tokenmerge.apply(model, r=0)
        assert torch.equal(model(x), expected)
        tokenmerge.apply(model, r=r, trace_source=True)
        merged = model.forward_features(x)
        state = tokenmerge.get_state(model)
        tokenmerge.remove(model)
        assert torch.equal(model(x), expected)
    assert merged.shape[1] == state.size.shape[1] == num_tokens - 2 * r
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), float(num_tokens)))
    # prefix tokens are never merged: each still stands for itself alone, first
    assert torch.equal(state.source[:, :num_protected], torch.arange(num_protected).expand(2, -1))
    assert torch.equal(state.size[:, :num_protected], torch.ones(2, num_protected, 1))


def paired(model, size, batch=2):
    """:func:`tests.adapters.test_timm.paired_input` (patch columns and position
    embedding in identical pairs), with the model's rotary tables made to repeat the
    same way: every patch token then has an exact twin, rotary angles included."""
    x = paired_input(model, size, batch)
    grid_h, grid_w = model.patch_embed.grid_size
    embed = model._pos_embed

    def paired_pos_embed(tokens):
        tokens, table = embed(tokens)
        if table is not None:
            table = table.unflatten(-2, (grid_h, grid_w)).clone()
            table[..., 1::2, :] = table[..., 0::2, :]
            table = table.flatten(-3, -2)
        return tokens, table

    model._pos_embed = paired_pos_embed
    return x


@pytest.mark.parametrize("rule", rope.RULES)
def test_merging_exact_twins_with_equal_rotary_angles_changes_nothing(variant, rule, monkeypatch):
    """Two tokens equal in features and rotary angles behave like one of size 2 under
    proportional attention, whichever position rule the merged token takes: a model
    whose first block merges only such twins reproduces the unmerged outputs."""
    model, size = variant
    if rule == "mean" and model.rope is not None and getattr(model, "rope_mixed", False):
        pytest.skip("the mean rule needs one rotary table for every block")
    monkeypatch.setattr(MergingEvaBlock, "rope_rule", rule)
    model = copy.deepcopy(model)
    x = paired(model, size)
    num_tokens, num_protected = find_adapter(model).token_layout(model)
    r = [(num_tokens - num_protected) // 2, 0]
    with torch.no_grad():
        expected = model(x)
        tokenmerge.apply(model, r=r, trace_source=True)
        actual = model(x)
        source = tokenmerge.get_state(model).source[:, num_protected:] - num_protected
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(source // 2 * 2, source - source % 2)  # every merge joined a column pair
    assert all(len(source[b].unique()) == (num_tokens - num_protected) // 2 for b in range(x.shape[0]))


def test_merged_tokens_take_the_rotary_position_of_the_token_they_joined(monkeypatch):
    """With the default rule, block 1 rotates each merged token by the rotary row of the
    B token (an odd patch) that the A tokens were folded into in block 0, read off the
    source map."""
    torch.manual_seed(0)
    model = make_model("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64})
    tokenmerge.apply(model, r=[6, 0], trace_source=True)
    tables = []
    project = timm_adapter.eva_project

    def recording(attn, x, table):
        tables.append(table)
        return project(attn, x, table)

    monkeypatch.setattr(timm_adapter, "eva_project", recording)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    prefix, full = model.num_prefix_tokens, model.rope.get_embed(shape=model.patch_embed.grid_size)
    source = tokenmerge.get_state(model).sources[1][:, prefix:] - prefix
    used = tables[1]
    assert torch.equal(tables[0], full)
    assert used.shape == (2, 1, 16 - 6, full.shape[-1])
    for b in range(2):
        for token in range(used.shape[2]):
            members = (source[b] == token).nonzero().flatten()
            odd = members[members % 2 == 1]  # a B token, with the A tokens merged into it; or a kept A token
            position = odd if len(odd) else members
            assert torch.equal(used[b, 0, token], full[position.item()])


def test_dense_features_give_every_patch_the_features_of_its_token():
    torch.manual_seed(0)
    model = make_model("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64}).eval()
    x = torch.randn(2, 3, 64, 64)
    num_tokens = find_adapter(model).token_layout(model)[0]
    tokenmerge.apply(model, r=4, trace_source=True)
    with torch.no_grad():
        merged = model.forward_features(x)
        logits = model.forward_head(merged)
        source = tokenmerge.get_state(model).source
        tokenmerge.get_state(model).dense = True
        dense = model.forward_features(x)
        dense_logits = model.forward_head(dense)
        assert torch.equal(model(x), dense_logits)
    assert dense.shape == (2, num_tokens, model.embed_dim)
    assert torch.equal(dense, unmerge(merged, source))
    # average pooling over every patch is the size-weighted average of the merged tokens
    torch.testing.assert_close(dense_logits, logits, atol=1e-5, rtol=1e-5)


def test_dense_needs_a_method_that_merges():
    model = make_model("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64})
    with pytest.raises(ValueError, match="dense=True needs a method that merges"):
        tokenmerge.apply(model, r=4, method="random", dense=True)
    assert not tokenmerge.is_applied(model)


def test_patch_dropout_in_training_merges_the_kept_patches_with_their_rotary_angles():
    torch.manual_seed(0)
    model = make_model("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64, "patch_drop_rate": 0.5}).train()
    tokenmerge.apply(model, r=2)
    out = model(torch.randn(3, 3, 64, 64))
    out.sum().backward()
    state = tokenmerge.get_state(model)
    kept = model.num_prefix_tokens + 8  # half of the 16 patches
    assert state.num_input_tokens == kept and state.size.shape == (3, kept - 4, 1)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks.1.attn"))


def test_the_mean_rule_refuses_a_rotary_table_per_block(monkeypatch):
    monkeypatch.setattr(MergingEvaBlock, "rope_rule", "mean")
    model = make_model("vit_small_patch16_rope_mixed_224", {"depth": 2, "img_size": 64})
    tokenmerge.apply(model, r=4)
    with pytest.raises(NotImplementedError, match="rope_type='mixed'"):
        model(torch.randn(1, 3, 64, 64))


def test_attention_masks_in_eva_blocks_are_refused():
    model = make_model("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64})
    tokenmerge.apply(model, r=4)
    with pytest.raises(NotImplementedError, match="attn_mask or is_causal in timm Eva blocks"):
        model(torch.randn(1, 3, 64, 64), is_causal=True)


class OtherBlock(EvaBlock):
    pass


def test_unsupported_eva_parts_are_refused_by_name():
    model = Eva(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model.blocks[1].__class__ = OtherBlock
    with pytest.raises(TypeError, match="OtherBlock"):
        tokenmerge.apply(model, r=2)
    model = Eva(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, use_rot_pos_emb=True)
    model.rope = timm.layers.RotaryEmbedding(dim=16)
    with pytest.raises(TypeError, match="RotaryEmbedding\\b"):
        tokenmerge.apply(model, r=2)


@pytest.mark.slow
def test_every_registered_eva_model_is_exact_at_r0_and_merges_to_its_token_counts():
    """timm's whole Eva registry at two blocks and 96 px (the 60 of 65 that Supported
    models in the documentation gives; the sapiens2 models take one key/value head count
    per block and cannot be built so)."""
    checked = 0
    for name in timm.list_models(module="eva"):
        try:
            model = make_model(name, {"depth": 2, "img_size": 96})
        except AssertionError:
            continue
        x = images(model, tuple(model.patch_embed.img_size))
        with torch.no_grad():
            expected = model(x)
            tokenmerge.apply(model, r=0)
            assert torch.equal(model(x), expected), name
            tokenmerge.apply(model, r=4)
            model(x)
            assert tokenmerge.get_state(model).size.shape[1] == tokenmerge.token_counts(model)[-1], name
        checked += 1
    assert checked >= 60
