"""transformers integration: exactness, invariants, attention implementations, pooling,
gradients, FLOPs, restore and refusals, on tiny random models of every supported class:
image models first, then the video (VideoMAE) and audio (AST) models."""
import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenmerge  # noqa: E402
from tests.adapters.invariants import assert_sizes_and_sources_agree  # noqa: E402
from tokenmerge import rope  # noqa: E402
from tokenmerge.adapters import find_adapter  # noqa: E402
from tokenmerge.adapters.transformers import MergingDINOv3Layer  # noqa: E402
from tokenmerge.flops import count_flops  # noqa: E402
from tokenmerge.merge import unmerge  # noqa: E402

IMAGE, PATCH = 64, 8
NUM_PATCHES = (IMAGE // PATCH) ** 2
COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
MLP = dict(intermediate_size=128)


def clip_model():
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                bos_token_id=0, eos_token_id=2)
    config = transformers.CLIPConfig(text_config=text, vision_config={**COMMON, **MLP}, projection_dim=16)
    return transformers.CLIPModel(config)


# (id, builder, number of protected tokens)
VARIANTS = [
    ("vit_model", lambda: transformers.ViTModel(transformers.ViTConfig(**COMMON, **MLP)), 1),
    ("vit_classifier", lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(**COMMON, **MLP, num_labels=7)), 1),
    ("deit_model", lambda: transformers.DeiTModel(transformers.DeiTConfig(**COMMON, **MLP)), 2),
    ("deit_classifier", lambda: transformers.DeiTForImageClassification(
        transformers.DeiTConfig(**COMMON, **MLP, num_labels=7)), 2),
    ("deit_teacher", lambda: transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**COMMON, **MLP, num_labels=7)), 2),
    ("clip_vision", lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**COMMON, **MLP)), 1),
    ("clip_vision_projection", lambda: transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**COMMON, **MLP, projection_dim=16)), 1),
    ("clip", clip_model, 1),
    ("dinov2", lambda: transformers.Dinov2Model(transformers.Dinov2Config(**COMMON, mlp_ratio=2)), 1),
    ("dinov2_swiglu_classifier", lambda: transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(**COMMON, mlp_ratio=2, use_swiglu_ffn=True, num_labels=7)), 1),
    ("dinov2_registers", lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**COMMON, mlp_ratio=2, num_register_tokens=3)), 4),
    ("dinov2_registers_classifier", lambda: transformers.Dinov2WithRegistersForImageClassification(
        transformers.Dinov2WithRegistersConfig(**COMMON, mlp_ratio=2, num_register_tokens=2, num_labels=7)), 3),
    ("siglip_head", lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**COMMON, **MLP)), 0),
    ("siglip_no_head", lambda: transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**COMMON, **MLP, vision_use_head=False)), 0),
    ("dinov3_registers", lambda: transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(**COMMON, **MLP, num_register_tokens=2)), 3),
    ("dinov3_swiglu", lambda: transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(**COMMON, **MLP, use_gated_mlp=True, layerscale_value=0.5)), 1),
]
IDS = [v[0] for v in VARIANTS]
IMPLEMENTATIONS = ["eager", "sdpa"]
MAIN_OUTPUTS = ("logits", "image_embeds", "pooler_output", "last_hidden_state")


def randomize(model):
    """Move LayerScale, norm weights and the learned tokens far from their neutral or
    zero init, so that dropping any of them, or mixing up prefix tokens, shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "lambda1" or ("norm" in name and leaf == "weight"):
                param.uniform_(0.5, 1.5)
            elif leaf in ("cls_token", "distillation_token", "register_tokens", "position_embeddings",
                          "class_embedding"):
                param.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def variant(request):
    _, build, num_protected = request.param
    torch.manual_seed(0)
    return randomize(build()).eval(), num_protected


def with_implementation(model, implementation):
    model = copy.deepcopy(model)
    model.set_attn_implementation(implementation)
    return model


def tower_of(model):
    for name in ("vit", "deit", "vision_model", "dinov2", "dinov2_with_registers"):
        if hasattr(model, name):
            return getattr(model, name)
    return model


def forward(model, images, **kwargs):
    """The model's output for ``images``, with the hidden states of its vision tower."""
    if isinstance(model, transformers.CLIPModel):
        return model.get_image_features(pixel_values=images, output_hidden_states=True, **kwargs)
    return model(pixel_values=images, output_hidden_states=True, **kwargs)


def run(model, images, **kwargs):
    """The model's main output for ``images`` and the hidden states of its vision tower."""
    out = forward(model, images, **kwargs)
    main = next(getattr(out, name) for name in MAIN_OUTPUTS if getattr(out, name, None) is not None)
    return main, out.hidden_states


def is_pooled(main):
    return main.dim() == 2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_r0_matches_unpatched_model_and_remove_restores_it(variant, implementation):
    model = with_implementation(variant[0], implementation)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected, expected_hidden = run(model, x)
        tokenmerge.apply(model, r=0)
        actual, actual_hidden = run(model, x)
        tokenmerge.remove(model)
        restored, _ = run(model, x)
    # Layers that merge nothing run their own forward, so r=0 is bitwise exact.
    assert torch.equal(actual, expected)
    assert all(torch.equal(a, e) for a, e in zip(actual_hidden, expected_hidden))
    assert torch.equal(restored, expected)


def paired_columns(x, width, dim=-1):
    """``x`` with its blocks of ``width`` along ``dim`` copied from block 2j to block 2j+1."""
    blocks = x.unflatten(dim, (-1, 2, width)).clone()
    dim = dim % x.dim()
    blocks.select(dim + 1, 1).copy_(blocks.select(dim + 1, 0))
    return blocks.flatten(dim, dim + 2)


def pair_rotary_columns(model, columns):
    """Make a DINOv3 model's rotary embedding give the patches of every column pair
    (2j, 2j+1) of its ``columns``-wide grid the same angles."""
    embedding = model.rope_embeddings
    forward = embedding.forward
    embedding.forward = lambda pixel_values: tuple(
        paired_columns(table.unflatten(0, (-1, columns)), 1, dim=1).flatten(0, 1) for table in forward(pixel_values))


def twin_input(model, batch=2):
    """Images whose patch columns come in identical pairs (2j, 2j+1), for a model whose
    patch position embeddings (or rotary angles) are made to repeat the same way: every
    patch token then has an exact twin, the one it is matched with in the alternate A/B
    split."""
    x = paired_columns(torch.randn(batch, 3, IMAGE, IMAGE), PATCH)
    if isinstance(model, transformers.DINOv3ViTModel):
        pair_rotary_columns(model, IMAGE // PATCH)
        return x
    embeddings = tower_of(model).embeddings
    if hasattr(embeddings, "position_embeddings"):  # ViT, DeiT, DINOv2: (1, prefix + patches, C)
        table = embeddings.position_embeddings[0, 2 if hasattr(embeddings, "distillation_token") else 1:]
    else:  # CLIP, SigLIP: an nn.Embedding, with the class position first in CLIP
        table = embeddings.position_embedding.weight[1 if hasattr(embeddings, "class_embedding") else 0:]
    with torch.no_grad():
        grid = table.view(IMAGE // PATCH, IMAGE // PATCH, -1)
        grid[:, 1::2] = grid[:, 0::2]
    return x


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_merging_exact_twins_changes_nothing_with_proportional_attention_only(variant, implementation):
    """Merged with proportional attention, two identical tokens behave like one of size
    2: a model whose first layer merges only exact twins must reproduce the unmerged
    outputs, pooled and token by token. This fails if the log-size bias does not reach
    the keys under this attention implementation, if a part of a layer is skipped, or if
    pooling ignores sizes; and without proportional attention the outputs must change.
    A quarter of the patches merge, so that sizes differ (equal sizes would leave
    attention unchanged)."""
    model, num_protected = variant
    model = with_implementation(model, implementation)
    x = twin_input(model)
    r = [NUM_PATCHES // 4, 0, 0]
    with torch.no_grad():
        expected, expected_hidden = run(model, x)
        tokenmerge.apply(model, r=r, trace_source=True)
        actual, actual_hidden = run(model, x)
        state = tokenmerge.get_state(model)
        spread = unmerge(actual_hidden[-1], state.source)
        state.prop_attn = False
        _, plain_hidden = run(model, x)
    assert state.size.shape[1] == NUM_PATCHES + num_protected - r[0]
    if is_pooled(expected):
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(spread, expected_hidden[-1], atol=2e-5, rtol=1e-5)
    assert (unmerge(plain_hidden[-1], state.source) - expected_hidden[-1]).abs().max() > 1e-3
    # and every merge joined two twins: sources in the same column pair of the same row
    source = state.source[:, num_protected:] - num_protected
    patch_index = torch.arange(NUM_PATCHES)
    for b in range(x.shape[0]):
        for token in source[b].unique():
            members = patch_index[source[b] == token]
            assert len(members) <= 2 and (members // 2).unique().numel() == 1
    assert (state.size == 2).sum() == x.shape[0] * r[0]


def test_eager_and_sdpa_merge_alike(variant):
    model = variant[0]
    x = torch.randn(2, 3, IMAGE, IMAGE)
    outputs = []
    for implementation in IMPLEMENTATIONS:
        merged = tokenmerge.apply(with_implementation(model, implementation), r=8)
        with torch.no_grad():
            outputs.append(run(merged, x))
    (eager, eager_hidden), (sdpa, sdpa_hidden) = outputs
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager_hidden[-1], sdpa_hidden[-1], atol=1e-5, rtol=1e-5)


def test_hidden_states_and_attentions_follow_the_token_counts(variant):
    model, num_protected = variant
    model = tokenmerge.apply(with_implementation(model, "eager"), r=5)
    counts = [NUM_PATCHES + num_protected] + tokenmerge.token_counts(model)
    assert counts[-1] == counts[0] - 15
    for x in [torch.zeros(2, 3, IMAGE, IMAGE), torch.randn(3, 3, IMAGE, IMAGE)]:
        with torch.no_grad():
            out = forward(model, x, output_attentions=True)
        assert [h.shape[1] for h in out.hidden_states] == counts
        assert [a.shape for a in out.attentions] == [(x.shape[0], 4, n, n) for n in counts[:-1]]


def test_sizes_sum_to_token_count_and_protected_tokens_are_never_merged(variant):
    model, p = variant
    model = tokenmerge.apply(copy.deepcopy(model), r=9, trace_source=True)
    state = tokenmerge.get_state(model)
    assert state.num_protected == p  # known from the model, before any pass
    with torch.no_grad():
        run(model, torch.randn(3, 3, IMAGE, IMAGE))
    assert (state.num_protected, state.num_input_tokens) == (p, NUM_PATCHES + p)
    assert state.size.shape[1] == NUM_PATCHES + p - 27
    assert_sizes_and_sources_agree(state, NUM_PATCHES + p, 3)


def test_an_image_gives_the_same_output_alone_and_in_a_batch(variant):
    model = tokenmerge.apply(copy.deepcopy(variant[0]), r=8)
    x = torch.randn(4, 3, IMAGE, IMAGE)
    with torch.no_grad():
        batched = run(model, x)[0]
        alone = torch.cat([run(model, x[i:i + 1])[0] for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_merged_layers_in_training(variant):
    reference = copy.deepcopy(variant[0]).train()
    merged = tokenmerge.apply(copy.deepcopy(reference), r=8)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    for model in (reference, merged):
        run(model, x)[0].square().mean().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), merged.named_parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in tower_of(merged).get_input_embeddings().parameters())


@pytest.mark.parametrize("name", ["vit_classifier", "dinov2_registers_classifier"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    build = dict((v[0], v[1]) for v in VARIANTS)[name]
    model = tokenmerge.apply(randomize(build()).train(), r=10)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    for m in (model, checkpointed):
        m(pixel_values=x).logits.square().mean().backward()
    for (param_name, p), (_, q) in zip(model.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=param_name)


class MainOutput(torch.nn.Module):
    """A model's main output as a function of its inputs alone (``call(model, x)[0]``),
    for the FLOP counter and export: CLIPModel's forward needs text, VideoMAE's and
    AST's inputs are no images."""

    def __init__(self, model, call=None):
        super().__init__()
        self.model, self.call = model, call or run

    def forward(self, x):
        return self.call(self.model, x)[0]


@pytest.mark.parametrize("r", [0, 8])
def test_analytic_flops_equal_the_counter(variant, r):
    """Every matrix product is modelled, SigLIP's attention-pooling head included."""
    model = tokenmerge.apply(copy.deepcopy(variant[0]), r=r)
    counted = count_flops(MainOutput(model), torch.randn(1, 3, IMAGE, IMAGE))
    assert tokenmerge.flops_per_image(model) == counted


def test_flop_shape_counts_every_head():
    model = randomize(VARIANTS[IDS.index("deit_teacher")][1]())
    shape = find_adapter(model).flop_shape(model)
    assert shape.head == 2 * (2 * 64 * 7)
    assert shape.stem == NUM_PATCHES * 2 * 3 * PATCH * PATCH * 64
    assert shape.attention_linear == (4 * 2 * 64 * 64,) * 3 and shape.mlp_linear == (2 * 2 * 64 * 128,) * 3


def test_attention_pooling_and_patch_means_weigh_tokens_by_size():
    """SigLIP's attention-pooling head and DINOv2's patch mean on merged tokens equal
    the unpatched head on the tokens spread back over their patches."""
    x = torch.randn(2, 3, IMAGE, IMAGE)
    siglip = tokenmerge.apply(randomize(VARIANTS[IDS.index("siglip_head")][1]()).eval(), r=8, trace_source=True)
    with torch.no_grad():
        out = siglip(pixel_values=x)
        spread = unmerge(out.last_hidden_state, tokenmerge.get_state(siglip).source)
        head = transformers.models.siglip.modeling_siglip.SiglipMultiheadAttentionPoolingHead
        torch.testing.assert_close(out.pooler_output, head.forward(siglip.head, spread), atol=1e-5, rtol=1e-5)
    dino = randomize(VARIANTS[IDS.index("dinov2_registers_classifier")][1]()).eval()
    tokenmerge.apply(dino, r=8, trace_source=True)
    with torch.no_grad():
        out = dino(pixel_values=x, output_hidden_states=True)
        state = tokenmerge.get_state(dino)
        tokens = dino.dinov2_with_registers.layernorm(out.hidden_states[-1])
        spread = unmerge(tokens, state.source)
        expected = dino.classifier(torch.cat([spread[:, 0], spread[:, 3:].mean(1)], dim=1))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


def test_attention_pooling_head_without_proportional_attention_is_unpatched():
    siglip = randomize(VARIANTS[IDS.index("siglip_head")][1]()).eval()
    tokenmerge.apply(siglip, r=8, prop_attn=False)
    with torch.no_grad():
        out = siglip(pixel_values=torch.randn(2, 3, IMAGE, IMAGE))
        head = transformers.models.siglip.modeling_siglip.SiglipMultiheadAttentionPoolingHead
        assert torch.equal(out.pooler_output, head.forward(siglip.head, out.last_hidden_state))
        tokenmerge.get_state(siglip).prop_attn = True
        with pytest.raises(ValueError, match="head got 5 tokens"):
            siglip.head(torch.randn(2, 5, 64))


def test_clip_model_merges_its_vision_tower_only():
    model = randomize(clip_model()).eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    input_ids = torch.randint(0, 99, (3, 6))
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=x)
        text_classes = {name: type(m) for name, m in model.text_model.named_modules()}
        tokenmerge.apply(model, r=8)
        assert {name: type(m) for name, m in model.text_model.named_modules()} == text_classes
        merged = model(input_ids=input_ids, pixel_values=x, output_hidden_states=True)
        features = model.get_image_features(pixel_values=x).pooler_output
    assert torch.equal(merged.text_embeds, expected.text_embeds)
    torch.testing.assert_close(merged.image_embeds, features / features.norm(dim=-1, keepdim=True))
    assert merged.vision_model_output.last_hidden_state.shape[1] == tokenmerge.token_counts(model)[-1]
    assert merged.text_model_output.hidden_states[-1].shape[1] == 6
    assert not torch.allclose(merged.logits_per_image, expected.logits_per_image)


def test_remove_restores_classes_state_and_attributes(variant):
    model = copy.deepcopy(variant[0])
    classes = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    tokenmerge.apply(model, r=8)
    assert model.state_dict().keys() == state.keys()
    assert sum(type(m) is not classes[name] for name, m in model.named_modules()) >= 2 * 3  # layers, attentions
    tokenmerge.remove(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not tokenmerge.is_applied(model)


def test_a_part_of_a_patched_model_is_refused():
    model = randomize(VARIANTS[1][1]())
    tokenmerge.apply(model, r=4)
    with pytest.raises(TypeError, match="already applied to part"):
        tokenmerge.apply(model.vit, r=4)


def test_interpolated_position_encoding_gives_the_token_counts_of_its_image_size():
    model = tokenmerge.apply(randomize(VARIANTS[1][1]()).eval(), r=6)
    size = (48, 80)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, *size), interpolate_pos_encoding=True, output_hidden_states=True)
    counts = tokenmerge.token_counts(model, img_size=size)
    assert [h.shape[1] for h in out.hidden_states[1:]] == counts and counts[0] == 6 * 10 + 1 - 6


def test_an_attention_mask_is_refused_while_merging_but_kept_at_r0():
    model = randomize(VARIANTS[0][1]()).eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    mask = torch.ones(2, 65, dtype=torch.long)
    mask[:, -5:] = 0
    with torch.no_grad():
        expected = model(pixel_values=x, attention_mask=mask).last_hidden_state
        tokenmerge.apply(model, r=0)
        assert torch.equal(model(pixel_values=x, attention_mask=mask).last_hidden_state, expected)
        tokenmerge.apply(model, r=4)
        with pytest.raises(NotImplementedError, match="attention_mask"):
            model(pixel_values=x, attention_mask=mask)


def test_other_attention_implementations_are_refused():
    """Flash and flex attention take no additive float mask for the log-size bias.
    (Only the configuration is set: neither runs here, and neither is reached.)"""
    model = randomize(VARIANTS[1][1]()).eval()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="eager or sdpa, got 'flash_attention_2'"):
        tokenmerge.apply(model, r=4)
    model.config._attn_implementation = "sdpa"
    tokenmerge.apply(model, r=4)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="eager or sdpa, got 'flex_attention'"):
        model.vit.layers[0](torch.randn(1, 65, 64))


class Generic(transformers.PreTrainedModel):
    config_class = transformers.ViTConfig

    def __init__(self, config):
        super().__init__(config)
        self.linear = torch.nn.Linear(3, 3)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: transformers.BeitModel(transformers.BeitConfig(**COMMON, **MLP)), "BeitModel"),
        (lambda: transformers.SwinModel(transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)), "SwinModel"),
        (lambda: transformers.ViTMAEModel(transformers.ViTMAEConfig(**COMMON, **MLP)), "ViTMAEModel"),
        (lambda: transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**COMMON, **MLP, encoder_stride=8)),
         "ViTForMaskedImageModeling"),
        (lambda: transformers.Dinov2Backbone(transformers.Dinov2Config(**COMMON, mlp_ratio=2)), "Dinov2Backbone"),
        (lambda: transformers.CLIPForImageClassification(transformers.CLIPConfig(
            vision_config={**COMMON, **MLP}, num_labels=3)), "CLIPForImageClassification"),
        (lambda: clip_model().text_model, "CLIPTextModel"),
        (lambda: Generic(transformers.ViTConfig(**COMMON)), "Generic"),
        (lambda: transformers.DINOv3ViTBackbone(transformers.DINOv3ViTConfig(**COMMON, **MLP)), "DINOv3ViTBackbone"),
        (lambda: transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**COMMON, **MLP, **VIDEO)),
         "VideoMAEForPreTraining"),
    ],
)
def test_unsupported_models_are_refused_by_name(build, name):
    model = build()
    with pytest.raises(TypeError, match=name) as info:
        tokenmerge.apply(model, r=4)
    assert "Supported" in str(info.value) and "Dinov2Model" in str(info.value)
    assert not tokenmerge.is_applied(model)


def test_patched_model_pickles_and_stays_patched():
    model = tokenmerge.apply(randomize(VARIANTS[IDS.index("dinov2_swiglu_classifier")][1]()).eval(), r=8)
    x = torch.randn(1, 3, IMAGE, IMAGE)
    copy_ = pickle.loads(pickle.dumps(model))
    assert tokenmerge.get_state(copy_).r == 8
    with torch.no_grad():
        assert torch.equal(copy_(pixel_values=x).logits, model(pixel_values=x).logits)
    tokenmerge.remove(copy_)
    assert type(copy_) is transformers.Dinov2ForImageClassification


def test_return_dict_false_and_labels_work_while_merging():
    model = tokenmerge.apply(randomize(VARIANTS[IDS.index("dinov2_swiglu_classifier")][1]()).eval(), r=8)
    x, labels = torch.randn(2, 3, IMAGE, IMAGE), torch.tensor([1, 5])
    with torch.no_grad():
        out = model(pixel_values=x, labels=labels)
        loss, logits = model(pixel_values=x, labels=labels, return_dict=False)
    assert torch.equal(logits, out.logits)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_bfloat16_autocast_merges_without_overflow():
    model = tokenmerge.apply(randomize(VARIANTS[IDS.index("siglip_head")][1]()).eval(), r=12)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = model(pixel_values=x).pooler_output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(pixel_values=x).pooler_output
    assert tokenmerge.get_state(model).size.dtype == torch.float32
    assert torch.isfinite(actual).all()
    assert torch.nn.functional.cosine_similarity(actual.float(), expected).min() > 0.95


def test_vit_tiny_layout_merges_as_expected():
    """ViT-Ti/16 at 224 px: the configuration of the shared checkpoint."""
    config = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224,
        patch_size=16, layer_norm_eps=1e-6, num_labels=1000,
    )
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        tokenmerge.apply(model, r=0)
        assert torch.equal(model(pixel_values=x).logits, expected)
        tokenmerge.apply(model, r=13)
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in hidden] == [197] + [197 - 13 * i for i in range(1, 13)]
    assert tokenmerge.token_counts(model)[-1] == 41


def test_dinov3_merged_tokens_take_the_rotary_angles_of_the_token_they_joined(monkeypatch):
    """Layer 1 rotates each merged token by the rotary row of the B token (an odd patch)
    that layer 0 folded A tokens into, read off the source map; layer 0 by the table."""
    model = tokenmerge.apply(randomize(VARIANTS[IDS.index("dinov3_registers")][1]()).eval(), r=[6, 0, 0],
                             trace_source=True)
    tables = []
    rotate = transformers.models.dinov3_vit.modeling_dinov3_vit.apply_rotary_pos_emb
    monkeypatch.setattr(transformers.models.dinov3_vit.modeling_dinov3_vit, "apply_rotary_pos_emb",
                        lambda q, k, cos, sin: tables.append(cos) or rotate(q, k, cos, sin))
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        model(pixel_values=x)
    full = model.rope_embeddings(x)[0]
    source = tokenmerge.get_state(model).sources[1][:, 3:] - 3
    assert torch.equal(tables[0], full) and tables[1].shape == (2, 1, NUM_PATCHES - 6, full.shape[-1])
    for b in range(2):
        for token in range(tables[1].shape[2]):
            members = (source[b] == token).nonzero().flatten()
            odd = members[members % 2 == 1]  # a B token, with the A tokens merged into it; or a kept A token
            assert torch.equal(tables[1][b, 0, token], full[(odd if len(odd) else members).item()])


@pytest.mark.parametrize("rule", rope.RULES)
def test_dinov3_twins_with_equal_rotary_angles_merge_exactly_under_either_rule(rule, monkeypatch):
    monkeypatch.setattr(MergingDINOv3Layer, "rope_rule", rule)
    model = randomize(VARIANTS[IDS.index("dinov3_swiglu")][1]()).eval()
    x = twin_input(model)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        tokenmerge.apply(model, r=[NUM_PATCHES // 2, 0, 0], trace_source=True)
        merged = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(unmerge(merged, tokenmerge.get_state(model).source), expected, atol=2e-5, rtol=1e-5)


def test_dinov3_training_with_randomly_rescaled_rotary_positions_merges():
    model = tokenmerge.apply(randomize(VARIANTS[IDS.index("dinov3_registers")][1]()).train(), r=8)
    assert model.config.pos_embed_rescale == 2.0
    model(pixel_values=torch.randn(2, 3, IMAGE, IMAGE)).pooler_output.square().sum().backward()
    assert tokenmerge.get_state(model).size.shape == (2, NUM_PATCHES + 3 - 24, 1)
    assert all(p.grad is not None for name, p in model.named_parameters() if name.startswith("model.layer.2"))


# --- dense features ----------------------------------------------------------------------


def assert_dense(model, call, tower_call, x):
    """With ``dense``, the tower's ``last_hidden_state`` is the merged one spread back over
    the input tokens, and the model's pooled output is what it is without, up to rounding."""
    tokenmerge.apply(model, r=8, trace_source=True)
    with torch.no_grad():
        merged, main = tower_call(model, x), call(model, x)
        state = tokenmerge.get_state(model)
        source, num_tokens = state.source, state.num_input_tokens
        tokenmerge.apply(model, r=8, dense=True)
        dense, dense_main = tower_call(model, x), call(model, x)
    assert merged.shape[1] == num_tokens - 3 * 8
    assert dense.shape == (x.shape[0], num_tokens, merged.shape[-1])
    assert torch.equal(dense, unmerge(merged, source))
    if main.dim() == 2:
        torch.testing.assert_close(dense_main, main, atol=1e-5, rtol=1e-5)


def test_dense_last_hidden_state_gives_every_patch_the_features_of_its_token(variant):
    assert_dense(copy.deepcopy(variant[0]), lambda model, x: run(model, x)[0],
                 lambda model, x: tower_of(model)(pixel_values=x).last_hidden_state, torch.randn(2, 3, IMAGE, IMAGE))


# --- video (VideoMAE) and audio (AST) ------------------------------------------------------

FRAMES = 2  # one tubelet deep
SPECTROGRAM = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=PATCH,
                   frequency_stride=PATCH, time_stride=PATCH, max_length=80, num_mel_bins=48)
VIDEO = dict(num_frames=FRAMES, tubelet_size=FRAMES)


def videos(batch, seed=0):
    return torch.randn(batch, FRAMES, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def spectrograms(batch, seed=0):
    return torch.randn(batch, 80, 48, generator=torch.Generator().manual_seed(seed))


# (id, builder, inputs, protected tokens, tokens the embeddings add before the patches)
SEQUENCES = [
    ("videomae_mean", lambda: transformers.VideoMAEForVideoClassification(
        transformers.VideoMAEConfig(**COMMON, **MLP, **VIDEO, num_labels=7)), videos, 0, 0),
    ("videomae_first_token", lambda: transformers.VideoMAEForVideoClassification(
        transformers.VideoMAEConfig(**COMMON, **MLP, **VIDEO, num_labels=7, use_mean_pooling=False)), videos, 1, 0),
    ("videomae_model", lambda: transformers.VideoMAEModel(transformers.VideoMAEConfig(**COMMON, **MLP, **VIDEO)),
     videos, 0, 0),
    ("ast_classifier", lambda: transformers.ASTForAudioClassification(transformers.ASTConfig(
        **SPECTROGRAM, **MLP, num_labels=7)), spectrograms, 2, 2),
    ("ast_model", lambda: transformers.ASTModel(transformers.ASTConfig(**SPECTROGRAM, **MLP)), spectrograms, 2, 2),
]
SEQUENCE_IDS = [sequence[0] for sequence in SEQUENCES]


@pytest.fixture(scope="module", params=SEQUENCES, ids=SEQUENCE_IDS)
def sequence(request):
    _, build, inputs, num_protected, num_prefix = request.param
    torch.manual_seed(0)
    return randomize(build()).eval(), inputs, num_protected, num_prefix


def sequence_forward(model, x, **kwargs):
    name = "input_values" if x.dim() == 3 else "pixel_values"
    return model(**{name: x}, output_hidden_states=True, **kwargs)


def sequence_run(model, x, **kwargs):
    """The model's main output for videos or spectrograms ``x``, and its hidden states."""
    out = sequence_forward(model, x, **kwargs)
    main = next(getattr(out, name) for name in MAIN_OUTPUTS if getattr(out, name, None) is not None)
    return main, out.hidden_states


def sequence_tower(model):
    return getattr(model, "videomae", None) or getattr(model, "audio_spectrogram_transformer", None) or model


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_videos_and_spectrograms_at_r0_match_the_unpatched_model(sequence, implementation):
    model, inputs = with_implementation(sequence[0], implementation), sequence[1]
    x = inputs(2)
    with torch.no_grad():
        expected, expected_hidden = sequence_run(model, x)
        tokenmerge.apply(model, r=0)
        actual, actual_hidden = sequence_run(model, x)
        tokenmerge.remove(model)
        restored, _ = sequence_run(model, x)
    assert torch.equal(actual, expected) and torch.equal(restored, expected)
    assert all(torch.equal(a, e) for a, e in zip(actual_hidden, expected_hidden))


def paired_sequence(model, inputs, batch=2):
    """Videos (or spectrograms) whose tubelets (or patches) come in identical pairs along
    the frame's width (or along time), the model's position embeddings made to repeat
    the same way: every token but the prefix tokens has an exact twin, the one the
    alternate A/B split matches it with."""
    x = inputs(batch)
    embeddings = sequence_tower(model).embeddings
    if isinstance(embeddings, transformers.models.videomae.modeling_videomae.VideoMAEEmbeddings):
        embeddings.position_embeddings = paired_columns(embeddings.position_embeddings.unflatten(
            1, (-1, IMAGE // PATCH)), 1, dim=2).flatten(1, 2)
        return paired_columns(x, PATCH)
    with torch.no_grad():  # AST: the patch grid is frequency by time, the position embeddings follow the two tokens
        table = embeddings.position_embeddings[:, 2:]
        table.copy_(paired_columns(table.unflatten(1, (-1, x.shape[1] // PATCH)), 1, dim=2).flatten(1, 2))
    return paired_columns(x, PATCH, dim=1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_merging_exact_twin_tubelets_and_patches_changes_nothing(sequence, implementation):
    """As for images: a model whose first layer merges only exact twins, a quarter of
    its tokens, reproduces the unmerged outputs; VideoMAE's mean pooling weighs the
    merged tokens by size."""
    model, inputs, num_protected, num_prefix = sequence
    model = with_implementation(model, implementation)
    x = paired_sequence(model, inputs)
    num_tokens = find_adapter(model).token_layout(model)[0]
    r = [(num_tokens - num_prefix) // 4, 0, 0]
    with torch.no_grad():
        expected, expected_hidden = sequence_run(model, x)
        tokenmerge.apply(model, r=r, trace_source=True)
        actual, actual_hidden = sequence_run(model, x)
        state = tokenmerge.get_state(model)
    if expected.dim() == 2:
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(unmerge(actual_hidden[-1], state.source), expected_hidden[-1], atol=2e-5, rtol=1e-5)
    patches = state.source[:, num_prefix:] - num_prefix
    for b in range(x.shape[0]):
        for token in patches[b].unique():
            members = (patches[b] == token).nonzero().flatten()
            assert len(members) <= 2 and (members // 2).unique().numel() == 1
    assert (state.size == 2).sum() == x.shape[0] * r[0]
    assert num_protected == state.num_protected


def test_videos_and_spectrograms_merge_as_token_counts_say_protecting_prefix_tokens(sequence):
    model, inputs, num_protected, num_prefix = sequence
    model = tokenmerge.apply(with_implementation(model, "eager"), r=5, trace_source=True)
    num_tokens = {videos: NUM_PATCHES, spectrograms: (80 // PATCH) * (48 // PATCH) + num_prefix}[inputs]
    assert find_adapter(model).token_layout(model) == (num_tokens, num_protected)
    counts = [num_tokens] + tokenmerge.token_counts(model)
    assert counts[-1] == num_tokens - 15
    with torch.no_grad():
        out = sequence_forward(model, inputs(3), output_attentions=True)
    assert [h.shape[1] for h in out.hidden_states] == counts
    assert [a.shape for a in out.attentions] == [(3, 4, n, n) for n in counts[:-1]]
    assert_sizes_and_sources_agree(tokenmerge.get_state(model), num_tokens, 3)


@pytest.mark.parametrize("r", [0, 8])
def test_analytic_flops_of_videos_and_spectrograms_equal_the_counter(sequence, r):
    model, inputs = tokenmerge.apply(copy.deepcopy(sequence[0]), r=r), sequence[1]

    class Main(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return sequence_run(self.model, x)[0]

    assert tokenmerge.flops_per_image(model) == count_flops(Main(), inputs(1))


def test_video_and_audio_layouts_follow_their_configuration():
    """VideoMAE counts tubelets over its configured frames of the given frame size; AST
    takes (time, frequency) sizes, which its patch convolution sees transposed, with
    overlapping patches (AST's own 1212 patches at its defaults)."""
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    video = transformers.VideoMAEModel(transformers.VideoMAEConfig(**small))
    adapter = find_adapter(video)
    assert adapter.input_size(video) == (224, 224) and adapter.token_layout(video) == (8 * 14 * 14, 0)
    assert adapter.token_layout(video, (112, 160)) == (8 * 7 * 10, 0)
    audio = transformers.ASTModel(transformers.ASTConfig(**small))
    assert adapter.input_size(audio) == (1024, 128) and adapter.token_layout(audio) == (12 * 101 + 2, 2)
    audio = transformers.ASTModel(transformers.ASTConfig(**small, time_stride=12, max_length=500)).eval()
    counts = adapter.token_layout(audio)
    with torch.no_grad():
        assert audio(input_values=torch.randn(1, 500, 128)).last_hidden_state.shape[1] == counts[0]
    assert counts == (12 * ((500 - 16) // 12 + 1) + 2, 2)


def test_video_mean_pooling_weighs_tokens_by_the_tubelets_they_hold():
    model = randomize(SEQUENCES[SEQUENCE_IDS.index("videomae_mean")][1]()).eval()
    tokenmerge.apply(model, r=8, trace_source=True)
    with torch.no_grad():
        out = model(pixel_values=videos(2), output_hidden_states=True)
        spread = unmerge(out.hidden_states[-1], tokenmerge.get_state(model).source)
        expected = model.classifier(model.fc_norm(spread.mean(1)))
        unweighted = model.classifier(model.fc_norm(out.hidden_states[-1].mean(1)))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert (out.logits - unweighted).abs().max() > 1e-3


def test_video_first_token_pooling_protects_and_reads_the_first_tubelet():
    model = randomize(SEQUENCES[SEQUENCE_IDS.index("videomae_first_token")][1]()).eval()
    tokenmerge.apply(model, r=8, trace_source=True)
    with torch.no_grad():
        out = model(pixel_values=videos(2), output_hidden_states=True)
    state = tokenmerge.get_state(model)
    assert torch.equal(state.source[:, 0], torch.zeros(2, dtype=torch.long)) and (state.source[:, 1:] > 0).all()
    expected = model.classifier(model.videomae.layernorm(out.hidden_states[-1])[:, 0])
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-6)


def test_ast_pooler_averages_the_protected_class_and_distillation_tokens():
    model = randomize(SEQUENCES[SEQUENCE_IDS.index("ast_model")][1]()).eval()
    tokenmerge.apply(model, r=8, trace_source=True)
    with torch.no_grad():
        out = model(input_values=spectrograms(2))
    state = tokenmerge.get_state(model)
    assert torch.equal(state.source[:, :2], torch.arange(2).expand(2, -1)) and (state.source[:, 2:] >= 2).all()
    assert torch.equal(state.size[:, :2], torch.ones(2, 2, 1))
    torch.testing.assert_close(out.pooler_output, (out.last_hidden_state[:, 0] + out.last_hidden_state[:, 1]) / 2)


def test_masked_video_pretraining_inputs_are_refused_while_merging_but_kept_at_r0():
    model = randomize(SEQUENCES[SEQUENCE_IDS.index("videomae_model")][1]()).eval()
    x, masked = videos(2), torch.zeros(2, NUM_PATCHES, dtype=torch.bool)
    masked[:, ::2] = True
    with torch.no_grad():
        expected = model(pixel_values=x, bool_masked_pos=masked).last_hidden_state
        tokenmerge.apply(model, r=0)
        assert torch.equal(model(pixel_values=x, bool_masked_pos=masked).last_hidden_state, expected)
        tokenmerge.apply(model, r=4)
        with pytest.raises(NotImplementedError, match="bool_masked_pos"):
            model(pixel_values=x, bool_masked_pos=masked)
        tokenmerge.get_state(model).r = 0
        assert torch.equal(model(pixel_values=x, bool_masked_pos=masked).last_hidden_state, expected)


def test_dense_last_hidden_state_of_videos_and_spectrograms(sequence):
    assert_dense(copy.deepcopy(sequence[0]), lambda model, x: sequence_run(model, x)[0],
                 lambda model, x: sequence_forward(sequence_tower(model), x).last_hidden_state, sequence[1](2))


@pytest.mark.parametrize("name", ["videomae_mean", "ast_classifier"])
def test_videos_and_spectrograms_compile_in_one_graph_and_export_with_a_dynamic_batch(name):
    _, build, inputs, _, _ = SEQUENCES[SEQUENCE_IDS.index(name)]
    model = tokenmerge.apply(randomize(build()).eval(), r=8)
    main = MainOutput(model, sequence_run)
    x = inputs(2)
    with torch.no_grad():
        expected = main(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(main)(x)
        assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
        torch.testing.assert_close(torch.compile(main, backend="eager", fullgraph=True)(x), expected)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(main, (x,), dynamic_shapes=({0: batch},)).module()
    for size in (1, 3):
        with torch.no_grad():
            torch.testing.assert_close(exported(inputs(size, seed=size)), main(inputs(size, seed=size)),
                                       atol=1e-5, rtol=1e-5)
