"""Rotary position embeddings (RoPE) for merged tokens.

A rotary model rotates each patch token's queries and keys by angles that depend on
where its patch lies; the angles come as a table with one row per patch of the grid.
After a merge a token stands for several patches and needs one position. Two rules,
both applied through the pass's side tensors (:meth:`tokenmerge.state.Pass.set_side`),
so that every reduction method carries them along:

- ``"destination"`` (the default): a merged token keeps the position of the token
  it was merged into (the B token of bipartite matching, as ToMA does for rotary
  embeddings). Its angles are a row of the table, so the rotation stays a rotation.
- ``"mean"``: a merged token takes the size-weighted mean of the sines and cosines of
  the patches it holds, as absolute position embeddings are averaged with the tokens
  they were added to. Not a rotation any more (the mean of unit vectors is shorter).

Before any merge both give the table itself, so that a model that merges nothing
computes exactly what it computes unpatched. ``benchmarks/rope_rules.py`` compares the
two (the documentation's Results, "Rotary position rules", gives what it measured).

A block mixin of a rotary family is a :class:`RotaryBlock`, which holds the rule: set
``rope_rule`` on one family's mixin for that family, or on :class:`RotaryBlock` for all.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .cache import shape_cache
from .state import Pass

RULES = ("destination", "mean")
DEFAULT_RULE = "destination"

#: The side tensor names the rules use.
POSITION_SIDE, MEAN_SIDE = "rope_position", "rope_mean"


def rope_for_tokens(run: Pass, block: int, table: Tensor, tokens: Tensor, num_prefix: int,
                    rule: str = DEFAULT_RULE) -> Tensor:
    """The rotary table for the tokens entering ``block`` of ``run``.

    Args:
        run: the pass.
        block: the block's index.
        table: the rotary embeddings of the unmerged patch tokens, as the model gives
            them to its blocks: (P, E), (heads, P, E), or (B, heads, P, E) with patch
            dropout; P patch tokens along dim -2.
        tokens: (B, N, C) the tokens entering the block, prefix tokens included.
        num_prefix: leading tokens that take no rotary embedding (never merged).
        rule: ``"destination"`` or ``"mean"`` (module docstring).

    Returns:
        ``table`` itself while no token was merged; otherwise (B, heads or 1,
        N - num_prefix, E), one row per patch token.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rotary position rule {rule!r}; expected one of {', '.join(RULES)}")
    if table.dim() not in (2, 3, 4):
        raise NotImplementedError(
            f"tokenmerge does not support rotary embeddings of shape {tuple(table.shape)}: expected (patches, dim), "
            "(heads, patches, dim) or (batch, heads, patches, dim)"
        )
    batch, num_tokens = tokens.shape[:2]
    unmerged = num_tokens == table.shape[-2] + num_prefix
    if rule == "mean":
        mean = run.side(block, MEAN_SIDE)
        if mean is None:
            mean = _per_token_rows(table, batch, num_prefix)
            run.set_side(block, MEAN_SIDE, mean, averaged=True)
        return table if unmerged else mean[:, num_prefix:].unsqueeze(1)
    positions = run.side(block, POSITION_SIDE)
    if positions is None:
        positions = identity_positions(num_tokens, table.device).expand(batch, -1)
        run.set_side(block, POSITION_SIDE, positions)
    return table if unmerged else rows_at(table, positions[:, num_prefix:] - num_prefix)


class RotaryBlock:
    """Mixin for a block whose patch tokens take rotary embeddings: they follow the
    merges by ``rope_rule``, which this class sets once for every rotary family."""

    #: How a merged token's rotary position is chosen: "destination" or "mean".
    rope_rule: ClassVar[str] = DEFAULT_RULE

    _tokenmerge_index: int

    def tokenmerge_rope_rows(self, run: Pass, table: Tensor, tokens: Tensor, num_prefix: int) -> Tensor:
        """The rotary table for the (B, N, C) ``tokens`` entering this block, by this
        block's rule (:func:`rope_for_tokens`)."""
        return rope_for_tokens(run, self._tokenmerge_index, table, tokens, num_prefix, self.rope_rule)


def rows_at(table: Tensor, index: Tensor) -> Tensor:
    """``table``'s rows along dim -2 picked per image by ``index`` (B, n): (B, h, n, E)
    with h the table's heads, or 1 for a table without them."""
    batch, count = index.shape
    width = table.shape[-1]
    if table.dim() == 4:
        heads = table.shape[1]
        return table.gather(2, index.view(batch, 1, count, 1).expand(-1, heads, -1, width))
    lead = table.shape[:-2]
    picked = table.index_select(-2, index.reshape(-1)).view(*lead, batch, count, width)
    return picked.movedim(-3, 0) if lead else picked.unsqueeze(1)


@shape_cache
def identity_positions(num_tokens: int, device: torch.device) -> Tensor:
    """(1, N) every token at its own position. Made outside inference mode, so that
    positions first made under ``torch.inference_mode`` also serve training."""
    with torch.inference_mode(False):
        return torch.arange(num_tokens, device=device).unsqueeze(0)


def _per_token_rows(table: Tensor, batch: int, num_prefix: int) -> Tensor:
    """The ``"mean"`` rule's side tensor: (B, N, E), the table's row of every patch
    token and zeros for the prefix tokens. Only for tables shared by every head and
    block (a table per head comes with a table per block, ``rope_type='mixed'``)."""
    if table.dim() == 3 or table.dim() == 4 and table.shape[1] != 1:
        raise NotImplementedError(
            "the 'mean' rotary position rule needs one rotary table for every head and block; this model gives "
            "each its own (rope_type='mixed'): use the 'destination' rule"
        )
    rows = table.expand(batch, *table.shape) if table.dim() == 2 else table[:, 0]
    return torch.cat([rows.new_zeros(batch, num_prefix, rows.shape[-1]), rows], dim=1)
