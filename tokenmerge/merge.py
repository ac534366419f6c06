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
from functools import lru_cache

import torch
from torch import Tensor


class Matching:
    """Which tokens one merge step combines, for every image of a batch.

    Built from ``order`` (B, |A|), the A tokens from most to least similar to their
    best B token, and ``partner`` (B, |A|), that B token: the first r in ``order``
    are merged, the rest kept. The row numbers that the merge needs are computed at
    once, for the batch flattened to (B * N, C): selecting and adding whole rows
    (:func:`add_rows`) is several times faster on the CPU than ``gather`` and
    ``scatter`` with expanded indices.
    """

    __slots__ = ("num_protected", "num_tokens", "r", "order", "partner", "output_rows", "merged_rows",
                 "destination_rows")

    def __init__(self, order: Tensor, partner: Tensor, r: int, num_protected: int, num_tokens: int):
        self.order, self.partner, self.r = order, partner, r
        self.num_protected, self.num_tokens = num_protected, num_tokens
        grid = _row_grid(order.shape[0], num_tokens, num_protected, r, order.device)
        a_rows = torch.add(grid.a_offset, order, alpha=2)
        merged = order[:, :r]
        #: (B * (N - r),) input row of every output token before merged tokens are
        #: added in: protected tokens, kept A tokens, then all B tokens.
        self.output_rows = torch.cat([grid.protected_rows, a_rows[:, r:], grid.b_rows], dim=1).view(-1)
        #: (B * r,) input row of every merged A token.
        self.merged_rows = a_rows[:, :r].reshape(-1)
        #: (B * r,) output row that every merged A token is added into.
        self.destination_rows = partner.gather(1, merged).add_(grid.destination_offset).view(-1)

    @property
    def kept(self) -> Tensor:
        """(B, |A| - r) A tokens that survive unchanged."""
        return self.order[:, self.r:]

    @property
    def merged(self) -> Tensor:
        """(B, r) A tokens folded into a B token."""
        return self.order[:, :self.r]

    @property
    def destination(self) -> Tensor:
        """(B, r) the B token each merged A token joins."""
        return self.partner.gather(1, self.merged)


@dataclass(frozen=True)
class _RowGrid:
    """Row numbers that depend only on the shapes of a merge step."""

    protected_rows: Tensor  # (B, p)
    b_rows: Tensor  # (B, |B|)
    a_offset: Tensor  # (B, 1) row of the first A token
    destination_offset: Tensor  # (B, 1) output row of the first B token


@lru_cache(maxsize=256)
def _row_grid(batch: int, num_tokens: int, num_protected: int, r: int, device: torch.device) -> _RowGrid:
    """Cached across forward passes; made outside inference mode so that a grid first
    built under ``torch.inference_mode`` also serves training."""
    p = num_protected
    num_a, num_b = (num_tokens - p + 1) // 2, (num_tokens - p) // 2
    with torch.inference_mode(False):
        return _make_row_grid(batch, num_tokens, p, r, num_a, num_b, device)


def _make_row_grid(batch, num_tokens, p, r, num_a, num_b, device) -> _RowGrid:
    image_row = torch.arange(batch, device=device).unsqueeze(1) * num_tokens
    output_image_row = torch.arange(batch, device=device).unsqueeze(1) * (num_tokens - r)
    return _RowGrid(
        protected_rows=image_row + torch.arange(p, device=device),
        b_rows=image_row + p + 1 + 2 * torch.arange(num_b, device=device),
        a_offset=image_row + p,
        destination_offset=output_image_row + p + num_a - r,
    )


def max_merges(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r one block may take: half of its mergeable tokens, rounded down."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0) -> Matching:
    """Link every A token to its most similar B token and keep the ``r`` best links.

    ``metric`` is (B, N, C): one feature vector per token (ToMe uses the attention
    keys averaged over heads; any positive multiple, such as their sum, gives the same
    cosine similarities). ``r`` must not exceed ``max_merges``. The matching picks
    indices and has no gradient, so ``metric`` is detached: in training nothing of it
    is recorded for the backward pass.
    """
    num_tokens = metric.shape[1]
    if not 0 <= r <= max_merges(num_tokens, num_protected):
        raise ValueError(
            f"r={r} cannot be merged from {num_tokens} tokens with {num_protected} protected; "
            f"at most {max_merges(num_tokens, num_protected)} per block"
        )
    p = num_protected
    if metric.requires_grad:
        metric = metric.detach()
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min_(1e-12)
    similarity = torch.bmm(metric[:, p::2], metric[:, p + 1::2].mT)
    best_score, partner = similarity.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    return Matching(order, partner, r, num_protected, num_tokens)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def merge_sum(x: Tensor, matching: Matching) -> Tensor:
    """Apply a matching to (B, N, C) features, adding merged tokens together."""
    flat = _flat(x)
    out = flat.index_select(0, matching.output_rows)
    add_rows(out, matching.destination_rows, flat.index_select(0, matching.merged_rows))
    return out.view(x.shape[0], -1, x.shape[-1])


# Below this many added values ``index_put_`` adds rows faster than ``index_add_`` on
# the CPU; above it, and on any GPU, ``index_add_`` is much faster (``index_put_`` with
# accumulation sorts its indices first, in several kernels on a GPU).
FEW_ADDED_VALUES = 1 << 14


def add_rows(out: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """``out[rows[i]] += values[i]`` in place for (M, C) ``values``, repeated rows adding up."""
    if out.device.type == "cpu" and values.numel() < FEW_ADDED_VALUES:
        return out.index_put_((rows,), values, accumulate=True)
    return out.index_add_(0, rows, values)


# Below this many feature values a merge is bound by the number of operations, above
# it by memory traffic (measured on the CPU; on a GPU both paths are cheap).
FEW_VALUES = 1 << 18


def merge_weighted(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Merge features as size-weighted averages; returns the new features and sizes.

    ``size`` is (B, N, 1), the number of input patches each token stands for, or
    ``None`` when every token still stands for one. Sizes are float32, and
    half-precision features are weighed in float32. Two exact formulations of the
    same average: for small inputs the one with the fewest operations, for large
    ones the one that reads and writes the features only once.
    """
    if x.numel() < FEW_VALUES:
        return _merge_scaled_sums(x, size, matching)
    return _merge_corrections(x, size, matching)


def merged_sizes(size: Tensor | None, matching: Matching, batch: int) -> tuple[Tensor, Tensor]:
    """(sizes of the merged A tokens, all sizes after the merge), both flat (rows, 1)."""
    if size is None:
        moved = _ones(batch * matching.r, matching.order.device)
        kept = _ones(batch * (matching.num_tokens - matching.r), matching.order.device)
        return moved, add_rows(kept.clone(), matching.destination_rows, moved)
    size = size.reshape(-1, 1)
    moved = size.index_select(0, matching.merged_rows)
    new_size = add_rows(size.index_select(0, matching.output_rows), matching.destination_rows, moved)
    return moved, new_size


def _merge_scaled_sums(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Sum size-scaled features, divide by the summed sizes."""
    batch, _, channels = x.shape
    _, new_size = merged_sizes(size, matching, batch)
    scaled = _flat(x)
    if _is_half(x):
        scaled = scaled.float()
    if size is not None:
        scaled = scaled * size.reshape(-1, 1)
    out = scaled.index_select(0, matching.output_rows)
    add_rows(out, matching.destination_rows, scaled.index_select(0, matching.merged_rows))
    return out.div_(new_size).to(x.dtype).view(batch, -1, channels), new_size.view(batch, -1, 1)


def _merge_corrections(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """A destination token b that receives tokens a_m becomes
    ``b + sum_m (a_m - b) * s_m / S``, with S its merged size: one gather of the
    output plus work on the r merged rows only."""
    batch, _, channels = x.shape
    moved_size, new_size = merged_sizes(size, matching, batch)
    weight = moved_size / new_size.index_select(0, matching.destination_rows)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _CorrectedRows.apply(_flat(x), matching, weight)
    else:
        out = _corrected_rows(_flat(x), matching, weight)
    return out.view(batch, -1, channels), new_size.view(batch, -1, 1)


def _corrected_rows(flat: Tensor, matching: Matching, weight: Tensor) -> Tensor:
    """The output rows of a merge of (B * N, C) rows, merged rows weighted by ``weight``
    (B * r, 1) as in :func:`_merge_corrections`; half precision is corrected in float32."""
    out = flat.index_select(0, matching.output_rows)
    moved = flat.index_select(0, matching.merged_rows)
    receiving = out.index_select(0, matching.destination_rows)
    if _is_half(flat):
        correction = (moved.float() - receiving.float()).mul_(weight).to(flat.dtype)
    else:
        correction = moved.sub_(receiving).mul_(weight)
    return add_rows(out, matching.destination_rows, correction)


class _CorrectedRows(torch.autograd.Function):
    """:func:`_corrected_rows` with its gradient written out. Autograd's own backward of
    the three row gathers fills and scatters into full-size zero buffers and adds them;
    this one writes every input row's gradient once (the output and merged rows
    together are all input rows), plus work on the merged rows only."""

    @staticmethod
    def forward(ctx, flat: Tensor, matching: Matching, weight: Tensor) -> Tensor:
        ctx.matching, ctx.num_rows = matching, flat.shape[0]
        ctx.save_for_backward(weight)
        return _corrected_rows(flat, matching, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        matching: Matching = ctx.matching
        # d out[b] / d a_m = w_m and d out[b] / d b = 1 - sum_m w_m, for every a_m merged into b.
        to_moved = grad.index_select(0, matching.destination_rows)
        to_moved = (to_moved.float() * weight).to(grad.dtype) if _is_half(grad) else to_moved.mul_(weight)
        grad_flat = grad.new_empty(ctx.num_rows, grad.shape[1])
        grad_flat.index_copy_(0, matching.output_rows, grad)
        grad_flat.index_copy_(0, matching.merged_rows, to_moved)
        add_rows(grad_flat, matching.output_rows.index_select(0, matching.destination_rows), to_moved.neg())
        return grad_flat, None, None


def _is_half(x: Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


@lru_cache(maxsize=64)
def _ones(rows: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.ones(rows, 1, device=device)


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Mean of (B, N, C) tokens over N in which each token counts as many times as the
    patches it stands for (sizes (B, N, 1)): the mean over patches of the unmerged
    tokens, for tokens that are averages. Half precision is averaged in float32."""
    return ((x.float() * size).sum(dim=1) / size.sum(dim=1)).to(x.dtype)


def initial_source(batch_size: int, num_tokens: int, device: torch.device | None = None) -> Tensor:
    """The source map before any merge: every input token is its own token."""
    return torch.arange(num_tokens, device=device).expand(batch_size, -1)


def merge_source(source: Tensor, matching: Matching) -> Tensor:
    """Follow a matching in a source map.

    ``source`` is (B, N0): for every input token, the index of the current token it
    belongs to. Returns the same map after the merge.
    Memory is linear in N0, unlike a (B, N, N0) membership matrix.
    """
    p, num_tokens = matching.num_protected, matching.num_tokens
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
    batch, num_tokens, channels = x.shape
    rows = source + torch.arange(batch, device=source.device).unsqueeze(1) * num_tokens
    return _flat(x).index_select(0, rows.view(-1)).view(batch, -1, channels)
