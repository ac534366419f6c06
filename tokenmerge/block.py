"""The merge step of one block, written once for every library.

A block that merges runs, in order: plan from its attention keys, attention with the
token sizes (proportional attention), the attention residual, the reduction, and the
MLP residual. Adapters make a library's block class a :class:`MergingBlock` by
filling in where its attention and MLP branches are; the order of the steps, the
search for the forward pass the tokens belong to and the bookkeeping live here.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Optional

from torch import Tensor

from .state import MergeState, Pass


class MergingBlock:
    """Mixin for a library's block class. Subclasses implement the two branches and,
    for blocks that are not batch first, the layout conversions; their ``forward``
    checks its arguments and returns ``self.tokenmerge_forward(x, unpatched)``."""

    _tokenmerge_state: MergeState
    _tokenmerge_index: int

    def tokenmerge_attention(
        self, x: Tensor, size: Optional[Tensor], plan: Callable[[Tensor, Tensor], Any], run: Pass, **kwargs: Any
    ) -> tuple[Tensor, Any]:
        """The attention branch over (B, N, C) tokens, its residual not yet added, with
        key j counted ``size[j]`` times (no bias for ``None``), and what ``plan`` makes
        of the queries and keys (B, heads, N, D), called as soon as they exist.
        ``run`` gives side tensors (:meth:`Pass.side`) where a family needs them;
        ``kwargs`` are those the block's ``forward`` passed on."""
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
        state, index = self._tokenmerge_state, self._tokenmerge_index
        tokens = self.tokenmerge_tokens(x)
        run = state.passes.block_pass(x, tokens, index)
        if run.passes_through(index):
            out = unpatched()
            run.pass_through(index)
            return state.passes.record(run, index, out, self.tokenmerge_tokens(out))
        attended, plan = self.tokenmerge_attention(
            tokens, run.attention_size(index), partial(run.plan, index, tokens), run, **kwargs
        )
        tokens = run.reduce(index, tokens + attended, plan)
        tokens = tokens + self.tokenmerge_mlp(tokens)
        return state.passes.record(run, index, self.tokenmerge_layout(tokens), tokens)
