"""Token reduction methods: what a block does with its tokens between attention and MLP.

A method works in two steps. ``plan`` decides which tokens go where from the block's
attention keys (B, heads, N, D), ``r`` and the number of protected tokens; adapters
call it as soon as the keys exist, before the attention itself, so that the small
operations of planning run while the keys are still in cache and between the large
operations rather than in one long single-threaded gap. ``reduce`` then applies the
plan to the tokens ``x`` (B, N, C) after the attention branch, with the current sizes
(B, N, 1) or None and the current source map (B, N0) or None, and returns the reduced
tokens, sizes and source map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .merge import Matching, bipartite_soft_matching, merge_source, merge_weighted

Reduction = tuple[Tensor, Optional[Tensor], Optional[Tensor]]


@dataclass(frozen=True)
class Method:
    """A token reduction method: ``plan(keys, r, num_protected)`` and
    ``reduce(x, size, source, plan)``, as described in the module docstring."""

    plan: Callable[[Tensor, int, int], Any]
    reduce: Callable[[Tensor, Optional[Tensor], Optional[Tensor], Any], Reduction]


def sum_over_heads(keys: Tensor) -> Tensor:
    """(B, heads, N, D) keys summed over heads. Keys sliced out of a fused qkv
    projection are strided; for large batches a contiguous copy first makes the sum
    several times faster on the CPU, for small ones the copy costs more than it saves."""
    if not keys.is_contiguous() and keys.numel() > 1 << 17:
        keys = keys.contiguous()
    return keys.sum(dim=1)


def match_keys(keys: Tensor, r: int, num_protected: int) -> Matching:
    """Bipartite soft matching on the keys averaged over heads (summed: the cosine
    similarity is the same, one operation fewer)."""
    return bipartite_soft_matching(sum_over_heads(keys), r, num_protected)


def merge(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], matching: Matching) -> Reduction:
    """Size-weighted averages of the matched tokens, and the source map followed."""
    if source is not None:
        source = merge_source(source, matching)
    x, size = merge_weighted(x, size, matching)
    return x, size, source


def keep_first(keys: Tensor, r: int, num_protected: int) -> int:
    """The number of tokens to keep: all but the last r."""
    return keys.shape[2] - r


def cut(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], keep: int) -> Reduction:
    """Drop all tokens after the first ``keep`` without looking at them: the same token
    counts as merging at no cost, the speed limit that merging is measured against.
    Not a method to use for accuracy. Dropped input tokens get source -1."""
    if source is not None:
        source = torch.where(source < keep, source, -1)
    return x[:, :keep], (None if size is None else size[:, :keep]), source


METHODS: dict[str, Method] = {
    "tome": Method(match_keys, merge),
    "cut": Method(keep_first, cut),
}


def resolve(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown token reduction method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
