"""Proportional attention: softmax(QK^T / sqrt(d) + log s).

A key that stands for s merged patches gets the attention weight of s identical
keys. The bias goes to ``F.scaled_dot_product_attention`` as a float mask, so the
fused kernels stay in use; before the first merge no mask is passed at all.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def log_size_bias(size: Tensor, dtype) -> Tensor:
    """The additive attention bias for token sizes (B, N, 1): (B, 1, 1, N), in ``dtype``."""
    bias = size.view(size.shape[0], 1, 1, size.shape[1]).log()
    return bias if bias.dtype == dtype else bias.to(dtype)


def proportional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    size: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Multi-head attention in which key j counts ``size[j]`` times:
    ``softmax(QK^T * scale + log s) V``. With ``size=None`` this is exactly
    ``F.scaled_dot_product_attention``.

    Args:
        q, k, v: (B, H, N, D) queries, keys and values.
        size: (B, N, 1) sizes of the tokens, or ``None`` for no bias.
        dropout_p: attention dropout, as ``F.scaled_dot_product_attention`` takes it.
        scale: the logits' scale (default: ``D ** -0.5``).

    Returns:
        (B, H, N, D) the attended values.
    """
    mask = None if size is None else log_size_bias(size, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
