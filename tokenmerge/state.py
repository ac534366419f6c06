"""The settings of a patched model (:class:`MergeState`), what one forward pass
computes (:class:`Pass`), and how blocks find the pass of their tokens (:class:`Passes`,
the part adapters use).

Settings (r, method, proportional attention, source tracing) belong to the model and
change only when a user changes them. Everything a forward pass computes (the sizes
and source maps of its tokens, block by block) belongs to that pass, so that any
number of threads can run one model at once, and a pooling head uses the sizes of
the tokens it pools, not those of whichever pass ran last.

How a block finds its pass (:meth:`Passes.block_pass`): a call of the model, or of a
module its blocks run inside, opens a :class:`Call` for the calling thread or task
(a ``contextvars.ContextVar``) from its forward pre-hook to its forward hook. Block 0
starts a pass in it, and each later block continues the pass whose last output it is
given. Where no call is open, or its passes do not know the tokens, the tokens
themselves say (:meth:`Passes.pass_by_tokens`, the one tensor-keyed lookup): blocks
run directly by a user, a pooling head given features a call returned earlier, and
blocks recomputed by non-reentrant gradient checkpointing during the backward pass.
While torch.compile or torch.export traces, hooks open nothing: blocks chain through
the thread's current pass alone, so that a compiled model stays one graph.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import methods
from . import schedule as schedules
from .cache import tracing
from .merge import initial_source, max_merges, unmerge


class CappedRWarning(UserWarning):
    """r asked a block to merge more than half of its mergeable tokens; it merged fewer."""


@dataclass(frozen=True)
class Settings:
    """The settings one pass runs with, taken once when it starts: a change made while
    a pass is in flight (from another thread, say) applies to the next pass."""

    r: schedules.Schedule
    r_per_block: tuple[int, ...]
    method: str
    steps: methods.Method
    prop_attn: bool
    trace_source: bool
    dense: bool = False


class Pass:
    """What one forward pass has computed: for every block i, ``sizes[i]`` (B, N, 1)
    and ``sources[i]`` (B, N0) of the tokens entering it (``None`` while every token
    stands for itself), side tensors that follow the reductions, and the number of
    tokens that entered the first block. Entries are keyed by block index, so a block
    recomputed by gradient checkpointing reads the sizes it read the first time."""

    def __init__(self, state: MergeState, first_block: int, num_input_tokens: int, mode: str = "eager"):
        self.state, self.settings = state, state.settings
        self.num_protected = state.num_protected
        self.sizes: dict[int, Optional[Tensor]] = {}
        self.sources: dict[int, Optional[Tensor]] = {}
        self.sides: dict[int, dict[str, Tensor]] = {}
        self.averaged_sides: set[str] = set()
        self.num_input_tokens = num_input_tokens
        self.mode = mode  # "eager", or "compile" / "export" while a graph is traced
        self.first_block = first_block
        self.last_block = first_block - 1  # the last block whose output is recorded
        self.shape_out: Optional[tuple[int, ...]] = None  # (batch, tokens) leaving it
        self.last_out: Optional[Tensor] = None  # that output, while the pass runs in an open call
        self.in_call = False

    @property
    def size(self) -> Optional[Tensor]:
        """Sizes (B, N, 1) of the tokens leaving the last block run."""
        return self.sizes.get(self.last_block + 1)

    @property
    def source(self) -> Optional[Tensor]:
        """Source map (B, N0) of the tokens leaving the last block run (``trace_source``)."""
        return self.sources.get(self.last_block + 1)

    def attention_size(self, block: int) -> Optional[Tensor]:
        """The sizes block ``block`` gives proportional attention, or None for none."""
        return self.sizes.get(block) if self.settings.prop_attn else None

    def block_r(self, block: int, num_tokens: int) -> int:
        """The r block ``block`` merges from ``num_tokens`` tokens, capped with one warning."""
        r_per_block = self.settings.r_per_block
        r = r_per_block[block] if block < len(r_per_block) else 0
        limit = max_merges(num_tokens, self.num_protected)
        if r > limit:
            self.state._warn_capped(self)
            r = limit
        return r

    def passes_through(self, block: int) -> bool:
        """Whether block ``block`` computes exactly what it computes unpatched: it merges
        nothing, its attention needs no sizes and its tokens carry no side tensors
        (rotary positions of merged tokens, say, which its own forward cannot take).
        Such a block runs its own forward."""
        r_per_block = self.settings.r_per_block
        if block < len(r_per_block) and r_per_block[block] or self.sides.get(block):
            return False
        return self.attention_size(block) is None

    def pass_through(self, block: int) -> None:
        """Record that block ``block`` left the tokens as they were."""
        self.sizes[block + 1], self.sources[block + 1] = self.sizes.get(block), self.sources.get(block)
        if block in self.sides:
            self.sides[block + 1] = self.sides[block]

    def plan(self, block: int, tokens: Tensor, queries: Tensor, keys: Tensor) -> Optional[object]:
        """What block ``block`` will do with its tokens, decided by the method set
        (merging by default) from the tokens entering the block (B, N, C) and its
        attention ``queries`` and ``keys`` (B, heads, N, D); None when it reduces nothing."""
        r = self.block_r(block, keys.shape[2])
        if r == 0:
            return None
        evidence = methods.Evidence(tokens, queries, keys, self.sizes.get(block), block)
        return self.settings.steps.plan(evidence, r, self.num_protected)

    def reduce(self, block: int, x: Tensor, plan: Optional[object]) -> Tensor:
        """Apply the ``plan`` of block ``block`` to its tokens ``x`` (B, N, C), keeping
        track of sizes, sources and side tensors; returns the reduced tokens."""
        size, source = self.sizes.get(block), self.sources.get(block)
        sides = self.sides.get(block)
        if plan is not None:
            steps = self.settings.steps
            if (self.settings.trace_source or self.settings.dense) and source is None:
                source = initial_source(x.shape[0], x.shape[1], x.device)
            if sides:
                sides = {name: steps.reduce(side, size, None, plan)[0] if name in self.averaged_sides
                         else steps.follow(side, plan) for name, side in sides.items()}
            x, size, source = steps.reduce(x, size, source, plan)
        self.sizes[block + 1], self.sources[block + 1] = size, source
        if sides:
            self.sides[block + 1] = sides
        return x

    def set_side(self, block: int, name: str, tensor: Tensor, *, averaged: bool = False) -> None:
        """Attach a per-token (B, N, ...) side tensor to the tokens entering block
        ``block``; later blocks read it reduced as their tokens were (:meth:`side`).

        A side tensor is followed (the method's ``follow``: a merged token takes the
        values of the token it was built on, right for indices) or, with ``averaged``,
        reduced as the tokens themselves are (``reduce``: a merged token takes the
        size-weighted mean of its tokens' values, right for coordinates). Averaged sides
        are float tensors (B, N, C)."""
        self.sides.setdefault(block, {})[name] = tensor
        if averaged:
            self.averaged_sides.add(name)

    def side(self, block: int, name: str) -> Optional[Tensor]:
        """The side tensor ``name`` of the tokens entering block ``block``, or None."""
        return self.sides.get(block, {}).get(name)


class MergeState:
    """Token merging settings of one patched model, and what its passes merged.

    Change ``r``, ``method``, ``prop_attn`` or ``trace_source`` at any time; the next
    forward pass uses them. ``num_protected`` leading tokens (class, distillation,
    register tokens) are never merged.

    After a forward pass, ``size`` holds the final token sizes (B, N, 1) and, with
    ``trace_source``, ``source`` maps every input token to its final token (B, N0);
    ``sizes[i]`` and ``sources[i]`` hold the same for the tokens entering block i
    (``None`` before the first merge: every token stands for itself). These describe
    the last pass run by the calling thread, so each thread of a server reads its own.
    """

    def __init__(
        self,
        depth: int,
        r: schedules.Schedule = 0,
        prop_attn: bool = True,
        trace_source: bool = False,
        method: str = "tome",
        num_protected: int = 0,
        dense: bool = False,
    ):
        self.depth, self.num_protected = depth, num_protected
        self.settings = self._settings(r, method, prop_attn, trace_source, dense)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self.passes = Passes(self)
        self._warned_cap = False

    def _settings(
        self, r: schedules.Schedule, method: str, prop_attn: bool, trace_source: bool, dense: bool
    ) -> Settings:
        """Validated settings: a bad one raises before anything changes."""
        r_per_block = tuple(schedules.resolve(r, self.depth))
        steps = methods.resolve(method)
        if dense and not steps.merges:
            raise ValueError(
                f"dense=True needs a method that merges tokens, such as 'tome'; {method!r} drops tokens, which leaves "
                "their patches without features"
            )
        return Settings(r, r_per_block, method, steps, _check_flag("prop_attn", prop_attn),
                        _check_flag("trace_source", trace_source), _check_flag("dense", dense))

    def update(
        self,
        r: Optional[schedules.Schedule] = None,
        *,
        method: Optional[str] = None,
        prop_attn: Optional[bool] = None,
        trace_source: Optional[bool] = None,
        dense: Optional[bool] = None,
    ) -> None:
        """Change several settings at once, all validated before any changes."""
        old = self.settings
        self.settings = self._settings(
            old.r if r is None else r,
            old.method if method is None else method,
            old.prop_attn if prop_attn is None else prop_attn,
            old.trace_source if trace_source is None else trace_source,
            old.dense if dense is None else dense,
        )
        self._warned_cap = False

    @property
    def r(self) -> schedules.Schedule:
        """The merge schedule: tokens merged per block (an int, a per-block list, or a
        :class:`tokenmerge.schedule.Linear` or ``Tuned`` schedule). Settable."""
        return self.settings.r

    @r.setter
    def r(self, value: schedules.Schedule) -> None:
        self.update(value)

    @property
    def r_per_block(self) -> list[int]:
        """The schedule resolved for this model's depth: r of every block, before capping."""
        return list(self.settings.r_per_block)

    @property
    def method(self) -> str:
        """The registered reduction method (:mod:`tokenmerge.methods`), ``"tome"`` by default. Settable."""
        return self.settings.method

    @method.setter
    def method(self, value: str) -> None:
        self.update(method=value)

    @property
    def prop_attn(self) -> bool:
        """Whether attention counts each token as the patches it stands for. Settable."""
        return self.settings.prop_attn

    @prop_attn.setter
    def prop_attn(self, value: bool) -> None:
        self.update(prop_attn=value)

    @property
    def trace_source(self) -> bool:
        """Whether passes record which input token ended in which output token. Settable."""
        return self.settings.trace_source

    @trace_source.setter
    def trace_source(self, value: bool) -> None:
        self.update(trace_source=value)

    @property
    def dense(self) -> bool:
        """Whether the model returns one token per input token (dense features): every
        patch takes the features of the token it ended in. Settable."""
        return self.settings.dense

    @dense.setter
    def dense(self, value: bool) -> None:
        self.update(dense=value)

    def merges_anything(self) -> bool:
        """Whether the current settings merge tokens in any block."""
        return any(self.settings.r_per_block)

    # --- what the calling thread's last pass computed -------------------------------

    @property
    def size(self) -> Optional[Tensor]:
        """Sizes (B, N, 1) of the tokens the calling thread's last pass returned, or
        ``None`` while every token stands for one patch."""
        run = self.passes.last
        return None if run is None else run.size

    @property
    def source(self) -> Optional[Tensor]:
        """With ``trace_source``: for every input token of the calling thread's last pass,
        the index of the output token it ended in (B, N0); otherwise ``None``."""
        run = self.passes.last
        return None if run is None else run.source

    @property
    def sizes(self) -> dict[int, Optional[Tensor]]:
        """Sizes of the tokens entering each block i of the calling thread's last pass."""
        run = self.passes.last
        return {} if run is None else run.sizes

    @property
    def sources(self) -> dict[int, Optional[Tensor]]:
        """Source maps of the tokens entering each block i of the calling thread's last pass."""
        run = self.passes.last
        return {} if run is None else run.sources

    @property
    def num_input_tokens(self) -> Optional[int]:
        """Tokens that entered the first block of the calling thread's last pass."""
        run = self.passes.last
        return None if run is None else run.num_input_tokens

    def _warn_capped(self, run: Pass) -> None:
        """Warn once that r was capped, naming every block of ``run`` it caps and what
        they merge instead; not while a graph is traced (torch.compile cannot trace the
        warning, and an eager call warns)."""
        if self._warned_cap or tracing():
            return
        self._warned_cap = True
        first, settings = run.first_block, run.settings
        note = schedules.capped_note(settings.r, settings.r_per_block[first:], run.num_input_tokens,
                                     self.num_protected, first_block=first)
        warnings.warn(f"{note}. Lower r to silence this warning.", CappedRWarning, stacklevel=_caller_stacklevel())

    # --- copies and pickles carry the settings only --------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"depth": self.depth, "num_protected": self.num_protected, "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def __repr__(self) -> str:
        return (
            f"MergeState(r={schedules.describe(self.r)}, method={self.method!r}, prop_attn={self.prop_attn}, "
            f"trace_source={self.trace_source}, dense={self.dense}, depth={self.depth}, "
            f"num_protected={self.num_protected})"
        )


class Passes:
    """The forward passes of one patched model, for adapters and the block template
    (:mod:`tokenmerge.block`); users read their results through :class:`MergeState`.

    A block finds or starts the pass of its tokens (:meth:`block_pass`) and records
    what it returns (:meth:`record`); a module that changes the last block's tokens
    one by one hands them on (:meth:`adopt`); a pooling head finds the pass, and so
    the sizes, of the tokens it is given (:meth:`pass_of`). The model and the modules
    its blocks run inside count the calls in flight (:meth:`enter_call`,
    :meth:`leave_call`), which :func:`tokenmerge.remove` waits for (:meth:`closing`).
    """

    def __init__(self, state: MergeState):
        self.state = state
        self._local = threading.local()
        self._tokens = WeakIdKeyDictionary()  # token tensor -> (its Pass, the block it enters)
        self._gate = threading.Condition()
        self._inside: set[int] = set()  # threads inside a call of the model (:meth:`enter_call`)
        self._closing = False

    def __reduce__(self) -> tuple:
        """Copies and pickles are the passes of the copied state (the model's hooks hold
        them): none of the passes themselves, and one gate per state."""
        return getattr, (self.state, "passes")

    @property
    def last(self) -> Optional[Pass]:
        """The last forward pass run by the calling thread (None before any)."""
        return getattr(self._local, "current", None)

    # --- calls in flight and removal -------------------------------------------------

    #: How long :meth:`closing` waits for other threads' calls before giving up.
    CLOSING_TIMEOUT_S = 60.0

    def enter_call(self, module: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook of the model and of the modules its blocks run inside: opens
        a :class:`Call` for the passes its blocks run, and notes that the calling thread
        is inside a call, which :meth:`closing` waits for. A call that starts while the
        model is being unpatched waits until that is done."""
        if tracing():
            return
        if self._open_call() is None:
            with self._gate:
                self._gate.wait_for(lambda: not self._closing)
                self._inside.add(threading.get_ident())
        _OPEN_CALL.set(Call(self, _OPEN_CALL.get()))

    def leave_call(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Forward hook, called also when the call fails, paired with :meth:`enter_call`."""
        if tracing():
            return
        call = _OPEN_CALL.get()
        if call is not None and call.passes is self:
            call.close()
            _OPEN_CALL.set(call.outer)
        if self._open_call() is None:
            with self._gate:
                self._inside.discard(threading.get_ident())
                self._gate.notify_all()

    def in_call(self) -> bool:
        """Whether the calling thread or task is inside a call of the model (or of a
        module its blocks run inside)."""
        return self._open_call() is not None

    @contextlib.contextmanager
    def closing(self):
        """The context :func:`tokenmerge.remove` unpatches in: calls of the model that
        other threads are running finish first, with the settings they started with,
        and new ones wait until the model is unpatched, then run unpatched."""
        me = threading.get_ident()
        with self._gate:
            self._closing = True
            if not self._gate.wait_for(lambda: self._inside <= {me}, timeout=self.CLOSING_TIMEOUT_S):
                self._closing = False
                self._gate.notify_all()
                raise RuntimeError(
                    f"tokenmerge.remove waited {self.CLOSING_TIMEOUT_S:.0f} s for calls of this model that other "
                    "threads are running; call it again once they have finished"
                )
        try:
            yield
        finally:
            with self._gate:
                self._closing = False
                self._gate.notify_all()

    def block_pass(self, x: Tensor, tokens: Tensor, block: int) -> Pass:
        """The pass that the tokens ``x`` given to block ``block`` belong to (see the
        module docstring); ``tokens`` is the same as (B, N, C)."""
        mode = _trace_mode()
        if mode != "eager":
            return self._traced_pass(tokens, block, mode)
        if torch._C._functorch.is_batchedtensor(x):
            raise NotImplementedError(
                "tokenmerge does not support torch.func.vmap over a patched model: the tokens each input keeps are "
                "chosen per batch; call the model on the whole batch instead, or remove tokenmerge first"
            )
        recomputing = torch._C._current_graph_task_id() != -1
        call = None if recomputing else self._open_call()
        if call is None:
            return self.pass_by_tokens(x, tokens, block)
        if block > 0:
            for run in reversed(call.runs):
                if run.last_out is x and run.last_block == block - 1:
                    return run
            run = self.pass_by_tokens(x, tokens, block)
        else:
            run = Pass(self.state, block, tokens.shape[1])
        if not run.in_call:
            run.in_call = True
            call.runs.append(run)
        return run

    def pass_by_tokens(self, x: Tensor, tokens: Tensor, block: int) -> Pass:
        """The pass of tokens that no open call knows, in eager mode: the one that
        returned ``x`` from the block before; or the thread's current pass if it left
        that block with tokens of this shape (tokens that a hook or a library replaced
        between blocks); otherwise a new pass, in which every token stands for one patch."""
        known = self._tokens.get(x)
        if known is not None and known[1] == block:
            return known[0]
        if block > 0 and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                "tokenmerge cannot recompute a merging block from tokens it has not seen: reentrant gradient "
                "checkpointing detaches them from their pass; use non-reentrant checkpointing "
                "(use_reentrant=False, the default of timm, transformers and open_clip)"
            )
        return self._continued(self._current("eager"), tokens, block)

    def _traced_pass(self, tokens: Tensor, block: int, mode: str) -> Pass:
        """While a graph is traced: the pass the thread is tracing, continued block by
        block (block 0 never reads it: a compiled graph need not guard on it)."""
        return self._continued(self._current(mode) if block > 0 else None, tokens, block, mode)

    def _continued(self, current: Optional[Pass], tokens: Tensor, block: int, mode: str = "eager") -> Pass:
        """``current`` if it left the block before, else a new pass. Tokens of another
        shape than ``current`` left there were changed by something between the blocks
        (a hook that drops tokens, say) that no merge explains: their sizes and sources
        are unknown, and starting over would describe the wrong input, so that is an error."""
        if block > 0 and current is not None and current.last_block == block - 1:
            shape = tuple(tokens.shape[:2])
            if current.shape_out != shape:
                left = "nothing" if current.shape_out is None else f"{current.shape_out[1]} tokens for " \
                    f"{current.shape_out[0]} inputs"
                raise RuntimeError(
                    f"block {block} got {shape[1]} tokens for {shape[0]} inputs, but block {block - 1} left {left}: "
                    "something between them (a hook, say) changed the tokens' number, which no merge explains, so "
                    "their sizes are unknown; change tokens only one for one between blocks, or remove tokenmerge"
                )
            return current
        return Pass(self.state, block, tokens.shape[1], mode)

    def _open_call(self) -> Optional[Call]:
        """The innermost call of this model open in the calling thread or task."""
        call = _OPEN_CALL.get()
        while call is not None and call.passes is not self:
            call = call.outer
        return call

    def _current(self, mode: str) -> Optional[Pass]:
        """The pass the calling thread ran last; while torch.export traces, the one it traces."""
        return getattr(self._local, "traced" if mode == "export" else "current", None)

    def record(self, run: Pass, block: int, out: Tensor, tokens: Tensor) -> Tensor:
        """Note that ``out`` (the same as (B, N, C) ``tokens``) left block ``block`` in
        ``run``; returns ``out``."""
        run.last_block, run.shape_out = block, tuple(tokens.shape[:2])
        if run.mode == "export":
            self._local.traced = run
            return out
        if run.mode == "eager":
            if run.in_call:
                run.last_out = out
            # Tokens later found by themselves (:meth:`pass_by_tokens`, :meth:`pass_of`):
            # those of blocks run outside a call, those a recomputed block is given
            # (gradient checkpointing needs gradients), and those leaving the last block.
            if not run.in_call or torch.is_grad_enabled() or block == self.state.depth - 1:
                self._tokens[out] = (run, block + 1)
        self._local.current = run
        return out

    def adopt(self, out: Tensor) -> Tensor:
        """Note that the (B, N, C) tokens ``out`` are those the calling thread's pass has
        just left after the last block, maybe changed token by token (by a final norm)
        inside the model's own forward, so that a head given ``out``, now or later, pools
        with their sizes. Returns ``out``."""
        run = self.last
        if (
            not tracing() and run is not None and run.last_block == self.state.depth - 1
            and run.shape_out == tuple(out.shape[:2])
        ):
            self._tokens[out] = (run, self.state.depth)
        return out

    def unmerged(self, out: Tensor) -> Tensor:
        """With the ``dense`` setting, the (B, N, C) tokens ``out`` that the calling
        thread's pass has just left after its last block, spread back over the tokens
        that entered its first block (:func:`tokenmerge.merge.unmerge`); otherwise, or
        when nothing was merged, ``out`` itself."""
        mode = _trace_mode()
        run = self._current(mode)  # while torch.export traces, the pass it traces
        if run is None or not run.settings.dense or run.source is None or run.last_block != self.state.depth - 1:
            return out
        spread = unmerge(out, run.source)
        if mode == "eager":
            self._tokens[spread] = (run, self.state.depth)  # a head given them knows them (:meth:`pool_weights`)
        return spread

    def pass_of(self, tokens: Tensor, grid_tokens: Optional[int] = None) -> Optional[Pass]:
        """The pass that left the (B, N, C) ``tokens`` after its last block, for a pooling
        head: the one remembered for them (while a graph is traced, the thread's current
        pass). Tokens no pass left are fine as a whole patch grid (``grid_tokens``, the
        model's own, or that of the thread's last pass), each standing for one patch:
        then None. Otherwise their sizes are unknown, and guessing would be wrong: an
        error; so too for tokens of the very shape the thread's last pass left merged (a
        copy of its features, say), which could be either."""
        mode = _trace_mode()
        if mode != "eager":
            run = self._current(mode)
        else:
            known = self._tokens.get(tokens)
            run = None if known is None else known[0]
        if run is None:
            self._check_unknown(tokens, grid_tokens)
            return None
        if run.settings.dense and self._dense_shape(run) == tuple(tokens.shape[:2]):
            return run
        if run.shape_out != tuple(tokens.shape[:2]):
            left = "no tokens" if run.shape_out is None else f"{run.shape_out[1]} tokens for {run.shape_out[0]}"
            raise ValueError(
                f"a pooling head got {tokens.shape[1]} tokens for {tokens.shape[0]} images, but their pass left "
                f"{left}; pass it the tokens the model returned, unchanged"
            )
        return run

    def pool_weights(self, tokens: Tensor, grid_tokens: Optional[int] = None) -> PoolWeights:
        """How a pooling head weighs the (B, N, C) ``tokens`` it is given so that it pools
        what it would pool over the unmerged patches (see :class:`PoolWeights`): merged
        tokens by their sizes; the one-per-patch tokens of the ``dense`` setting equally,
        except that without proportional attention an attention pool counts each merged
        token once, as it does without ``dense``. Raises as :meth:`pass_of` does."""
        run = self.pass_of(tokens, grid_tokens)
        size = None if run is None else run.size
        if run is None or size is None:
            return PoolWeights()
        if not (run.settings.dense and self._dense_shape(run) == tuple(tokens.shape[:2])):
            return PoolWeights(size, size if run.settings.prop_attn else None)
        if run.settings.prop_attn:
            return PoolWeights()
        source = run.source
        assert source is not None  # a dense pass that merged traces its sources
        copies = size.gather(1, source.unsqueeze(-1))  # for every patch, the size of the token it ended in
        return PoolWeights(None, copies.reciprocal())

    def _dense_shape(self, run: Pass) -> Optional[tuple[int, int]]:
        """(batch, tokens) of the one-per-input-token features :meth:`unmerged` makes of ``run``."""
        return None if run.shape_out is None else (run.shape_out[0], run.num_input_tokens)

    def _check_unknown(self, tokens: Tensor, grid_tokens: Optional[int]) -> None:
        """Refuse tokens no pass is known to have left unless they are a whole patch grid,
        and unless they cannot be a copy of what the thread's last pass left merged."""
        if not self.state.merges_anything():
            return
        last, shape = self.last, tuple(tokens.shape[:2])
        if last is not None and last.size is not None:
            copied = last.shape_out == shape or (
                last.settings.dense and not last.settings.prop_attn and self._dense_shape(last) == shape)
            if copied:
                raise ValueError(
                    f"a pooling head got {shape[1]} tokens for {shape[0]} images that no forward pass of this model "
                    "left, but the last pass left merged tokens of this shape: a copy of them (a clone, say) cannot "
                    "be told from an unmerged grid; pass the head the tokens the model returned, unchanged"
                )
        if tokens.shape[1] not in (grid_tokens, last and last.num_input_tokens):
            raise ValueError(
                f"a pooling head got {tokens.shape[1]} tokens that no forward pass of this model left, so the "
                "number of patches each stands for is unknown; pass it the tokens the model returned, unchanged"
            )


@dataclass(frozen=True)
class PoolWeights:
    """How a pooling head weighs the tokens it is given, each (B, N, 1) or None.

    ``mean``: the weights of an average over tokens (None: equal weights).
    ``attention``: counts whose log an attention pool adds to its logits, so that a key
    counts as often as it says (None: no bias)."""

    mean: Optional[Tensor] = None
    attention: Optional[Tensor] = None


class Call:
    """One call of a patched model, or of a module its blocks run inside, from its
    forward pre-hook to its forward hook: the passes its blocks ran, in the order they
    started. Calls nest (a model's call holds its blocks' container's call); each
    thread and each asyncio task has its own (:data:`_OPEN_CALL`)."""

    __slots__ = ("passes", "outer", "runs")

    def __init__(self, passes: Passes, outer: Optional[Call]):
        self.passes, self.outer = passes, outer
        self.runs: list[Pass] = []

    def close(self) -> None:
        """Let go of the tokens the passes last returned: nothing outlives the call."""
        for run in self.runs:
            run.last_out, run.in_call = None, False


#: The innermost open call of the calling thread or task, if any.
_OPEN_CALL: contextvars.ContextVar[Optional[Call]] = contextvars.ContextVar("tokenmerge_call", default=None)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside tokenmerge, torch and the model
    libraries: the user's line that ran the model, which a warning should point at."""
    import os
    import sys

    from .libraries import LIBRARIES

    packages = ["tokenmerge", "torch", *(name for name in LIBRARIES if name in sys.modules)]
    files = (sys.modules[name].__file__ for name in packages)
    inside = tuple(os.path.dirname(file) + os.sep for file in files if file is not None)
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _trace_mode() -> str:
    """"eager"; "compile" while torch.compile traces (its side effects on Python objects
    are replayed with real tensors); "export" while torch.export (or fake tensors) trace."""
    if not tracing():
        return "eager"
    if torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting():
        return "compile"
    return "export"


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
