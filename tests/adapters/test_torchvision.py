"""torchvision integration: exactness, invariants, gradients, restore, errors (random weights)."""
import copy
import warnings
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import vision_transformer as tv_vit
from torchvision.models.vision_transformer import ConvStemConfig, EncoderBlock, VisionTransformer

import tokenmerge
from tests.adapters.invariants import assert_sizes_and_sources_agree
from tokenmerge.adapters import find_adapter
from tokenmerge.flops import count_flops

SMALL = dict(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
CONV_STEM = [ConvStemConfig(out_channels=c, kernel_size=3, stride=2) for c in (16, 32, 64)]

# (id, VisionTransformer kwargs)
VARIANTS = [
    ("small", SMALL),
    ("grid_8x8", dict(SMALL, image_size=64, num_layers=2, num_heads=2)),
    ("representation_size", dict(SMALL, representation_size=32)),
    ("rms_norm", dict(SMALL, norm_layer=partial(nn.RMSNorm, eps=1e-6))),
    ("conv_stem", dict(SMALL, conv_stem_configs=CONV_STEM)),
]
IDS = [v[0] for v in VARIANTS]


def make_model(**kwargs):
    """A randomly initialised model in eval mode. torchvision starts the classifier and
    the class token at zero and the norms at one; they are randomised so that a patch
    dropping or misplacing any of them changes the outputs."""
    model = VisionTransformer(**{**SMALL, **kwargs}).eval()
    with torch.no_grad():
        model.class_token.normal_()
        for name, param in model.named_parameters():
            if name.startswith("heads."):
                param.normal_(std=0.1)
            elif ".ln" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def variant(request):
    torch.manual_seed(0)
    return make_model(**request.param[1])


def images(model, batch):
    return torch.randn(batch, 3, model.image_size, model.image_size)


def test_r0_matches_unpatched_model(variant):
    model = variant
    x = images(model, 2)
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


def paired_input(model, batch=2):
    """Images whose patch columns come in identical pairs (2j, 2j+1), and a position
    embedding made to repeat the same way: every patch token then has an exact twin,
    the one it is matched with in the alternate A/B split."""
    patch, grid = model.patch_size, model.image_size // model.patch_size
    x = images(model, batch)
    for j in range(0, grid, 2):
        x[..., (j + 1) * patch:(j + 2) * patch] = x[..., j * patch:(j + 1) * patch]
    with torch.no_grad():
        positions = model.encoder.pos_embedding[:, 1:].view(1, grid, grid, -1)
        positions[:, :, 1::2] = positions[:, :, 0::2]
    return x


@pytest.mark.parametrize("fraction", [2, 4])
def test_merging_exact_twins_changes_nothing(variant, fraction):
    """Merged with proportional attention, two identical tokens behave like one of
    size 2: a model whose first block merges only exact twins must reproduce the
    unmerged outputs. Without proportional attention it must not."""
    if not isinstance(variant.conv_proj, nn.Conv2d):
        pytest.skip("a convolutional stem's overlapping receptive fields make no identical patch tokens")
    model = copy.deepcopy(variant)
    x = paired_input(model)
    num_patches = model.seq_length - 1
    r = [num_patches // fraction] + [0] * (len(model.encoder.layers) - 1)
    with torch.no_grad():
        expected = model(x)
        tokenmerge.apply(model, r=r, trace_source=True)
        actual = model(x)
        state = tokenmerge.get_state(model)
        source = state.source[:, 1:] - 1
        final_tokens = state.size.shape[1]
        tokenmerge.apply(model, r=r, prop_attn=False)
        without_sizes = model(x)
    assert final_tokens == model.seq_length - r[0]
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(without_sizes, expected, atol=1e-3, rtol=1e-3)
    # and every merge joined two twins: sources in the same column pair and row
    patch_index = torch.arange(num_patches)
    for b in range(x.shape[0]):
        for token in source[b].unique():
            members = patch_index[source[b] == token]
            assert len(members) <= 2 and (members // 2).unique().numel() == 1


def test_token_counts_are_fixed_per_block_for_any_content(variant):
    model = copy.deepcopy(variant)
    tokenmerge.apply(model, r=3)
    counts = []
    hooks = [layer.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for layer in model.encoder.layers]
    size = model.image_size
    with torch.no_grad():
        for x in [torch.zeros(2, 3, size, size), torch.randn(3, 3, size, size), torch.rand(1, 3, size, size) * 10]:
            counts.clear()
            model(x)
            assert counts == tokenmerge.token_counts(model)
            assert tokenmerge.get_state(model).size.shape[1] == counts[-1]
    for hook in hooks:
        hook.remove()
    assert counts[-1] == model.seq_length - 3 * len(counts)


def test_sizes_sum_to_token_count_and_the_class_token_is_never_merged(variant):
    model = copy.deepcopy(variant)
    tokenmerge.apply(model, r=4, trace_source=True)
    with torch.no_grad():
        model(images(model, 3))
    state = tokenmerge.get_state(model)
    assert state.num_protected == 1 and state.num_input_tokens == model.seq_length
    assert_sizes_and_sources_agree(state, model.seq_length, 3)


def test_an_image_gives_the_same_output_alone_and_in_a_batch(variant):
    model = copy.deepcopy(variant)
    tokenmerge.apply(model, r=4)
    x = images(model, 4)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [0, 3, tokenmerge.Linear(3)], ids=["0", "3", "decreasing"])
def test_analytic_flops_agree_with_the_counter(variant, r):
    model = copy.deepcopy(variant)
    tokenmerge.apply(model, r=r)
    assert tokenmerge.flops_per_image(model) == count_flops(model, images(model, 1))


@pytest.mark.parametrize("r", [0, 3])
def test_analytic_flops_agree_with_the_counter_for_vit_b_32(r):
    model = torchvision.models.vit_b_32().eval()
    tokenmerge.apply(model, r=r)
    assert tokenmerge.flops_per_image(model) == count_flops(model, images(model, 1))


def test_flops_of_a_custom_stem_with_padding_modes():
    model = make_model()
    model.conv_proj = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding="same"), nn.Conv2d(16, 64, 8, stride=8, padding="valid")
    )
    tokenmerge.apply(model, r=2)
    assert tokenmerge.flops_per_image(model) == count_flops(model, images(model, 1))


# (builder, image size of its weights, tokens, blocks)
ARCHITECTURES = [
    ("vit_b_16", 224, 197, 12), ("vit_b_16", 384, 577, 12), ("vit_b_32", 224, 50, 12),
    ("vit_l_16", 224, 197, 24), ("vit_l_16", 512, 1025, 24), ("vit_l_32", 224, 50, 24),
    ("vit_h_14", 224, 257, 32), ("vit_h_14", 518, 1370, 32),
]


@pytest.mark.parametrize("builder, image_size, tokens, blocks", ARCHITECTURES)
def test_every_torchvision_architecture_is_supported_with_its_published_flops(builder, image_size, tokens, blocks):
    """Built without memory on the meta device: the checks accept it, and its FLOPs at
    r=0 are the GFLOPS torchvision publishes for its weights (multiply-adds)."""
    with torch.device("meta"):
        model = getattr(tv_vit, builder)(image_size=image_size)
    tokenmerge.apply(model, r=1)
    assert tokenmerge.token_counts(model, r=0) == [tokens] * blocks
    assert tokenmerge.token_counts(model)[-1] == tokens - blocks
    weights = torchvision.models.get_model_weights(builder)
    published = [w.meta["_ops"] for w in weights if w.meta["min_size"][0] == image_size]
    assert published and tokenmerge.flops_per_image(model, r=0) / 2e9 == pytest.approx(published[0], abs=5e-4)
    tokenmerge.remove(model)
    assert type(model.encoder.layers[0]) is EncoderBlock


def test_gradients_flow_through_merged_blocks_in_training():
    torch.manual_seed(0)
    reference = make_model(dropout=0.1, attention_dropout=0.1).train()
    merged = copy.deepcopy(reference)
    tokenmerge.apply(merged, r=3)
    x = images(reference, 2)
    for model in (reference, merged):
        model(x).logsumexp(-1).sum().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), merged.named_parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
    assert merged.conv_proj.weight.grad.abs().sum() > 0
    assert merged.encoder.layers[0].self_attention.in_proj_weight.grad.abs().sum() > 0
    assert tokenmerge.get_state(merged).size.shape[1] == 17 - 3 * 3


def test_too_large_r_is_capped_with_one_warning():
    model = make_model()
    tokenmerge.apply(model, r=20)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(images(model, 1))
        model(images(model, 1))
    messages = [str(w.message) for w in caught if issubclass(w.category, tokenmerge.CappedRWarning)]
    # 16 patch tokens: 8 merges, then 4, then 2
    assert messages == ["r=20 is more than blocks 0-2 can merge (1 protected token, at most half of the others per "
                        "block); they merge 8/4/2 instead, leaving 3 tokens. Lower r to silence this warning."]
    assert tokenmerge.get_state(model).size.shape[1] == tokenmerge.token_counts(model)[-1] == 3


class ViTWithMeanPooling(VisionTransformer):
    def forward(self, x):
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), self._process_input(x)], dim=1)
        return self.heads(self.encoder(tokens).mean(1))


class ScaledEncoderBlock(EncoderBlock):
    def forward(self, input):
        return 2 * super().forward(input)


def with_layer(layer_name, attribute, module):
    model = make_model()
    layer = model.encoder.layers[layer_name] if isinstance(layer_name, int) else model.encoder
    setattr(layer, attribute, module)
    return model


def with_block_class(cls):
    model = make_model()
    model.encoder.layers[1] = cls(4, 64, 128, 0.0, 0.0)
    return model


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ViTWithMeanPooling(**SMALL), "ViTWithMeanPooling"),
        (lambda: with_block_class(ScaledEncoderBlock), r"ScaledEncoderBlock \(encoder.layers.encoder_layer_1\)"),
        (lambda: with_layer(1, "self_attention", nn.MultiheadAttention(64, 4)), r"batch_first=False \(encoder.layers"),
        (lambda: with_layer(0, "self_attention", nn.MultiheadAttention(64, 4, add_bias_kv=True, batch_first=True)),
         "add_bias_kv"),
        (lambda: with_layer(2, "ln_2", nn.GroupNorm(1, 64)), r"GroupNorm \(encoder.layers.encoder_layer_2.ln_2\)"),
        (lambda: with_layer(None, "ln", nn.BatchNorm1d(64)), r"BatchNorm1d \(encoder.ln\)"),
        (lambda: with_layer(0, "mlp", nn.Linear(64, 64)), r"Linear \(encoder.layers.encoder_layer_0.mlp\)"),
        (lambda: torchvision.models.resnet18(), "ResNet"),
        (lambda: torchvision.models.swin_t(), "SwinTransformer"),
        (lambda: torchvision.models.maxvit_t(), "MaxVit"),
    ],
)
def test_unsupported_models_are_refused_by_name(build, message):
    with torch.device("meta"):
        model = build()
    classes = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(TypeError, match=message) as info:
        tokenmerge.apply(model, r=4)
    assert "Supported" in str(info.value)
    assert not tokenmerge.is_applied(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes


def test_a_different_image_size_is_refused():
    model = make_model()
    assert find_adapter(model).input_size(model) == (32, 32)
    assert tokenmerge.token_counts(model, r=2, img_size=(32, 32)) == [15, 13, 11]
    with pytest.raises(ValueError, match="only 32x32 inputs"):
        tokenmerge.token_counts(model, r=2, img_size=(64, 64))
    with pytest.raises(ValueError, match="only 32x32 inputs"):
        tokenmerge.flops_per_image(model, r=2, img_size=(48, 48))


def test_bfloat16_autocast_merges_without_overflow():
    model = make_model()
    tokenmerge.apply(model, r=4)
    x = images(model, 2)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(x)
    assert tokenmerge.get_state(model).size.dtype == torch.float32
    assert torch.isfinite(actual).all()
    assert torch.nn.functional.cosine_similarity(actual.float(), expected).min() > 0.95
