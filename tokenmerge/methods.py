"""Token reduction methods: what a block does with its tokens between attention and MLP.

A method works in two steps. ``plan`` decides which tokens go where from what the
block has seen (:class:`Evidence`: its input tokens, attention queries and keys, and
the current sizes), ``r`` and the number of protected tokens; adapters call it as
soon as the keys exist, before the attention itself, so that the small operations of
planning run while the keys are still in cache and between the large operations
rather than in one long single-threaded gap. ``reduce`` then applies the plan to the
tokens ``x`` (B, N, C) after the attention branch, with the current sizes (B, N, 1)
or None and the current source map (B, N0) or None, and returns the reduced tokens,
sizes and source map. ``follow`` applies the same plan to a per-token side tensor
(B, N, ...), such as rotary position angles: every output token takes the values of
the input token it was built on (a merged pair those of its B token).

Every method removes exactly ``r`` tokens in a block and never touches the first
``num_protected`` tokens, so all of them run with the same token counts per block
and their speeds are comparable:

* ``tome``: token merging (bipartite soft matching on the keys, size-weighted averages);
* ``tome-attended``: token merging that spares the tokens the class token attends
  to: every link's score is its similarity less the class attention of its two
  tokens (relative to uniform attention, weighed by :data:`ATTENDED_COST`), so that
  the tokens the classification reads from are merged only with near copies of
  themselves. It keeps the model closer to its unmerged outputs than ``tome`` at the
  same token counts; it needs a class token;
* ``tome-random-split``, ``tome-unweighted``, ``tome-features``: merging with one
  choice of the paper changed (a random split into A and B instead of alternating,
  the plain average instead of the size-weighted one, similarity of the block's input
  tokens instead of its keys);
* ``random``: drop r tokens at random (one fixed random pattern per block and token
  count, the same for every image, so results do not depend on the batch);
* ``evit``, ``evit-fuse``: keep the tokens the class token attends to most, as in
  EViT; ``evit-fuse`` drops one more and adds one token that is the attention-weighted
  average of the dropped ones (as in EViT it counts as one token in attention: given
  the size of all it took in, it would draw attention it does not deserve);
* ``cut``: drop the last r tokens unseen, the zero-overhead speed reference.

Proportional attention is a separate setting (``prop_attn``); the pruning methods keep
no sizes (every token counts as one), so it does not change them.

Every method lives in one registry: :func:`register` adds one under a name that
``tokenmerge.apply(..., method=name)`` and the command-line tools then accept,
:func:`resolve` finds one, :data:`METHODS` is a read-only view of them all. A
:class:`Method` says with flags what it is and needs (``merges``, ``matches``,
``needs_class_token``, ``speed_reference``), so that nothing has to read it from its name.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, Optional, TypeVar

import torch
from torch import Tensor

from .attention import log_size_bias
from .cache import shape_cache
from .kernels import merge_weighted, merged_sizes, rows
from .merge import Matching, bipartite_soft_matching, descending_order, merge_source

#: What a method's ``reduce`` returns: the reduced tokens (B, N - r, C), their sizes
#: (B, N - r, 1) or None, and the source map (B, N0) or None.
Reduction = tuple[Tensor, Optional[Tensor], Optional[Tensor]]


class Evidence(NamedTuple):
    """What a block offers a method to decide with, gathered as soon as its attention
    keys exist.

    Attributes:
        tokens: (B, N, C) the tokens entering the block.
        queries: (B, heads, N, D) the block's attention queries.
        keys: (B, heads, N, D) the block's attention keys.
        size: (B, N, 1) the sizes of the tokens, or None while every token stands for
            one patch.
        block: the block's index, from 0.
    """

    tokens: Tensor
    queries: Tensor
    keys: Tensor
    size: Optional[Tensor]
    block: int


Plan = TypeVar("Plan")


@dataclass(frozen=True)
class Method(Generic[Plan]):
    """A token reduction method: a plan step and the steps that apply the plan, as the
    module docstring describes, and flags that say what it is for whatever treats
    methods differently (the FLOP count, the tools' variants and figures, training).

    Give one to :func:`register` to make it available by name.

    Attributes:
        plan: ``plan(evidence, r, num_protected)`` decides from the :class:`Evidence`
            which ``r`` tokens go, never touching the first ``num_protected``; called
            only for blocks that reduce (``r`` >= 1, within :func:`tokenmerge.merge.max_merges`).
        reduce: ``reduce(x, size, source, plan)`` applies the plan to the tokens
            (B, N, C) after the attention branch, with their sizes (B, N, 1) or None
            and the source map (B, N0) or None, and returns the :data:`Reduction`.
        follow: ``follow(side, plan)`` applies the plan to a per-token side tensor
            (B, N, ...), such as rotary position angles: every output token takes the
            values of the input token it was built on.
        merges: it combines tokens into ones that stand for several patches and adds
            up their sizes, so proportional attention changes what it computes.
        matches: it computes bipartite matching similarities, which count towards its
            FLOPs.
        needs_class_token: it plans with the class token's attention, so a model
            without a class token cannot run it.
        speed_reference: it is a speed limit to measure others against, not a method
            to use for accuracy: the tools offer it only as such and training refuses it.
    """

    plan: Callable[[Evidence, int, int], Plan]
    reduce: Callable[[Tensor, Optional[Tensor], Optional[Tensor], Plan], Reduction]
    follow: Callable[[Tensor, Plan], Tensor]
    merges: bool = False
    matches: bool = False
    needs_class_token: bool = False
    speed_reference: bool = False


# --- merging -------------------------------------------------------------------------


def sum_over_heads(keys: Tensor) -> Tensor:
    """(B, heads, N, D) keys summed over heads. Keys sliced out of a fused qkv
    projection are strided; for large batches a contiguous copy first makes the sum
    several times faster on the CPU, for small ones the copy costs more than it saves
    (and a symbolic size, from torch.export with a dynamic batch, decides nothing)."""
    numel = keys.numel()
    if not keys.is_contiguous() and type(numel) is int and numel > 1 << 17:
        keys = keys.contiguous()
    return keys.sum(dim=1)


def match_keys(evidence: Evidence, r: int, num_protected: int) -> Matching:
    """The plan of ``tome`` and ``tome-unweighted``: bipartite soft matching on the keys
    averaged over heads (summed: the cosine similarity is the same, one operation
    fewer).

    Args:
        evidence: what the block offers; its ``keys`` are used.
        r: the number of tokens to merge.
        num_protected: leading tokens never merged.

    Returns:
        The :class:`~tokenmerge.merge.Matching` of every image.
    """
    return bipartite_soft_matching(sum_over_heads(evidence.keys), r, num_protected)


#: How much a token's class attention, relative to uniform attention (1 for a token
#: attended as much as the average), lowers the score of its links in ``tome-attended``:
#: chosen on half of a 500-photograph ImageNet sample with the AugReg ViT-Ti.
ATTENDED_COST = 0.05


def match_keys_sparing_attended(evidence: Evidence, r: int, num_protected: int) -> Matching:
    """The plan of ``tome-attended``: bipartite soft matching on the keys, every link's
    score lowered by the class attention of its two tokens (weighed by
    :data:`ATTENDED_COST`), so that the tokens the class token reads from merge only
    with near copies of themselves.

    Args:
        evidence: what the block offers; its ``queries``, ``keys`` and ``size`` are used.
        r: the number of tokens to merge.
        num_protected: leading tokens never merged; the first is the class token.

    Returns:
        The :class:`~tokenmerge.merge.Matching` of every image.

    Raises:
        ValueError: ``num_protected`` is 0: the model has no class token.
    """
    if num_protected < 1:
        raise ValueError("tome-attended spares the tokens a class token attends to, and the model has no class "
                         "token; use tome")
    attention = class_attention(evidence)
    cost = ATTENDED_COST * attention.shape[1] * attention
    return bipartite_soft_matching(sum_over_heads(evidence.keys), r, num_protected, cost)


def match_tokens(evidence: Evidence, r: int, num_protected: int) -> Matching:
    """The plan of ``tome-features``: bipartite soft matching on the tokens entering
    the block instead of its keys."""
    return bipartite_soft_matching(evidence.tokens, r, num_protected)


def merge(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], matching: Matching) -> Reduction:
    """The reduction of ``tome``: size-weighted averages of the matched tokens, and the
    source map followed.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) their sizes, or None while every token stands for one patch.
        source: (B, N0) the source map, or None when sources are not traced.
        matching: the plan, from :func:`match_keys` or another matching plan.

    Returns:
        The merged tokens (B, N - r, C), their sizes (B, N - r, 1) and the source map
        (B, N0) or None.
    """
    if source is not None:
        source = merge_source(source, matching)
    x, size = merge_weighted(x, size, matching)
    return x, size, source


def merge_unweighted(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], matching: Matching) -> Reduction:
    """The reduction of ``tome-unweighted``: plain averages of the matched tokens,
    whatever they stand for; sizes are still added up, for proportional attention and
    pooling. Takes and returns what :func:`merge` does."""
    merged, _ = merge_weighted(x, None, matching)
    _, new_size = merged_sizes(size, matching, x.shape[0])
    if source is not None:
        source = merge_source(source, matching)
    return merged, new_size.view(*merged.shape[:2], 1), source


def follow_merge(side: Tensor, matching: Matching) -> Tensor:
    """Side values of the merged tokens: those of the kept and B tokens they are built on.

    Args:
        side: (B, N, ...) one value per token.
        matching: the plan the tokens were merged with.

    Returns:
        (B, N - r, ...) one value per merged token.
    """
    batch, num_tokens = side.shape[:2]
    flat = side.reshape(batch * num_tokens, math.prod(side.shape[2:])).index_select(0, rows(matching).output)
    return flat.view(batch, num_tokens - matching.r, *side.shape[2:])


class RandomSplit(NamedTuple):
    """The plan of ``tome-random-split``: a fixed random order of the mergeable tokens,
    and the matching made in that order.

    Attributes:
        order: (N,) token positions in their new order, protected tokens first and in place.
        matching: the matching of the tokens reordered by ``order``.
    """

    order: Tensor
    matching: Matching


def match_keys_random_split(evidence: Evidence, r: int, num_protected: int) -> RandomSplit:
    """The plan of ``tome-random-split``: bipartite soft matching on the keys after
    putting the mergeable tokens in a fixed random order (:func:`fixed_permutation`),
    so that the alternating split into A and B is a random one."""
    keys = sum_over_heads(evidence.keys)
    order = fixed_permutation(evidence.block, keys.shape[1], num_protected, keys.device)
    return RandomSplit(order, bipartite_soft_matching(keys[:, order], r, num_protected))


def merge_random_split(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], plan: RandomSplit) -> Reduction:
    """The reduction of ``tome-random-split``: the tokens, sizes and source map put in
    the plan's order, then :func:`merge`. Takes and returns what :func:`merge` does."""
    x = x[:, plan.order]
    size = None if size is None else size[:, plan.order]
    if source is not None:
        source = torch.argsort(plan.order).gather(0, source.reshape(-1)).view_as(source)
    return merge(x, size, source, plan.matching)


def follow_random_split(side: Tensor, plan: RandomSplit) -> Tensor:
    """Side values of tokens merged by :func:`merge_random_split`, as :func:`follow_merge`
    gives them."""
    return follow_merge(side[:, plan.order], plan.matching)


@shape_cache
def fixed_permutation(block: int, num_tokens: int, num_protected: int, device: torch.device) -> Tensor:
    """A random order of a block's tokens that depends only on the block and the token
    count: the same for every image and every pass, and a constant of any graph that
    torch.compile, torch.export or ONNX make of it. Cached per shape and device.

    Args:
        block: the block's index, one seed of the order.
        num_tokens: the tokens entering the block, the other seed.
        num_protected: leading tokens that stay in place.
        device: where the order is made.

    Returns:
        (num_tokens,) the token positions: ``0 .. num_protected - 1``, then the others
        shuffled.
    """
    order = shuffled(num_tokens - num_protected, block * 1_000_003 + num_tokens)
    with torch.inference_mode(False):
        return torch.tensor(list(range(num_protected)) + [num_protected + i for i in order], device=device)


def shuffled(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)``: a Fisher-Yates shuffle driven by a 64-bit linear
    congruential generator seeded with ``seed``, in plain integer arithmetic, so that
    tracing a graph records its result rather than a random number generator."""
    order, state = list(range(n)), seed
    for i in range(n - 1, 0, -1):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        j = (state >> 33) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


# --- pruning -------------------------------------------------------------------------


class Selection(NamedTuple):
    """The plan of the pruning methods: which tokens each image keeps.

    Attributes:
        keep: the tokens to keep, in order, per image (B, N - r) or for all images
            (N - r,); with ``fuse``, one fewer (the fused token takes its place).
        fuse: None, or (B, N) the weights with which the dropped tokens are averaged
            into one extra token (zero for kept ones).
    """

    keep: Tensor
    fuse: Optional[Tensor] = None


def drop_random(evidence: Evidence, r: int, num_protected: int) -> Selection:
    """The plan of ``random``: keep all but r tokens chosen at random, the same ones for
    every image (:func:`fixed_permutation`), so that results do not depend on the batch."""
    num_tokens = evidence.keys.shape[2]
    order = fixed_permutation(evidence.block, num_tokens, num_protected, evidence.keys.device)
    kept = order[num_protected:num_tokens - r].sort().values
    return Selection(torch.cat([order[:num_protected], kept]))


def class_attention(evidence: Evidence) -> Tensor:
    """How much the class token attends to every token: what the classification reads
    from, for the plans that spare or keep those tokens.

    Args:
        evidence: what the block offers; its ``queries``, ``keys`` and ``size`` are
            used, the class token at position 0.

    Returns:
        (B, N) float32 attention of the class token to every token, averaged over
        heads, with every key counted as often as the patches it stands for.
    """
    queries, keys = evidence.queries[:, :, :1], evidence.keys
    logits = (queries @ keys.transpose(-2, -1)) * keys.shape[-1] ** -0.5
    if evidence.size is not None:
        logits = logits + log_size_bias(evidence.size, logits.dtype)
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0]


def keep_attended(evidence: Evidence, r: int, num_protected: int, fuse: bool = False) -> Selection:
    """The plan of ``evit`` (EViT): keep the tokens the class token attends to most,
    in their order.

    Args:
        evidence: what the block offers; its ``queries``, ``keys`` and ``size`` are used.
        r: the number of tokens to remove.
        num_protected: leading tokens always kept; the first is the class token.
        fuse: drop one token more and weigh the dropped ones by the class attention,
            for one fused token (``evit-fuse``).

    Returns:
        The :class:`Selection` of every image.

    Raises:
        ValueError: ``num_protected`` is 0: the model has no class token.
    """
    if num_protected < 1:
        raise ValueError("evit and evit-fuse keep the tokens a class token attends to: the model has no class token")
    attention = class_attention(evidence)
    num_tokens = attention.shape[1]
    ranked = descending_order(attention[:, num_protected:]) + num_protected
    num_kept = num_tokens - num_protected - r - int(fuse)
    protected = torch.arange(num_protected, device=attention.device).expand(attention.shape[0], -1)
    keep = torch.cat([protected, ranked[:, :num_kept].sort(dim=1).values], dim=1)
    if not fuse:
        return Selection(keep)
    weights = attention.scatter(1, keep, 0.0)
    return Selection(keep, weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12))


def keep_attended_and_fuse(evidence: Evidence, r: int, num_protected: int) -> Selection:
    """The plan of ``evit-fuse``: :func:`keep_attended` with ``fuse=True``."""
    return keep_attended(evidence, r, num_protected, fuse=True)


def prune(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], selection: Selection) -> Reduction:
    """The reduction of the pruning methods: keep the selected tokens and, with
    ``fuse``, append the fused one.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) their sizes, or None.
        source: (B, N0) the source map, or None when sources are not traced.
        selection: the plan.

    Returns:
        The kept tokens, the fused one last (B, N - r, C), their sizes (the fused
        token counts as one) or None, and the source map or None: dropped input
        tokens get source -1, fused ones the fused token.
    """
    batch, num_tokens, channels = x.shape
    keep = _kept_per_image(selection, batch)
    num_kept = keep.shape[1]
    out = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, channels))
    out_size = None if size is None else size.gather(1, keep.unsqueeze(-1))
    position = torch.full((batch, num_tokens), -1, dtype=torch.long, device=x.device)
    position.scatter_(1, keep, torch.arange(num_kept, device=x.device).expand(batch, -1))
    if selection.fuse is not None:
        fused = (selection.fuse.unsqueeze(-1) * x.float()).sum(dim=1, keepdim=True).to(x.dtype)
        out = torch.cat([out, fused], dim=1)
        if out_size is not None:
            out_size = torch.cat([out_size, out_size.new_ones(batch, 1, 1)], dim=1)
        position = position.masked_fill(position < 0, num_kept)
    if source is not None:
        source = torch.where(source < 0, -1, position.gather(1, source.clamp_min(0)))
    return out, out_size, source


def _kept_per_image(selection: Selection, batch: int) -> Tensor:
    """(B, N - r) the tokens each image keeps."""
    return selection.keep.expand(batch, -1) if selection.keep.dim() == 1 else selection.keep


def follow_prune(side: Tensor, selection: Selection) -> Tensor:
    """Side values of the tokens :func:`prune` keeps; a fused token takes those of the
    dropped token that weighs most in it.

    Args:
        side: (B, N, ...) one value per token.
        selection: the plan the tokens were pruned with.

    Returns:
        (B, N - r, ...) one value per kept token.
    """
    keep = _kept_per_image(selection, side.shape[0])
    if selection.fuse is not None:
        keep = torch.cat([keep, selection.fuse.argmax(dim=1, keepdim=True)], dim=1)
    index = keep.view(*keep.shape, *([1] * (side.dim() - 2))).expand(-1, -1, *side.shape[2:])
    return side.gather(1, index)


# --- the speed reference ---------------------------------------------------------------


def keep_first(evidence: Evidence, r: int, num_protected: int) -> int:
    """The plan of ``cut``: the number of tokens to keep, all but the last r."""
    return evidence.keys.shape[2] - r


def cut(x: Tensor, size: Optional[Tensor], source: Optional[Tensor], keep: int) -> Reduction:
    """The reduction of ``cut``: drop all tokens after the first ``keep`` without looking
    at them, the same token counts as merging at no cost: the speed limit that merging
    is measured against, not a method to use for accuracy. Dropped input tokens get
    source -1. Takes ``x``, ``size`` and ``source`` as :func:`merge` does."""
    if source is not None:
        source = torch.where(source < keep, source, -1)
    return x[:, :keep], (None if size is None else size[:, :keep]), source


def follow_cut(side: Tensor, keep: int) -> Tensor:
    """Side values of the tokens :func:`cut` keeps: the first ``keep``."""
    return side[:, :keep]


# --- the registry ----------------------------------------------------------------------

_REGISTRY: dict[str, Method[Any]] = {}

#: Every registered method by name, in the order registered: a read-only view that
#: follows :func:`register` and :func:`unregister`.
METHODS: Mapping[str, Method[Any]] = MappingProxyType(_REGISTRY)


def register(name: str, method: Method[Plan]) -> Method[Plan]:
    """Make ``method`` available as ``name`` to :func:`tokenmerge.apply` and the tools.

    A name already taken is refused rather than silently replaced, so that a model
    never runs another method than the one its name meant.

    Args:
        name: the name to register it under, as ``tokenmerge.apply(..., method=name)``
            takes it.
        method: the :class:`Method`.

    Returns:
        ``method`` itself.

    Raises:
        ValueError: ``name`` is empty, not a string, or already registered.
        TypeError: ``method`` is not a :class:`Method`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a token reduction method needs a non-empty name, got {name!r}")
    if not isinstance(method, Method):
        raise TypeError(f"{name!r}: a token reduction method is a tokenmerge.methods.Method, got "
                        f"{type(method).__name__}")
    if name in _REGISTRY:
        raise ValueError(f"a token reduction method named {name!r} is already registered; choose another name")
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> Method[Any]:
    """Remove the method registered as ``name``: for a method registered for the length
    of an experiment.

    Args:
        name: its registered name.

    Returns:
        The method removed.

    Raises:
        ValueError: ``name`` is one of the library's own methods, which stay, or is not
            registered.
    """
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is one of the library's own methods and stays registered")
    _check_known(name)
    return _REGISTRY.pop(name)


def resolve(name: str) -> Method[Any]:
    """The method registered as ``name``, for whatever runs or counts it by name.

    Raises:
        ValueError: no method is registered as ``name`` (the message lists those that are).
    """
    _check_known(name)
    return _REGISTRY[name]


def _check_known(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown token reduction method {name!r}; known: {', '.join(_REGISTRY)}")


register("tome", Method(match_keys, merge, follow_merge, merges=True, matches=True))
register("tome-attended", Method(match_keys_sparing_attended, merge, follow_merge, merges=True, matches=True,
                                 needs_class_token=True))
register("tome-random-split", Method(match_keys_random_split, merge_random_split, follow_random_split, merges=True,
                                     matches=True))
register("tome-unweighted", Method(match_keys, merge_unweighted, follow_merge, merges=True, matches=True))
register("tome-features", Method(match_tokens, merge, follow_merge, merges=True, matches=True))
register("random", Method(drop_random, prune, follow_prune))
register("evit", Method(keep_attended, prune, follow_prune, needs_class_token=True))
register("evit-fuse", Method(keep_attended_and_fuse, prune, follow_prune, needs_class_token=True))
register("cut", Method(keep_first, cut, follow_cut, speed_reference=True))

_BUILT_IN = frozenset(_REGISTRY)
