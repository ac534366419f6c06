"""What the patched modules of one model share: the settings, and per forward pass
the sizes and source maps of the tokens as they leave every block.

Adapters call :meth:`MergeState.begin` when a forward pass starts; in every block
:meth:`MergeState.plan` as soon as the attention queries and keys exist and
:meth:`MergeState.reduce` between the attention and MLP branches.
Entries are keyed by block index, so a block recomputed by gradient checkpointing
reads the same sizes it read the first time.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import schedule as schedules
from . import methods
from .merge import initial_source, max_merges


class CappedRWarning(UserWarning):
    """r asked a block to merge more than half of its mergeable tokens; it merged fewer."""


class MergeState:
    """Token merging settings of one patched model, and what its last forward pass merged.

    Change ``r``, ``prop_attn`` or ``trace_source`` at any time; the next forward pass
    uses them. After a forward pass, ``size`` holds the final token sizes (B, N, 1) and,
    with ``trace_source``, ``source`` maps every input token to its final token (B, N0).
    ``sizes[i]`` and ``sources[i]`` hold the same for the tokens entering block i
    (``None`` before the first merge: every token stands for itself).
    """

    def __init__(
        self,
        depth: int,
        r: schedules.Schedule = 0,
        prop_attn: bool = True,
        trace_source: bool = False,
        method: str = "tome",
    ):
        self.depth = depth
        self.r = r
        self.method = method
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.begin(0)

    @property
    def r(self) -> schedules.Schedule:
        return self._r

    @r.setter
    def r(self, value: schedules.Schedule) -> None:
        self.r_per_block = schedules.resolve(value, self.depth)
        self._r = value
        self._warned_cap = False

    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        self._method_steps = methods.resolve(value)
        self._method = value

    @property
    def prop_attn(self) -> bool:
        return self._prop_attn

    @prop_attn.setter
    def prop_attn(self, value: bool) -> None:
        self._prop_attn = _check_flag("prop_attn", value)

    @property
    def trace_source(self) -> bool:
        return self._trace_source

    @trace_source.setter
    def trace_source(self, value: bool) -> None:
        self._trace_source = _check_flag("trace_source", value)

    def merges_anything(self) -> bool:
        return any(self.r_per_block)

    def begin(self, num_protected: int) -> None:
        """Start a forward pass whose first ``num_protected`` tokens are never merged."""
        self.num_protected = num_protected
        self.sizes: dict[int, Optional[Tensor]] = {}
        self.sources: dict[int, Optional[Tensor]] = {}
        self.size: Optional[Tensor] = None
        self.source: Optional[Tensor] = None
        self.num_input_tokens: Optional[int] = None

    def attention_size(self, block: int) -> Optional[Tensor]:
        """The sizes block ``block`` should give proportional attention, or None for none."""
        return self.sizes.get(block) if self.prop_attn else None

    def block_r(self, block: int, num_tokens: int) -> int:
        """The r block ``block`` merges from ``num_tokens`` tokens, capped with one warning."""
        r = self.r_per_block[block] if block < len(self.r_per_block) else 0
        limit = max_merges(num_tokens, self.num_protected)
        if r > limit:
            if not self._warned_cap:
                warnings.warn(
                    f"r={r} is more than block {block} can merge from {num_tokens} tokens "
                    f"({self.num_protected} protected); merging {limit} there instead. "
                    "Lower r to silence this warning.",
                    CappedRWarning,
                    stacklevel=2,
                )
                self._warned_cap = True
            r = limit
        return r

    def passes_through(self, block: int) -> bool:
        """Whether block ``block`` computes exactly what it computes unpatched: it merges
        nothing and its attention needs no sizes. Such a block runs its own forward."""
        if block < len(self.r_per_block) and self.r_per_block[block]:
            return False
        return not self.prop_attn or self.sizes.get(block) is None

    def pass_through(self, block: int, x: Tensor) -> Tensor:
        """Record that block ``block`` left the tokens as they were; returns ``x``."""
        if block == 0:
            self.num_input_tokens = x.shape[1]
        self.sizes[block + 1], self.sources[block + 1] = self.sizes.get(block), self.sources.get(block)
        self.size, self.source = self.sizes[block + 1], self.sources[block + 1]
        return x

    def plan(self, block: int, tokens: Tensor, queries: Tensor, keys: Tensor) -> Optional[object]:
        """What block ``block`` will do with its tokens, decided by the method set
        (merging by default) from the tokens entering the block (B, N, C) and its
        attention ``queries`` and ``keys`` (B, heads, N, D); None when it reduces nothing."""
        r = self.block_r(block, keys.shape[2])
        if r == 0:
            return None
        evidence = methods.Evidence(tokens, queries, keys, self.sizes.get(block), block)
        return self._method_steps.plan(evidence, r, self.num_protected)

    def reduce(self, block: int, x: Tensor, plan: Optional[object]) -> Tensor:
        """Apply the ``plan`` of block ``block`` to its tokens ``x`` (B, N, C), keeping
        track of sizes and sources; returns the reduced tokens."""
        if block == 0:
            self.num_input_tokens = x.shape[1]
        size, source = self.sizes.get(block), self.sources.get(block)
        if plan is not None:
            if self.trace_source and source is None:
                source = initial_source(x.shape[0], x.shape[1], x.device)
            x, size, source = self._method_steps.reduce(x, size, source, plan)
        self.sizes[block + 1], self.sources[block + 1] = size, source
        self.size, self.source = size, source
        return x


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def swap_class(module: torch.nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of a subclass of its class that puts ``mixin`` first.

    The subclass is created once per (mixin, class) and registered in the mixin's
    module, so patched models still pickle. :func:`restore_class` undoes it.
    """
    original = type(module)
    name = f"TokenMerge{original.__name__}"
    home = sys.modules[mixin.__module__]
    patched = getattr(home, name, None)
    if patched is None or patched.__bases__ != (mixin, original):
        patched = type(name, (mixin, original), {"_tokenmerge_original": original, "__module__": mixin.__module__})
        setattr(home, name, patched)
    module.__class__ = patched


def restore_class(module: torch.nn.Module) -> None:
    """Undo :func:`swap_class`."""
    module.__class__ = type(module)._tokenmerge_original


def is_swapped(module: torch.nn.Module) -> bool:
    return "_tokenmerge_original" in type(module).__dict__
