import pytest
import torch
import torch.nn.functional as F

from tokenmerge.attention import (
    attention_with_channel,
    attention_with_mask,
    default_formulation,
    mask_with_key_bias,
    proportional_attention,
)

FORMULATIONS = ["mask", "channel"]

#: (atol, rtol) of the channel formulation against the mask, per dtype. Both run the
#: same kernel, which accumulates in float32; they differ in where the bias is rounded
#: to the dtype (log s, or log s / scale) and in the order of the logits' sums. float32:
#: torch.testing's own defaults (seen: 1e-6). bfloat16 and float16: each formulation is
#: within 3 eps (1 + |out|) of the exact result, the rounding of the bias and of the
#: output, so the two differ by up to 4 eps (1 + |out|) (seen over 200 seeds: 2.8 eps);
#: a wrong bias or scale moves outputs of magnitude 1 by far more.
TOLERANCES = {
    torch.float32: (1e-5, 1.3e-6),
    torch.bfloat16: (4 * torch.finfo(torch.bfloat16).eps, 4 * torch.finfo(torch.bfloat16).eps),
    torch.float16: (4 * torch.finfo(torch.float16).eps, 4 * torch.finfo(torch.float16).eps),
}


def qkv_and_size(head_dim, batch=2, heads=3, tokens=17, dtype=torch.float32):
    q, k, v = torch.randn(3, batch, heads, tokens, head_dim).to(dtype).unbind(0)
    return q, k, v, torch.randint(1, 50, (batch, tokens, 1)).float()


def test_without_sizes_it_is_plain_sdpa():
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    for formulation in [None, *FORMULATIONS]:
        out = proportional_attention(q, k, v, formulation=formulation)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_without_sizes_dropout_and_scale_go_to_sdpa_unchanged():
    q, k, v = torch.randn(3, 2, 4, 9, 6).unbind(0)
    torch.manual_seed(3)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4, scale=0.3)
    torch.manual_seed(3)
    assert torch.equal(proportional_attention(q, k, v, dropout_p=0.4, scale=0.3, formulation="channel"), expected)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_token_with_size_k_acts_like_k_copies(formulation):
    q, k, v = torch.randn(3, 2, 3, 6, 8, dtype=torch.float64).unbind(0)
    copies = 4
    # Sequence with key/value 2 repeated `copies` times...
    repeat = torch.tensor([0, 1] + [2] * copies + [3, 4, 5])
    out_repeated = F.scaled_dot_product_attention(q, k[:, :, repeat], v[:, :, repeat])
    # ... equals the sequence with it once, of size `copies`.
    size = torch.ones(2, 6, 1, dtype=torch.float64)
    size[:, 2] = copies
    out_sized = proportional_attention(q, k, v, size, formulation=formulation)
    torch.testing.assert_close(out_sized, out_repeated)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_matches_explicit_softmax_with_log_size_bias(formulation):
    q, k, v = torch.randn(3, 1, 2, 5, 4, dtype=torch.float64).unbind(0)
    size = torch.tensor([1.0, 3, 2, 1, 7], dtype=torch.float64).view(1, 5, 1)
    logits = q @ k.transpose(-1, -2) / 2 + size.log().view(1, 1, 1, 5)
    out = proportional_attention(q, k, v, size, formulation=formulation)
    torch.testing.assert_close(out, logits.softmax(-1) @ v)


@pytest.mark.parametrize("dtype", TOLERANCES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 12, 64, 6])
def test_the_channel_equals_the_mask(head_dim, dtype):
    q, k, v, size = qkv_and_size(head_dim, dtype=dtype)
    atol, rtol = TOLERANCES[dtype]
    for scale in [None, 0.3]:
        out = attention_with_channel(q, k, v, size, scale=scale)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out, attention_with_mask(q, k, v, size, scale=scale), atol=atol, rtol=rtol)


def test_the_channel_takes_fewer_queries_and_sizes_of_any_dtype():
    q, k, v, size = qkv_and_size(12, dtype=torch.bfloat16)
    latents = q[:, :, :1]  # attention pooling: one query over every token
    atol, rtol = TOLERANCES[torch.bfloat16]
    for sizes in [size, size.double(), size.bfloat16()]:
        torch.testing.assert_close(attention_with_channel(latents, k, v, sizes),
                                   attention_with_mask(latents, k, v, size), atol=atol, rtol=rtol)


def test_the_channel_pads_to_a_multiple_of_8_and_slices_the_padding_off(monkeypatch):
    widths = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        widths.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    for head_dim, width in [(6, 8), (8, 16), (12, 16), (64, 72)]:
        q, k, v, size = qkv_and_size(head_dim)
        assert attention_with_channel(q, k, v, size).shape[-1] == head_dim
        assert widths.pop() == (width, width, width)
    proportional_attention(q, k, v, size, formulation="mask")
    assert widths.pop() == (64, 64, 64)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_dropout_keeps_the_expectation_and_has_the_variance_of_dropped_weights(formulation):
    # Many copies of one small problem in a batch: SDPA draws an independent dropout
    # mask for each. With weights a_j kept with probability 1 - p and rescaled by
    # 1 / (1 - p), every output o = sum_j a_j m_j v_j / (1 - p) has the mean of the
    # output without dropout and the variance p / (1 - p) sum_j a_j^2 v_j^2. Ignoring
    # dropout gives no variance; forgetting the rescaling, or dropping anything but the
    # weights (the size channel, say), moves the mean or the variance.
    copies, p = 20_000, 0.3
    q, k, v, size = qkv_and_size(6, batch=1, heads=1, tokens=5)
    weights = ((q @ k.mT) * 6**-0.5 + size.log().view(1, 1, 1, 5)).softmax(-1)
    mean = weights @ v
    variance = p / (1 - p) * (weights**2 @ v**2)
    out = proportional_attention(*(x.expand(copies, -1, -1, -1) for x in (q, k, v)), size.expand(copies, -1, -1),
                                 dropout_p=p, formulation=formulation)
    standard_error = (variance / copies).sqrt()
    assert ((out.mean(0) - mean[0]).abs() < 5 * standard_error[0]).all()
    torch.testing.assert_close(out.var(0), variance[0], rtol=0.1, atol=0)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_dropout_of_every_weight_gives_zeros_and_no_dropout_is_deterministic(formulation):
    q, k, v, size = qkv_and_size(12)
    assert torch.equal(proportional_attention(q, k, v, size, dropout_p=1.0, formulation=formulation),
                       torch.zeros_like(q))
    first = proportional_attention(q, k, v, size, formulation=formulation)
    assert torch.equal(proportional_attention(q, k, v, size, formulation=formulation), first)


def test_the_channel_carries_gradients_like_the_mask():
    q, k, v, size = qkv_and_size(12, dtype=torch.float64)
    size = size.double()
    inputs = [x.requires_grad_() for x in (q, k, v)]
    grads = [torch.autograd.grad(attention(*inputs, size).square().sum(), inputs)
             for attention in (attention_with_mask, attention_with_channel)]
    for from_mask, from_channel in zip(*grads):
        torch.testing.assert_close(from_channel, from_mask)


def test_cuda_gets_the_channel_and_the_cpu_the_mask():
    assert default_formulation(torch.device("cuda")) == "channel"
    assert default_formulation(torch.device("cpu")) == "mask"


def test_an_unknown_formulation_is_refused():
    q, k, v, size = qkv_and_size(8)
    with pytest.raises(ValueError, match="channel"):
        proportional_attention(q, k, v, size, formulation="flex")


# --- a key bias on a language model's mask ------------------------------------------------


@pytest.mark.parametrize("given", ["none", "bool", "float"])
def test_a_key_biased_by_log_k_in_a_causal_mask_acts_like_k_copies(given):
    """Causal attention of 5 queries over 5 keys, key 1 biased by log 3, equals causal
    attention over the same sequence with key 1 written 3 times, whatever form the mask
    takes (None: causal; a boolean one; a float one)."""
    q, k, v = torch.randn(3, 2, 2, 5, 8, dtype=torch.float64).unbind(0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    mask = {"none": None, "bool": causal,
            "float": torch.zeros(1, 1, 5, 5, dtype=torch.float64).masked_fill(~causal, float("-inf"))}[given]
    bias = torch.zeros(2, 5, dtype=torch.float64)
    bias[:, 1] = torch.tensor(3.0).log()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_with_key_bias(mask, bias, 5, torch.float64))
    repeat = torch.tensor([0, 1, 1, 1, 2, 3, 4])
    long_causal = torch.ones(7, 7, dtype=torch.bool).tril()[[0, 3, 4, 5, 6]]  # query i: its prefix, all copies
    expected = F.scaled_dot_product_attention(q, k[:, :, repeat], v[:, :, repeat], attn_mask=long_causal)
    torch.testing.assert_close(out, expected)


def test_a_decoding_query_sees_every_key_and_a_masked_key_stays_masked():
    bias = torch.tensor([[0.0, 2.0, 0.0]])
    assert mask_with_key_bias(None, bias, 1, torch.float32).tolist() == [[[[0.0, 2.0, 0.0]]]]
    padded = torch.tensor([[[[False, True, True]]]])
    masked = mask_with_key_bias(padded, bias, 1, torch.float32)
    assert masked[0, 0, 0, 0] == torch.finfo(torch.float32).min and masked[0, 0, 0, 1:].tolist() == [2.0, 0.0]
