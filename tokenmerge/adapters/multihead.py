"""``torch.nn.MultiheadAttention`` as self-attention with proportional attention.

Several libraries (open_clip, torchvision) build their blocks on PyTorch's own
attention module, which gives no access to its keys and takes no per-key bias. This
recomputes the same attention from the module's parameters, with the log-size bias
and a planning callback on the queries and keys, for the configurations those blocks use.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import proportional_attention
from ..flops import linear_flops_per_token

T = TypeVar("T")


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
        raise TypeError(f"tokenmerge does not support nn.MultiheadAttention with add_bias_kv or add_zero_attn ({where})")


def multihead_attention_with_plan(
    attention: torch.nn.MultiheadAttention,
    x: Tensor,
    size: Optional[Tensor],
    plan: Callable[[Tensor, Tensor], T],
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, T]:
    """Self-attention of ``attention`` over ``x`` (B, N, E), batch first whatever the
    module's ``batch_first``, in which key j counts ``size[j]`` times; also returns
    what ``plan`` makes of the queries and keys (B, heads, N, head_dim), called as
    soon as they exist. ``mask`` is an optional additive float mask broadcastable to
    (B, heads, N, N), added to the log-size bias."""
    batch, num_tokens, width = x.shape
    heads = attention.num_heads
    qkv = F.linear(x, attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.view(batch, num_tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    planned = plan(q, k)
    dropout = attention.dropout if attention.training else 0.0
    if mask is None:
        out = proportional_attention(q, k, v, size, dropout_p=dropout)
    else:
        bias = mask if size is None else mask + size.view(batch, 1, 1, -1).log().to(mask.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout)
    out = out.transpose(1, 2).reshape(batch, num_tokens, width)
    return attention.out_proj(out), planned


def multihead_linear_flops(attention: torch.nn.MultiheadAttention) -> int:
    """FLOPs per token of the module's projections: the packed input projection (a
    bare parameter, not an ``nn.Linear``) and the output projection."""
    return 2 * attention.in_proj_weight.numel() + linear_flops_per_token(attention.out_proj)
