"""The merge step of one block, written once for every library.

A block that merges runs, top to bottom: the attention's projections, the plan made
from its keys, attention in which every key counts as the patches it stands for
(proportional attention), the attention residual, the reduction the plan asks for,
and the MLP residual. Adapters make a library's block class a :class:`MergingBlock`
by saying how its attention projects and attends and where its MLP branch is; the
order of the steps and the bookkeeping of the pass live here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

from torch import Tensor

from .state import MergeState, Pass


class Projected(NamedTuple):
    """A block's attention after its projections: queries, keys and values
    (B, heads, N, D), and whatever else its attention step needs from the tokens
    (a gate computed from them, say; ``None`` for most blocks)."""

    q: Tensor
    k: Tensor
    v: Tensor
    extra: Any = None


class MergingBlock:
    """Mixin for a library's block class. Subclasses implement
    :meth:`tokenmerge_project`, :meth:`tokenmerge_attend` and :meth:`tokenmerge_mlp`
    and, for blocks that are not batch first, the layout conversions; their
    ``forward`` checks its arguments and returns ``self.tokenmerge_forward(x, unpatched)``."""

    _tokenmerge_state: MergeState
    _tokenmerge_index: int

    # The branches end in ``*args: Any, **kwargs: Any`` so that each subclass declares the
    # arguments its ``forward`` passes on, if any (a type checker lets overrides narrow it).
    def tokenmerge_project(self, x: Tensor, run: Pass, *args: Any, **kwargs: Any) -> Projected:
        """The attention branch over (B, N, C) tokens up to its queries, keys and
        values: the norm before it, the projections, query and key norms. ``run`` gives
        side tensors (:meth:`Pass.side`) where a family needs them; ``kwargs`` are
        those the block's ``forward`` passed on."""
        raise NotImplementedError

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """The rest of the attention branch, its residual not yet added: attention in
        which key j counts ``size[j]`` times (no bias for ``None``), the output
        projection and whatever scales or drops the branch."""
        raise NotImplementedError

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        """The MLP branch over (B, N, C) tokens, its residual not yet added."""
        raise NotImplementedError

    def tokenmerge_tokens(self, x: Tensor) -> Tensor:
        """The block's input in the (B, N, C) layout."""
        return x

    def tokenmerge_layout(self, x: Tensor) -> Tensor:
        """(B, N, C) tokens in the block's own layout."""
        return x

    def tokenmerge_forward(self, x: Tensor, unpatched: Callable[[], Tensor], **kwargs: Any) -> Tensor:
        """The block's forward: the unpatched one where it merges nothing and needs no
        sizes, otherwise the merge step (``kwargs`` go to the attention branch)."""
        passes, index = self._tokenmerge_state.passes, self._tokenmerge_index
        tokens = self.tokenmerge_tokens(x)
        run = passes.block_pass(x, tokens, index)
        if run.passes_through(index):
            out = unpatched()
            run.pass_through(index)
            return passes.record(run, index, out, self.tokenmerge_tokens(out))
        projected = self.tokenmerge_project(tokens, run, **kwargs)
        plan = run.plan(index, tokens, projected.q, projected.k)
        attended = self.tokenmerge_attend(projected, run.attention_size(index), **kwargs)
        tokens = run.reduce(index, tokens + attended, plan)
        tokens = tokens + self.tokenmerge_mlp(tokens)
        return passes.record(run, index, self.tokenmerge_layout(tokens), tokens)
