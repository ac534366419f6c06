"""``torch.nn.MultiheadAttention`` as self-attention with proportional attention.

Several libraries (open_clip, torchvision) build their blocks on PyTorch's own
attention module, which gives no access to its keys and takes no per-key bias. This
recomputes the same attention from the module's parameters in the block template's
two steps (projections, then attention with the log-size bias), for the
configurations those blocks use.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import log_size_bias, proportional_attention
from ..block import Projected
from ..flops import linear_flops_per_token


def check_multihead(attention: torch.nn.Module, where: str) -> None:
    """Refuse the ``nn.MultiheadAttention`` features that self-attention over merged
    tokens cannot reproduce, naming the feature and the module."""
    if not isinstance(attention, torch.nn.MultiheadAttention):
        raise TypeError(
            f"tokenmerge does not support attention class {type(attention).__name__} ({where}); "
            "expected torch.nn.MultiheadAttention"
        )
    if not attention._qkv_same_embed_dim:
        raise TypeError(f"tokenmerge does not support nn.MultiheadAttention with kdim/vdim ({where})")
    if attention.bias_k is not None or attention.add_zero_attn:
        raise TypeError(
            f"tokenmerge does not support nn.MultiheadAttention with add_bias_kv or add_zero_attn ({where})"
        )


def multihead_project(attention: torch.nn.MultiheadAttention, x: Tensor) -> Projected:
    """The queries, keys and values (B, heads, N, head_dim) of ``attention`` as
    self-attention over ``x`` (B, N, E), batch first whatever the module's ``batch_first``."""
    batch, num_tokens, width = x.shape
    heads = attention.num_heads
    qkv = F.linear(x, attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.view(batch, num_tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return Projected(q, k, v)


def multihead_attend(
    attention: torch.nn.MultiheadAttention, projected: Projected, size: Optional[Tensor]
) -> Tensor:
    """The rest of ``attention``'s self-attention after :func:`multihead_project`, in
    which key j counts ``size[j]`` times: (B, N, E), batch first."""
    q, k, v = projected.q, projected.k, projected.v
    batch, _, num_tokens, _ = q.shape
    dropout = attention.dropout if attention.training else 0.0
    out = proportional_attention(q, k, v, size, dropout_p=dropout)
    return attention.out_proj(out.transpose(1, 2).reshape(batch, num_tokens, attention.embed_dim))


def multihead_linear_flops(attention: torch.nn.MultiheadAttention) -> int:
    """FLOPs per token of the module's projections: the packed input projection (a
    bare parameter, not an ``nn.Linear``) and the output projection."""
    return 2 * attention.in_proj_weight.numel() + linear_flops_per_token(attention.out_proj)


def multihead_size_mask(size: Tensor, num_heads: int, num_queries: int, dtype: torch.dtype) -> Tensor:
    """The log-size bias (B, N, 1 sizes) as the float ``attn_mask`` that
    ``nn.MultiheadAttention`` takes for ``num_queries`` queries attending to the N
    tokens: (B * heads, queries, N). For attention pooling over merged tokens."""
    batch, num_tokens = size.shape[:2]
    bias = log_size_bias(size, dtype).expand(batch, num_heads, num_queries, num_tokens)
    return bias.reshape(batch * num_heads, num_queries, num_tokens)
