"""The real ViT-Ti AugReg checkpoint mapped onto timm's ``Eva`` class (rotary embeddings
off, absolute position embeddings, GELU MLP), on the 500 shared ImageNet photographs."""
from __future__ import annotations

import pytest
import torch
from timm.models.eva import Eva

import tokenmerge
from tests.conftest import predict


def eva_from_vit(vit: torch.nn.Module) -> Eva:
    """timm's ``Eva`` with the weights of a timm ViT-Ti. Eva's fused projection keeps no
    key bias: the ViT's key bias adds the same q.b to every logit of a query, which
    softmax ignores, so attention is unchanged (the keys the matching compares move)."""
    eva = Eva(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000,
              global_pool="token", use_fc_norm=False).eval()
    state = {}
    for key, value in vit.state_dict().items():
        if key.endswith("attn.qkv.bias"):
            prefix = key[: -len("qkv.bias")]
            state[prefix + "q_bias"], _, state[prefix + "v_bias"] = value.chunk(3)
        else:
            state[key] = value
    missing, unexpected = eva.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("k_bias") for key in missing), (missing, unexpected)
    return eva


@pytest.fixture(scope="module")
def eva_vit_tiny(timm_vit_tiny):
    return eva_from_vit(timm_vit_tiny)


def test_the_mapped_eva_predicts_what_the_vit_predicts(eva_vit_tiny, imagenet_sample, timm_sample_predictions):
    images, _ = imagenet_sample
    assert torch.equal(predict(eva_vit_tiny, images), timm_sample_predictions(None))


@pytest.mark.parametrize("r", [pytest.param(8, marks=pytest.mark.slow), 13])
def test_the_mapped_eva_merges_within_a_point_of_the_vit(eva_vit_tiny, imagenet_sample, timm_sample_predictions, r):
    images, labels = imagenet_sample
    tokenmerge.apply(eva_vit_tiny, r=r)
    try:
        eva = (predict(eva_vit_tiny, images) == labels).float().mean().item() * 100
    finally:
        tokenmerge.remove(eva_vit_tiny)
    vit = (timm_sample_predictions(r) == labels).float().mean().item() * 100
    print(f"\nViT-Ti AugReg on the 500-image sample, r={r}: VisionTransformer {vit:.1f}%, Eva {eva:.1f}%")
    assert abs(eva - vit) <= 1.0
