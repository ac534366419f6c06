"""Token merging as pure tensor functions: bipartite soft matching, size-weighted
merges, source maps and unmerging. Nothing here knows about models.

Token layout: ``num_protected`` tokens (class, distillation, register tokens) come
first and are never merged. The remaining tokens are split alternately into set A
(even positions) and set B (odd positions). After a merge the layout is
``[protected | unmerged A tokens | B tokens]``: every merged A token has been folded
into the B token it matched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Matching:
    """Which tokens one merge step combines, for every image of a batch.

    ``kept`` and ``merged`` index set A, ``destination`` indexes set B; row b of each
    belongs to image b.
    """

    num_protected: int
    kept: Tensor  # (B, |A| - r) A tokens that survive unchanged
    merged: Tensor  # (B, r) A tokens folded into a B token
    destination: Tensor  # (B, r) the B token each merged A token joins

    @property
    def r(self) -> int:
        return self.merged.shape[1]


def max_merges(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r one block may take: half of its mergeable tokens, rounded down."""
    return max(num_tokens - num_protected, 0) // 2


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``: (B, Na, Nb)."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.transpose(-1, -2)


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0) -> Matching:
    """Link every A token to its most similar B token and keep the ``r`` best links.

    ``metric`` is (B, N, C): one feature vector per token (ToMe uses the attention
    keys averaged over heads). ``r`` must not exceed ``max_merges``.
    """
    num_tokens = metric.shape[1]
    if not 0 <= r <= max_merges(num_tokens, num_protected):
        raise ValueError(
            f"r={r} cannot be merged from {num_tokens} tokens with {num_protected} protected; "
            f"at most {max_merges(num_tokens, num_protected)} per block"
        )
    mergeable = metric[:, num_protected:]
    similarity = cosine_similarity_matrix(mergeable[:, 0::2], mergeable[:, 1::2])
    best_score, best_partner = similarity.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    return Matching(
        num_protected=num_protected,
        kept=order[:, r:],
        merged=merged,
        destination=best_partner.gather(1, merged),
    )


def _expand(index: Tensor, x: Tensor) -> Tensor:
    return index.unsqueeze(-1).expand(-1, -1, x.shape[-1])


def merge_sum(x: Tensor, matching: Matching) -> Tensor:
    """Apply a matching to (B, N, C) features, adding merged tokens together."""
    p = matching.num_protected
    protected, a, b = x[:, :p], x[:, p::2], x[:, p + 1::2]
    kept = a.gather(1, _expand(matching.kept, a))
    if matching.r:
        moved = a.gather(1, _expand(matching.merged, a))
        b = b.scatter_add(1, _expand(matching.destination, b), moved)
    return torch.cat([protected, kept, b], dim=1)


def merge_weighted(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Merge features as size-weighted averages; returns the new features and sizes.

    ``size`` is (B, N, 1), the number of input patches each token stands for, or
    ``None`` when every token still stands for one. Arithmetic runs in float32 so
    that half-precision features neither overflow nor lose the sizes' range.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
    weighted = merge_sum(x.float() * size, matching)
    size = merge_sum(size, matching)
    return (weighted / size).to(x.dtype), size


def initial_source(batch_size: int, num_tokens: int, device: torch.device | None = None) -> Tensor:
    """The source map before any merge: every input token is its own token."""
    return torch.arange(num_tokens, device=device).expand(batch_size, -1)


def merge_source(source: Tensor, matching: Matching, num_tokens: int) -> Tensor:
    """Follow a matching in a source map.

    ``source`` is (B, N0): for every input token, the index of the current token
    (out of ``num_tokens``) it belongs to. Returns the same map after the merge.
    Memory is linear in N0, unlike a (B, N, N0) membership matrix.
    """
    p = matching.num_protected
    batch = source.shape[0]
    num_a = (num_tokens - p + 1) // 2
    num_kept = num_a - matching.r
    device = source.device
    first_b = p + num_kept
    position_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
    position_a.scatter_(1, matching.kept, (p + torch.arange(num_kept, device=device)).expand(batch, -1))
    position_a.scatter_(1, matching.merged, first_b + matching.destination)
    position = torch.arange(num_tokens, device=device).repeat(batch, 1)
    position[:, p::2] = position_a
    position[:, p + 1::2] = first_b + torch.arange((num_tokens - p) // 2, device=device)
    return position.gather(1, source)


def unmerge(x: Tensor, source: Tensor) -> Tensor:
    """Spread merged (B, N, C) tokens back over the input tokens: (B, N0, C)."""
    return x.gather(1, _expand(source, x))
