import pytest
import torch

from tokenmerge.adapters.multihead import check_multihead, multihead_attend, multihead_project, multihead_size_mask


@pytest.mark.parametrize("batch_first", [True, False])
def test_matches_torch_multihead_attention(batch_first):
    attention = torch.nn.MultiheadAttention(48, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 9, 48)
    expected = attention(*(3 * [x if batch_first else x.transpose(0, 1)]), need_weights=False)[0]
    expected = expected if batch_first else expected.transpose(0, 1)
    projected = multihead_project(attention, x)
    out, keys = multihead_attend(attention, projected, None), projected.k
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert keys.shape == (2, 4, 9, 12)
    torch.testing.assert_close(keys, (x @ attention.in_proj_weight[48:96].T + attention.in_proj_bias[48:96])
                               .view(2, 9, 4, 12).transpose(1, 2))


def test_a_token_of_size_two_counts_as_its_twin():
    attention = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    x = torch.randn(1, 5, 32)
    twins = torch.cat([x, x[:, -1:]], dim=1)
    full = attention(twins, twins, twins, need_weights=False)[0][:, :5]
    size = torch.tensor([1.0, 1, 1, 1, 2]).view(1, 5, 1)
    merged = multihead_attend(attention, multihead_project(attention, x), size)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    pooled = attention(x[:, :1], x, x, need_weights=False, attn_mask=multihead_size_mask(size, 2, 1, x.dtype))[0]
    twin_pooled = attention(x[:, :1], twins, twins, need_weights=False)[0]
    torch.testing.assert_close(pooled, twin_pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, feature", [
    (dict(kdim=16, vdim=16), "kdim/vdim"),
    (dict(add_bias_kv=True), "add_bias_kv"),
    (dict(add_zero_attn=True), "add_zero_attn"),
])
def test_refuses_what_it_cannot_reproduce(kwargs, feature):
    with pytest.raises(TypeError, match=feature):
        check_multihead(torch.nn.MultiheadAttention(32, 2, **kwargs), "blocks.0.attn")
    with pytest.raises(TypeError, match="Linear"):
        check_multihead(torch.nn.Linear(2, 2), "blocks.0.attn")
