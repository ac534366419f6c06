"""The shared ViT-Ti checkpoint (timm key names) mapped onto Hugging Face's
ViTForImageClassification must agree with timm on real photographs, unmerged and merged."""
import pytest
import torch

import tokenmerge
from tests.conftest import predict


def timm_to_transformers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ViT weights under transformers' ViTForImageClassification key names."""
    mapped = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "vit.layernorm.weight": state["norm.weight"],
        "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": state["head.weight"],
        "classifier.bias": state["head.bias"],
    }
    for i in range(depth):
        timm_block, hf_layer = f"blocks.{i}.", f"vit.layers.{i}."
        qkv_weight, qkv_bias = state[timm_block + "attn.qkv.weight"], state[timm_block + "attn.qkv.bias"]
        for part, weight, bias in zip(("q", "k", "v"), qkv_weight.chunk(3), qkv_bias.chunk(3)):
            mapped[f"{hf_layer}attention.{part}_proj.weight"] = weight
            mapped[f"{hf_layer}attention.{part}_proj.bias"] = bias
        for timm_name, hf_name in [
            ("attn.proj", "attention.o_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
        ]:
            for field in ("weight", "bias"):
                mapped[f"{hf_layer}{hf_name}.{field}"] = state[f"{timm_block}{timm_name}.{field}"]
    return mapped


def transformers_from_timm(timm_model):
    """transformers' ViTForImageClassification carrying the shared ViT-Ti's weights, in eval mode."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224,
        patch_size=16, layer_norm_eps=1e-6, num_labels=1000, hidden_act="gelu",
    )
    model = transformers.ViTForImageClassification(config).eval()
    model.load_state_dict(timm_to_transformers(timm_model.state_dict(), 12))
    return model


@pytest.fixture(scope="module")
def transformers_vit_tiny(timm_vit_tiny):
    return transformers_from_timm(timm_vit_tiny)


class Logits(torch.nn.Module):
    """A transformers classifier as a function of images."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_transformers_agrees_with_timm(
    timm_vit_tiny, transformers_vit_tiny, imagenet_sample, timm_sample_predictions, implementation
):
    images, labels = imagenet_sample
    hf = transformers_vit_tiny
    hf.set_attn_implementation(implementation)
    with torch.no_grad():
        torch.testing.assert_close(Logits(hf)(images[:8]), timm_vit_tiny(images[:8]), atol=1e-4, rtol=1e-4)
    assert torch.equal(predict(Logits(hf), images), timm_sample_predictions())
    for r in (8, 13):
        tokenmerge.apply(hf, r=r)
        try:
            timm_pred, hf_pred = timm_sample_predictions(r), predict(Logits(hf), images)
        finally:
            tokenmerge.remove(hf)
        timm_top1 = (timm_pred == labels).float().mean().item() * 100
        hf_top1 = (hf_pred == labels).float().mean().item() * 100
        agreement = (timm_pred == hf_pred).float().mean().item() * 100
        print(f"\n{implementation}, r={r}: timm top-1 {timm_top1:.1f}%, transformers top-1 {hf_top1:.1f}%, "
              f"same prediction on {agreement:.1f}% of images")
        assert abs(timm_top1 - hf_top1) <= 0.5, (r, timm_top1, hf_top1)
        assert agreement >= 98, r
