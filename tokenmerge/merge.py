"""Token merging as pure tensor functions: bipartite soft matching, the size-weighted
merge, source maps and unmerging, written to be read. Nothing here knows about models;
:mod:`tokenmerge.kernels` holds the same merge tuned for speed.

Token layout: ``num_protected`` tokens (class, distillation, register tokens) come
first and are never merged. The remaining tokens are split alternately into set A
(even positions) and set B (odd positions). After a merge the layout is
``[protected | unmerged A tokens | B tokens]``, each group in its input order: every
merged A token has been folded into the B token it matched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import shape_cache


@dataclass(frozen=True)
class Rows:
    """Row numbers of one merge step, for the batch flattened to (B * N, C): what the
    tuned merge of :mod:`tokenmerge.kernels` computes from a :class:`Matching` and
    keeps on it."""

    output: Tensor  # (B * (N - r),) input row of every output token before merged ones are added in
    merged: Tensor  # (B * r,) input row of every merged A token
    destination: Tensor  # (B * r,) output row that every merged A token is added into


class Matching:
    """Which tokens one merge step combines, for every image of a batch.

    Built from ``order`` (B, |A|), the A tokens to merge and then those to keep, and
    ``partner`` (B, |A|), the best B token of each A token: the first r in ``order``
    are merged, the rest kept. ``rows`` holds the row numbers the tuned merge of
    :mod:`tokenmerge.kernels` computes from it, once.
    """

    __slots__ = ("num_protected", "num_tokens", "r", "order", "partner", "rows")

    def __init__(self, order: Tensor, partner: Tensor, r: int, num_protected: int, num_tokens: int):
        self.order, self.partner, self.r = order, partner, r
        self.num_protected, self.num_tokens = num_protected, num_tokens
        self.rows: Rows | None = None

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


def max_merges(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r one block may take: half of its mergeable tokens, rounded down."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(
    metric: Tensor, r: int, num_protected: int = 0, cost: Tensor | None = None
) -> Matching:
    """Link every A token to its most similar B token and keep the ``r`` best links.

    The matching picks indices and has no gradient, so ``metric`` is detached: in
    training nothing of it is recorded for the backward pass.

    Args:
        metric: (B, N, C), one feature vector per token (ToMe uses the attention keys
            averaged over heads; any positive multiple, such as their sum, gives the
            same cosine similarities).
        r: the number of links to keep, at most :func:`max_merges`.
        num_protected: leading tokens never merged (class, distillation, registers).
        cost: (B, N), what merging each token costs, if given: a link's score is its
            similarity less the costs of its two tokens, so costly tokens merge only
            with very similar ones.

    Returns:
        The :class:`Matching` of every image.

    Raises:
        ValueError: ``r`` is negative or more than the tokens allow.
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
    if cost is not None:
        cost = cost.detach()
        best_score = best_score - cost[:, p::2] - cost[:, p + 1::2].gather(1, partner)
    return Matching(in_index_order(descending_order(best_score), r), partner, r, num_protected, num_tokens)


def in_index_order(order: Tensor, r: int) -> Tensor:
    """``order`` with its first ``r`` entries (the merged A tokens) and the rest (the
    kept ones) each sorted by index. Which tokens merge is decided by the scores; where
    they go is not: kept in score order, scores a rounding apart (another batch size,
    another runtime) would reorder the tokens, and so the next block's A/B split.

    One sort does both groups: the kept entries are offset past every index first
    (:func:`kept_offset`), so they sort after the merged ones, and the offset is taken
    off again."""
    offset = kept_offset(order.shape[-1], r, order.device)
    return order.add(offset).sort(dim=-1).values.sub_(offset)


@shape_cache
def kept_offset(length: int, r: int, device: torch.device) -> Tensor:
    """(length,) 0 for the first ``r`` positions of an order and ``length`` for the rest.
    Made outside inference mode, so that an offset first made under
    ``torch.inference_mode`` also serves training."""
    with torch.inference_mode(False):
        return (torch.arange(length, device=device) >= r).long() * length


def descending_order(scores: Tensor) -> Tensor:
    """The indices that sort ``scores`` from high to low along the last dimension,
    equal scores in index order (a stable sort). ONNX has no stable sort, but its
    TopK puts equal values in index order too: exported to ONNX, this is a TopK."""
    if torch.onnx.is_in_onnx_export():
        return scores.topk(scores.shape[-1], dim=-1).indices
    return scores.argsort(dim=-1, descending=True, stable=True)


def merge_wavg(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """The paper's size-weighted merge, written plainly: every token weighed by the
    patches it stands for, each merged A token added into its B token, the sums divided
    by the summed sizes. Half precision is averaged in float32. The reference that the
    tuned merge in :mod:`tokenmerge.kernels` is tested against.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) float32 sizes, or ``None`` while every token stands for one patch.
        matching: what to merge, from :func:`bipartite_soft_matching`.

    Returns:
        The merged tokens (B, N - r, C) and their sizes (B, N - r, 1).
    """
    if size is None:
        size = torch.ones(*x.shape[:2], 1, device=x.device)
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    total = _merge_sums(size, matching)
    return (_merge_sums(wide * size, matching) / total).to(x.dtype), total


def _merge_sums(x: Tensor, matching: Matching) -> Tensor:
    """[protected | kept A | B with the merged A tokens added in], with gather and scatter."""
    p, channels = matching.num_protected, x.shape[-1]
    a, b = x[:, p::2], x[:, p + 1::2]

    def rows_of(index: Tensor) -> Tensor:
        return index.unsqueeze(-1).expand(-1, -1, channels)

    kept, merged = a.gather(1, rows_of(matching.kept)), a.gather(1, rows_of(matching.merged))
    return torch.cat([x[:, :p], kept, b.scatter_add(1, rows_of(matching.destination), merged)], dim=1)


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Mean over tokens in which each token counts as many times as the patches it
    stands for: the mean over patches of the unmerged tokens, for tokens that are
    averages. Half precision is averaged in float32.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) their sizes.

    Returns:
        (B, C) the means.
    """
    return ((x.float() * size).sum(dim=1) / size.sum(dim=1)).to(x.dtype)


def initial_source(batch_size: int, num_tokens: int, device: torch.device | None = None) -> Tensor:
    """The source map before any merge: every input token is its own token."""
    return torch.arange(num_tokens, device=device).expand(batch_size, -1)


def merge_source(source: Tensor, matching: Matching) -> Tensor:
    """Follow a matching in a source map. Memory is linear in N0, unlike a
    (B, N, N0) membership matrix.

    Args:
        source: (B, N0), for every input token the index of the current token it
            belongs to.
        matching: the merge to follow.

    Returns:
        The same map after the merge, (B, N0).
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
    """Spread merged tokens back over the input tokens: every input token takes the
    features of the token it ended up in.

    Args:
        x: (B, N, C) merged tokens.
        source: (B, N0) source map, as ``get_state(model).source`` holds it.

    Returns:
        (B, N0, C) one row per input token.
    """
    batch, num_tokens, channels = x.shape
    rows = source + torch.arange(batch, device=source.device).unsqueeze(1) * num_tokens
    return x.reshape(-1, channels).index_select(0, rows.view(-1)).view(batch, source.shape[1], channels)


# --- Grid destinations: ToMe for Stable Diffusion -------------------------------------------
#
# Diffusion models merge image tokens of a latent grid: one destination per ``sx`` x ``sy``
# cell of the grid, every other token a source; the most similar sources are averaged into
# their destinations before a branch and every token takes its merged token's output after
# it (:func:`unmerge_grid`). Merged layout: ``[kept sources | destinations]``, each group in
# token order.


@dataclass(frozen=True)
class GridMatching:
    """Which tokens one grid merge combines, for every row of a batch. ``destinations`` and
    ``sources`` are shared by the batch; ``merged``, ``kept`` and ``partner`` are per row."""

    destinations: Tensor  # (D,) token index of every destination, ascending
    sources: Tensor  # (S,) token index of every source, ascending
    merged: Tensor  # (B, r) positions in ``sources`` of the sources averaged away, ascending
    kept: Tensor  # (B, S - r) positions in ``sources`` of the sources that stay, ascending
    partner: Tensor  # (B, r) position in ``destinations`` that every merged source joins

    @property
    def r(self) -> int:
        return self.merged.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.destinations.shape[0] + self.sources.shape[0]


def grid_destinations(
    height: int, width: int, sx: int, sy: int, choice: Tensor | None = None, frames: int = 1
) -> tuple[Tensor, Tensor]:
    """(destinations, sources): the token indices, ascending, of a grid of ``frames`` x
    ``height`` x ``width`` tokens in raster order, one destination per ``sy`` x ``sx`` cell
    of every frame. Cells that do not fit whole at the bottom and right edges have no
    destination: their tokens are sources.

    Args:
        height: the grid of one frame, in rows of tokens.
        width: the grid of one frame, in columns of tokens.
        sx: the cell's width, in tokens.
        sy: the cell's height, in tokens.
        choice: (height // sy, width // sx) the destination's place in every cell,
            ``row * sx + column`` in ``[0, sx * sy)``, the same for every frame (default:
            the top-left corner of every cell).
        frames: frames of the grid, one after the other.
    """
    cells_y, cells_x = height // sy, width // sx
    if choice is None:
        choice = torch.zeros(cells_y, cells_x, dtype=torch.long)
    cell_row = torch.arange(cells_y).unsqueeze(1) * sy + choice.div(sx, rounding_mode="floor")
    cell_column = torch.arange(cells_x).unsqueeze(0) * sx + choice.remainder(sx)
    per_frame = (cell_row * width + cell_column).flatten().sort().values
    frame_start = torch.arange(frames).unsqueeze(1) * (height * width)
    destinations = (frame_start + per_frame).flatten()
    # sources: every other token, ascending; a stable sort keeps their number static for torch.compile
    is_source = torch.ones(frames * height * width, dtype=torch.long)
    is_source[destinations] = 0
    return destinations, is_source.argsort(stable=True)[destinations.shape[0]:]


def grid_bipartite_matching(metric: Tensor, destinations: Tensor, sources: Tensor, r: int) -> GridMatching:
    """Link every source to its most similar destination (cosine similarity of ``metric``)
    and keep the ``r`` best links, for every row of a batch on its own.

    Args:
        metric: (B, N, C) one feature vector per token.
        destinations: the destination tokens' indices, from :func:`grid_destinations`.
        sources: the source tokens' indices, from :func:`grid_destinations`.
        r: the sources to merge, at most ``len(sources)``.

    Raises:
        ValueError: ``r`` is negative or more than the sources.
    """
    if not 0 <= r <= sources.shape[0]:
        raise ValueError(f"r={r} cannot be merged from {sources.shape[0]} sources")
    metric = metric.detach()
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = metric[:, sources] @ metric[:, destinations].mT
    best_score, best = similarity.max(dim=-1)
    order = in_index_order(descending_order(best_score), r)
    merged = order[:, :r]
    return GridMatching(destinations, sources, merged, order[:, r:], best.gather(1, merged))


def merge_mean(x: Tensor, matching: GridMatching) -> Tensor:
    """(B, N - r, C) ``[kept sources | destinations]``, every destination the plain mean
    of itself and the sources merged into it (ToMe for Stable Diffusion's merge: every
    token counts once, whatever it stands for)."""
    channels = x.shape[-1]
    sources, destinations = x[:, matching.sources], x[:, matching.destinations]

    def rows_of(index: Tensor) -> Tensor:
        return index.unsqueeze(-1).expand(-1, -1, channels)

    kept = sources.gather(1, rows_of(matching.kept))
    merged = sources.gather(1, rows_of(matching.merged))
    sums = destinations.scatter_add(1, rows_of(matching.partner), merged)
    counts = torch.ones_like(destinations[..., :1]).scatter_add(
        1, matching.partner.unsqueeze(-1), torch.ones_like(merged[..., :1]))
    return torch.cat([kept, sums / counts], dim=1)


def unmerge_grid(x: Tensor, matching: GridMatching) -> Tensor:
    """(B, N, C) from the (B, N - r, C) output of a branch run on merged tokens: every
    token takes the output of the token it was merged into (kept sources and
    destinations their own)."""
    batch, _, channels = x.shape
    num_kept = matching.kept.shape[1]
    kept, destinations = x[:, :num_kept], x[:, num_kept:]
    out = x.new_empty(batch, matching.num_tokens, channels)
    out[:, matching.destinations] = destinations
    sources = x.new_empty(batch, matching.sources.shape[0], channels)
    sources.scatter_(1, matching.kept.unsqueeze(-1).expand(-1, -1, channels), kept)
    partner_rows = matching.partner.unsqueeze(-1).expand(-1, -1, channels)
    sources.scatter_(1, matching.merged.unsqueeze(-1).expand(-1, -1, channels), destinations.gather(1, partner_rows))
    out[:, matching.sources] = sources
    return out
