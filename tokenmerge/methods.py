"""Token reduction methods: what a block does with its tokens between attention and MLP.

Each method takes the block's tokens ``x`` (B, N, C), its attention keys (B, heads,
N, D), the current sizes (B, N, 1) or None, the current source map (B, N0) or None,
the number of tokens to remove ``r`` and the number of protected tokens, and returns
the reduced tokens, sizes and source map.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .merge import bipartite_soft_matching, merge_source, merge_weighted

Reduction = tuple[Tensor, Optional[Tensor], Optional[Tensor]]
Method = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor], int, int], Reduction]


def sum_over_heads(keys: Tensor) -> Tensor:
    """(B, heads, N, D) keys summed over heads. Keys sliced out of a fused qkv
    projection are strided; for large batches a contiguous copy first makes the sum
    several times faster on the CPU, for small ones the copy costs more than it saves."""
    if not keys.is_contiguous() and keys.numel() > 1 << 17:
        keys = keys.contiguous()
    return keys.sum(dim=1)


def tome(x: Tensor, keys: Tensor, size: Optional[Tensor], source: Optional[Tensor], r: int,
         num_protected: int) -> Reduction:
    """Token merging: bipartite soft matching on the keys averaged over heads (summed:
    the cosine similarity is the same, one operation fewer), size-weighted averages."""
    matching = bipartite_soft_matching(sum_over_heads(keys), r, num_protected)
    if source is not None:
        source = merge_source(source, matching)
    x, size = merge_weighted(x, size, matching)
    return x, size, source


def cut(x: Tensor, keys: Tensor, size: Optional[Tensor], source: Optional[Tensor], r: int,
        num_protected: int) -> Reduction:
    """Drop the last r tokens without looking at them: the same token counts as merging
    at no cost, the speed limit that merging is measured against. Not a method to use
    for accuracy. Dropped input tokens get source -1."""
    keep = x.shape[1] - r
    if source is not None:
        source = torch.where(source < keep, source, -1)
    return x[:, :keep], (None if size is None else size[:, :keep]), source


METHODS: dict[str, Method] = {"tome": tome, "cut": cut}


def resolve(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown token reduction method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
