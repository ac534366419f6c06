"""transformers integration: exactness, invariants, attention implementations, pooling,
gradients, FLOPs, restore and refusals, on tiny random models of every supported class."""
import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenmerge  # noqa: E402
from tests.adapters.invariants import assert_sizes_and_sources_agree  # noqa: E402
from tokenmerge.adapters import find_adapter  # noqa: E402
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


def twin_input(model, batch=2):
    """Images whose patch columns come in identical pairs (2j, 2j+1), for a model whose
    patch position embeddings are made to repeat the same way: every patch token then
    has an exact twin, the one it is matched with in the alternate A/B split."""
    x = torch.randn(batch, 3, IMAGE, IMAGE)
    for j in range(0, IMAGE // PATCH, 2):
        x[..., (j + 1) * PATCH:(j + 2) * PATCH] = x[..., j * PATCH:(j + 1) * PATCH]
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
    projection = tower_of(merged).embeddings
    projection = getattr(projection, "patch_embedding", None) or projection.patch_embeddings.projection
    assert projection.weight.grad.abs().sum() > 0


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


class Images(torch.nn.Module):
    """A model's forward on images alone, for the FLOP counter: CLIPModel's forward needs text."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return run(self.model, images)[0]


@pytest.mark.parametrize("r", [0, 8])
def test_analytic_flops_equal_the_counter(variant, r):
    """Every matrix product is modelled, SigLIP's attention-pooling head included."""
    model = tokenmerge.apply(copy.deepcopy(variant[0]), r=r)
    counted = count_flops(Images(model), torch.randn(1, 3, IMAGE, IMAGE))
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
