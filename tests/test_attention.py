import torch
import torch.nn.functional as F

from tokenmerge.attention import proportional_attention


def test_without_sizes_it_is_plain_sdpa():
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    assert torch.equal(proportional_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_token_with_size_k_acts_like_k_copies():
    q, k, v = torch.randn(3, 2, 3, 6, 8, dtype=torch.float64).unbind(0)
    copies = 4
    # Sequence with key/value 2 repeated `copies` times...
    repeat = torch.tensor([0, 1] + [2] * copies + [3, 4, 5])
    out_repeated = F.scaled_dot_product_attention(q, k[:, :, repeat], v[:, :, repeat])
    # ... equals the sequence with it once, of size `copies`.
    size = torch.ones(2, 6, 1, dtype=torch.float64)
    size[:, 2] = copies
    out_sized = proportional_attention(q, k, v, size)
    torch.testing.assert_close(out_sized, out_repeated)


def test_matches_explicit_softmax_with_log_size_bias():
    q, k, v = torch.randn(3, 1, 2, 5, 4, dtype=torch.float64).unbind(0)
    size = torch.tensor([1.0, 3, 2, 1, 7], dtype=torch.float64).view(1, 5, 1)
    logits = q @ k.transpose(-1, -2) / 2 + size.log().view(1, 1, 1, 5)
    torch.testing.assert_close(proportional_attention(q, k, v, size), logits.softmax(-1) @ v)
