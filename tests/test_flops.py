import pytest
import timm
import torch

import tokenmerge
from tokenmerge.flops import count_flops


def vit_flops(token_counts_in_out, dim, patch_flops, num_classes):
    """Matmul FLOPs of a plain ViT block stack: qkv, QK^T, AV, proj on the tokens
    entering a block, the MLP on the tokens left after merging."""
    total = patch_flops + 2 * dim * num_classes
    for n_in, n_out in token_counts_in_out:
        total += 2 * n_in * dim * 3 * dim + 2 * 2 * n_in * n_in * dim + 2 * n_in * dim * dim
        total += 2 * 2 * n_out * dim * 4 * dim
    return total


def test_counts_attention_and_follows_merging():
    model = timm.create_model("vit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    dim, patch_flops = 192, 2 * 196 * 192 * 3 * 16 * 16
    assert count_flops(model, x) == vit_flops([(197, 197)] * 12, dim, patch_flops, 1000)
    tokenmerge.apply(model, r=8)
    counts = [197] + tokenmerge.token_counts(model)
    expected = vit_flops(list(zip(counts[:-1], counts[1:])), dim, patch_flops, 1000)
    matching = sum(2 * ((n - 1 + 1) // 2) * ((n - 1) // 2) * 64 for n in counts[:-1])  # A x B cosine products
    assert count_flops(model, x) == expected + matching


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", {}),
        ("deit3_small_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_small_patch14_reg4_dinov2", {"img_size": 112}),
        ("vit_tiny_patch16_224", {"global_pool": "map"}),
    ],
)
@pytest.mark.parametrize("r", [0, 13, "decreasing:8"])
def test_analytic_flops_agree_with_the_counter(name, kwargs, r):
    model = timm.create_model(name, **kwargs).eval()
    r = tokenmerge.schedule.parse(str(r))
    tokenmerge.apply(model, r=r)
    counted = count_flops(model, torch.randn(1, 3, *model.patch_embed.img_size))
    assert tokenmerge.flops_per_image(model) == counted
