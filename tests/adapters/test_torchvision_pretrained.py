"""The real ViT-Ti AugReg checkpoint mapped onto torchvision's VisionTransformer: on
500 real ImageNet photographs it must agree with timm, unmerged and merged alike."""
import pytest
import torch
from torchvision.models import VisionTransformer

import tokenmerge
from tests.conftest import predict

VIT_TINY = dict(
    image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=1000
)

# timm name inside a block -> torchvision name inside an encoder layer
BLOCK_KEYS = {
    "norm1": "ln_1",
    "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj": "self_attention.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.3",
}
# timm name outside the blocks -> torchvision name
MODEL_KEYS = {
    "cls_token": "class_token",
    "pos_embed": "encoder.pos_embedding",
    "patch_embed.proj": "conv_proj",
    "norm": "encoder.ln",
    "head": "heads.head",
}


def torchvision_key(timm_key: str) -> str:
    """The torchvision name of a timm ViT parameter. timm's fused qkv projection packs
    queries, keys and values in the same order as ``in_proj_weight``."""
    if timm_key.startswith("blocks."):
        _, index, rest = timm_key.split(".", 2)
        return f"encoder.layers.encoder_layer_{index}.{_rename(rest, BLOCK_KEYS)}"
    return _rename(timm_key, MODEL_KEYS)


def _rename(key: str, names: dict) -> str:
    for old, new in names.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    raise KeyError(f"no torchvision name for timm parameter {key}")


def torchvision_vit_tiny(timm_model) -> VisionTransformer:
    """torchvision's ViT-Ti carrying the weights of the timm model, in eval mode."""
    model = VisionTransformer(**VIT_TINY).eval()
    state = {torchvision_key(key): value for key, value in timm_model.state_dict().items()}
    model.load_state_dict(state, strict=True)  # every parameter of both models, shapes checked
    return model


@pytest.fixture(scope="module")
def models_and_images(timm_vit_tiny, imagenet_sample):
    return timm_vit_tiny, torchvision_vit_tiny(timm_vit_tiny), *imagenet_sample


def logits(model, images, batch_size=100):
    with torch.no_grad():
        return torch.cat([model(batch) for batch in images.split(batch_size)])


def test_norms_have_the_same_epsilon_in_both_libraries(timm_vit_tiny):
    tv_model = torchvision_vit_tiny(timm_vit_tiny)
    timm_eps = [m.eps for m in timm_vit_tiny.modules() if isinstance(m, torch.nn.LayerNorm)]
    tv_eps = [m.eps for m in tv_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(tv_eps) == len(timm_eps) == 2 * 12 + 1
    assert set(tv_eps) == set(timm_eps) == {1e-6}


def test_torchvision_agrees_with_timm_unmerged(models_and_images, timm_sample_predictions):
    """The logits of 100 photographs to rounding, and the predictions of all 500 exactly."""
    timm_model, tv_model, images, _ = models_and_images
    actual = logits(tv_model, images)
    torch.testing.assert_close(actual[:100], logits(timm_model, images[:100]), atol=1e-4, rtol=1e-4)
    assert torch.equal(actual.argmax(-1), timm_sample_predictions())
    tokenmerge.apply(tv_model, r=0)
    try:
        assert torch.equal(logits(tv_model, images[:100]), actual[:100]), "r=0 must give the plain model's logits"
    finally:
        tokenmerge.remove(tv_model)


@pytest.mark.parametrize("r", [pytest.param(8, marks=pytest.mark.slow), 13])
def test_torchvision_merged_agrees_with_timm(models_and_images, timm_sample_predictions, r):
    _, tv_model, images, labels = models_and_images
    tokenmerge.apply(tv_model, r=r)
    try:
        tv_pred = predict(tv_model, images)
        assert tokenmerge.get_state(tv_model).size.shape[1] == tokenmerge.token_counts(tv_model)[-1] == 197 - 12 * r
    finally:
        tokenmerge.remove(tv_model)
    timm_pred = timm_sample_predictions(r)
    timm_top1 = (timm_pred == labels).float().mean().item() * 100
    tv_top1 = (tv_pred == labels).float().mean().item() * 100
    agreement = (timm_pred == tv_pred).float().mean().item() * 100
    print(f"\nViT-Ti AugReg, 500 photographs, r={r}: timm top-1 {timm_top1:.1f}%, torchvision top-1 "
          f"{tv_top1:.1f}%, same prediction on {agreement:.1f}%")
    assert abs(timm_top1 - tv_top1) <= 0.5
    assert agreement >= 98
