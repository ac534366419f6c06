"""The shared ViT-Ti checkpoint (timm key names) mapped onto Hugging Face's
ViTForImageClassification must agree with timm on real photographs, unmerged and merged."""
import pytest
import torch

import tokenmerge
from tests.conftest import predict


def transformers_from_timm(timm_model):
    """transformers' ViTForImageClassification carrying the shared ViT-Ti's weights, in eval mode."""
    pytest.importorskip("transformers")
    from tokenmerge.tools.conversion import transformers_from_timm as convert

    return convert(timm_model)[0]


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


#: sdpa agrees with eager on the small models of the contract suite; on the real
#: weights it is checked with -m slow.
IMPLEMENTATIONS = ["eager", pytest.param("sdpa", marks=pytest.mark.slow)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_transformers_agrees_with_timm_unmerged(
    timm_vit_tiny, transformers_vit_tiny, imagenet_sample, timm_sample_predictions, implementation
):
    images, _ = imagenet_sample
    hf = transformers_vit_tiny
    hf.set_attn_implementation(implementation)
    with torch.no_grad():
        torch.testing.assert_close(Logits(hf)(images[:8]), timm_vit_tiny(images[:8]), atol=1e-4, rtol=1e-4)
    assert torch.equal(predict(Logits(hf), images), timm_sample_predictions())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("r", [pytest.param(8, marks=pytest.mark.slow), 13])
def test_transformers_merged_agrees_with_timm(
    transformers_vit_tiny, imagenet_sample, timm_sample_predictions, implementation, r
):
    images, labels = imagenet_sample
    hf = transformers_vit_tiny
    hf.set_attn_implementation(implementation)
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
