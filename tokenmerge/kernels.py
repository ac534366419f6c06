"""The tuned merge: the same size-weighted averages as :func:`tokenmerge.merge.merge_wavg`,
arranged for speed, and tested for equality against it.

* Row numbers: a merge selects and adds whole rows of the batch flattened to
  (B * N, C), several times faster on the CPU than ``gather`` and ``scatter`` with
  expanded indices. The rows that depend only on shapes are cached (:func:`shape_cache`).
* One formulation of the average for every input (:func:`merge_weighted`): it reads
  and writes the features once and works on the merged rows only, with its gradient
  written by hand (:class:`_CorrectedRows`). The sizes as an extra feature channel
  (one gather and one row addition for features and sizes together, fewer operations)
  measured slower on the CPU, at batch 1 and much slower at batch 32.
* Row additions in a fixed order (:func:`add_rows`): several merged tokens joining one
  token are added one after the other in input order, on every device.

What an image's tokens merge into never depends on the rest of its batch: no path is
chosen by the batch size, and every sum is taken in an order that is the same alone
and in a batch, so a merged image's outputs are the same bits in either (float32
sums differing in their last bits could round to different half-precision values
and then choose other merges downstream). Sizes are float32, and half-precision
features are averaged in float32 and rounded once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import shape_cache
from .merge import GridMatching, Matching, Rows, descending_order, in_index_order


def rows(matching: Matching) -> Rows:
    """The row numbers of ``matching``, computed once per matching."""
    if matching.rows is None:
        order, r = matching.order, matching.r
        grid = _row_grid(order.shape[0], matching.num_tokens, matching.num_protected, r, order.device)
        a_rows = torch.add(grid.a_offset, order, alpha=2)
        matching.rows = Rows(
            output=torch.cat([grid.protected_rows, a_rows[:, r:], grid.b_rows], dim=1).view(-1),
            merged=a_rows[:, :r].reshape(-1),
            destination=matching.destination.add(grid.destination_offset).view(-1),
        )
    return matching.rows


@dataclass(frozen=True)
class _RowGrid:
    """Row numbers that depend only on the shapes of a merge step."""

    protected_rows: Tensor  # (B, p)
    b_rows: Tensor  # (B, |B|)
    a_offset: Tensor  # (B, 1) row of the first A token
    destination_offset: Tensor  # (B, 1) output row of the first B token


@shape_cache
def _row_grid(batch: int, num_tokens: int, num_protected: int, r: int, device: torch.device) -> _RowGrid:
    """Made outside inference mode, so that a grid first built under
    ``torch.inference_mode`` also serves training."""
    p = num_protected
    num_a, num_b = (num_tokens - p + 1) // 2, (num_tokens - p) // 2
    with torch.inference_mode(False):
        image_row = torch.arange(batch, device=device).unsqueeze(1) * num_tokens
        output_image_row = torch.arange(batch, device=device).unsqueeze(1) * (num_tokens - r)
        return _RowGrid(
            protected_rows=image_row + torch.arange(p, device=device),
            b_rows=image_row + p + 1 + 2 * torch.arange(num_b, device=device),
            a_offset=image_row + p,
            destination_offset=output_image_row + p + num_a - r,
        )


@shape_cache
def _ones(num_rows: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.ones(num_rows, 1, device=device)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def add_rows(out: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """``out[rows[i]] += values[i]`` in place for (M, C) ``values``, repeated rows adding
    up in the order of ``rows``. Deterministic on every device, so that an image's sums
    are the same bits alone and in a batch: on the CPU ``scatter_add_`` with the rows
    expanded over the columns adds them one after another (what ``index_add_`` runs
    there, without its own index bookkeeping; ``index_put_`` with accumulation runs in
    parallel and is not deterministic), and on a GPU ``index_put_`` with accumulation
    sorts the rows stably and adds repeated ones in order (its ``index_add_`` and
    ``scatter_add_`` use atomic additions, whose order varies from run to run)."""
    if out.device.type == "cpu":
        return out.scatter_add_(0, rows.unsqueeze(1).expand(-1, values.shape[1]), values)
    return out.index_put_((rows,), values, accumulate=True)


def merged_sizes(size: Tensor | None, matching: Matching, batch: int) -> tuple[Tensor, Tensor]:
    """(sizes of the merged A tokens, all sizes after the merge), both flat (rows, 1), float32."""
    at = rows(matching)
    if size is None:
        moved = _ones(batch * matching.r, matching.order.device)
        kept = _ones(batch * (matching.num_tokens - matching.r), matching.order.device)
        return moved, add_rows(kept.clone(), at.destination, moved)
    size = size.reshape(-1, 1)
    moved = size.index_select(0, at.merged)
    return moved, add_rows(size.index_select(0, at.output), at.destination, moved)


def merge_weighted(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Merge (B, N, C) features as size-weighted averages; returns the new features
    (B, N - r, C) and sizes (B, N - r, 1). ``size`` is (B, N, 1) or ``None`` while every
    token stands for one patch.

    A destination token b that receives tokens a_m becomes
    ``b + sum_m (a_m - b) * s_m / S``, with S its merged size: one gather of the
    output plus work on the r merged rows only."""
    batch, _, channels = x.shape
    moved_size, new_size = merged_sizes(size, matching, batch)
    weight = moved_size / new_size.index_select(0, rows(matching).destination)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _CorrectedRows.apply(_flat(x), matching, weight)
    else:
        out = _corrected_rows(_flat(x), matching, weight)
    shape = (batch, matching.num_tokens - matching.r)
    return out.view(*shape, channels), new_size.view(*shape, 1)


def _corrected_rows(flat: Tensor, matching: Matching, weight: Tensor) -> Tensor:
    """The output rows of a merge of (B * N, C) rows, merged rows weighted by ``weight``
    (B * r, 1) as in :func:`merge_weighted`; half precision is computed in float32
    and rounded once."""
    at = rows(matching)
    out = _wide(flat.index_select(0, at.output))
    moved = _wide(flat.index_select(0, at.merged))
    correction = moved.sub_(out.index_select(0, at.destination)).mul_(weight)
    return add_rows(out, at.destination, correction).to(flat.dtype)


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
        at = rows(ctx.matching)
        # d out[b] / d a_m = w_m and d out[b] / d b = 1 - sum_m w_m, for every a_m merged into b.
        wide = _wide(grad)
        to_moved = wide.index_select(0, at.destination).mul_(weight)
        grad_flat = wide.new_empty(ctx.num_rows, grad.shape[1])
        grad_flat.index_copy_(0, at.output, wide)
        grad_flat.index_copy_(0, at.merged, to_moved)
        add_rows(grad_flat, at.output.index_select(0, at.destination), to_moved.neg())
        return grad_flat.to(grad.dtype), None, None


def _wide(x: Tensor) -> Tensor:
    """Half precision as float32, for sums; other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --- Grid merges (ToMe for Stable Diffusion), as row numbers ----------------------------------


@dataclass(frozen=True)
class GridRows:
    """Row numbers of one grid merge (:class:`tokenmerge.merge.GridMatching`) for the batch
    flattened to (B * N, C): a merge is one row gather, one row addition and a scale of
    the destinations; an unmerge is one row gather."""

    output: Tensor  # (B * (N - r),) input row of every merged token: kept sources, then destinations
    merged: Tensor  # (B * r,) input row of every merged source
    destination: Tensor  # (B * r,) output row that every merged source is added into
    inverse_count: Tensor  # (B, D, 1) one over the tokens every destination averages
    spread: Tensor  # (B * N,) output row whose features every input token takes back
    num_kept: int  # kept sources per row


def grid_rows(matching: GridMatching) -> GridRows:
    """The row numbers of ``matching``: made once per plan, used by every branch."""
    batch, r = matching.merged.shape
    num_tokens, num_sources = matching.num_tokens, matching.sources.shape[0]
    num_destinations, num_kept = num_tokens - num_sources, num_sources - r
    device = matching.merged.device
    input_start = torch.arange(batch, device=device).unsqueeze(1) * num_tokens
    output_start = torch.arange(batch, device=device).unsqueeze(1) * (num_tokens - r)
    source_tokens = matching.sources.expand(batch, -1)
    kept_tokens, merged_tokens = source_tokens.gather(1, matching.kept), source_tokens.gather(1, matching.merged)
    output = torch.cat([kept_tokens, matching.destinations.expand(batch, -1)], dim=1) + input_start
    destination = matching.partner + num_kept
    counts = torch.ones(batch, num_destinations, device=device).scatter_add_(
        1, matching.partner, torch.ones(batch, r, device=device))
    # every input token's output row: its own for kept sources and destinations, its partner's for merged ones
    spread = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    spread.scatter_(1, output - input_start, torch.arange(num_tokens - r, device=device).expand(batch, -1))
    spread.scatter_(1, merged_tokens, destination)
    return GridRows(
        output=output.view(-1),
        merged=(merged_tokens + input_start).view(-1),
        destination=(destination + output_start).view(-1),
        inverse_count=counts.reciprocal_().unsqueeze(-1),
        spread=(spread + output_start).view(-1),
        num_kept=num_kept,
    )


def merge_mean_rows(x: Tensor, at: GridRows) -> Tensor:
    """:func:`tokenmerge.merge.merge_mean` of (B, N, C) ``x`` by row numbers; half precision
    is summed in float32 and rounded once."""
    batch, channels = x.shape[0], x.shape[-1]
    flat = _flat(x)
    out = _wide(flat.index_select(0, at.output))
    add_rows(out, at.destination, _wide(flat.index_select(0, at.merged)))
    out = out.view(batch, -1, channels)
    out[:, at.num_kept:].mul_(at.inverse_count.to(out.dtype))
    return out.to(x.dtype)


def unmerge_rows(x: Tensor, at: GridRows) -> Tensor:
    """:func:`tokenmerge.merge.unmerge_grid` by row numbers: one gather."""
    batch, _, channels = x.shape
    return _flat(x).index_select(0, at.spread).view(batch, -1, channels)


def grid_matching(metric: Tensor, destinations: Tensor, sources: Tensor, r: int) -> GridMatching:
    """:func:`tokenmerge.merge.grid_bipartite_matching`, equal to float rounding, with less
    work: only the destinations are normalized, since a source's norm changes none of its
    similarities' order, only its best score, which is divided by it afterwards (a (B, S)
    division instead of normalizing (B, N, C) features)."""
    if not 0 <= r <= sources.shape[0]:
        raise ValueError(f"r={r} cannot be merged from {sources.shape[0]} sources")
    metric = metric.detach()
    targets = metric.index_select(1, destinations)
    targets = targets / torch.linalg.vector_norm(targets, dim=-1, keepdim=True).clamp_min(1e-12)
    candidates = metric.index_select(1, sources)
    best_score, best = torch.bmm(candidates, targets.mT).max(dim=-1)
    best_score = best_score / torch.linalg.vector_norm(candidates, dim=-1).clamp_min(1e-12)
    order = in_index_order(descending_order(best_score), r)
    merged = order[:, :r]
    return GridMatching(destinations, sources, merged, order[:, r:], best.gather(1, merged))
