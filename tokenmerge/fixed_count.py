"""Tokens reduced to a fixed count in one place, by rounds of a reduction method.

A block of a ViT merges ``r`` tokens between its branches. Where tokens leave a model
for another (the visual tokens a vision-language model hands to its language model),
the count that matters is the one they arrive with: :func:`reduce_to` takes a set of
tokens down to exactly ``count`` by running the method again and again, each round
merging a share of what is left (:data:`ROUND_SHARE`), with the keys merged as the
tokens are so that every round matches on what it reduces.

Nothing here knows about models; the adapters say which tokens and keys to give.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import methods
from .merge import initial_source, max_merges


class Reduced(NamedTuple):
    """Tokens after :func:`reduce_to`.

    Attributes:
        tokens: (B, count, C) the reduced tokens.
        size: (B, count, 1) how many input tokens each stands for (float32).
        source: (B, N) for every input token, the index of the reduced token it ended in.
        sides: the side tensors given, each (B, count, ...), every reduced token with
            the values of the input token it was built on (positions, say).
    """

    tokens: Tensor
    size: Tensor
    source: Tensor
    sides: dict[str, Tensor]


def target_count(full: int, count: int | float) -> int:
    """The tokens to keep of ``full``: ``count`` itself if a whole number (never more
    than ``full``), or that fraction of ``full`` if a float in (0, 1], at least one.

    Raises:
        ValueError: a count below 1, a fraction outside (0, 1], or not a number.
    """
    check_count(count)
    if isinstance(count, float):
        return min(full, max(1, round(count * full)))
    return min(full, count)


def check_count(count: object) -> None:
    """Refuse a count that :func:`target_count` cannot read, naming what it takes."""
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        raise ValueError(f"visual_tokens must be a whole number of tokens or a fraction in (0, 1], got {count!r}")
    if isinstance(count, int) and count < 1:
        raise ValueError(f"visual_tokens must keep at least 1 token, got {count}")
    if isinstance(count, float) and not 0 < count <= 1:
        raise ValueError(f"visual_tokens as a fraction must be in (0, 1], got {count!r}")


#: The share of what is left that one round may reduce. Bipartite matching could take
#: half in one round, but that merges every A token whatever its best match; smaller
#: rounds match again on merged keys, as ToMe's blocks do, and cost little (each is one
#: (N/2, N/2) similarity).
ROUND_SHARE = 0.25


def rounds(num_tokens: int, count: int) -> list[int]:
    """The r of every round that takes ``num_tokens`` down to ``count``: a quarter of
    what is left (:data:`ROUND_SHARE`, at least one), the last round the rest."""
    schedule = []
    while num_tokens > count:
        r = min(num_tokens - count, max(1, int(ROUND_SHARE * num_tokens)), max_merges(num_tokens))
        schedule.append(r)
        num_tokens -= r
    return schedule


def reduce_to(
    tokens: Tensor,
    keys: Tensor,
    count: int,
    method: str = "tome",
    size: Optional[Tensor] = None,
    sides: Optional[dict[str, Tensor]] = None,
) -> Reduced:
    """Reduce (B, N, C) ``tokens`` to exactly ``count`` per row with ``method``.

    Args:
        tokens: (B, N, C) the tokens, the same number in every row.
        keys: (B, N, D) what the method matches on (ToMe: attention keys averaged over
            heads); reduced along with the tokens, weighted by size.
        count: the tokens to keep, 1 to N.
        method: a registered method that needs no class token (:mod:`tokenmerge.methods`).
        size: (B, N, 1) the tokens' sizes, if they already stand for several inputs.
        sides: per-token tensors (B, N, ...) that follow the reduction (each reduced
            token takes the values of the token it was built on).

    Returns:
        The :class:`Reduced` tokens; with ``count`` = N, the tokens themselves.

    Raises:
        ValueError: ``count`` out of range, or a method that needs a class token.
    """
    batch, num_tokens = tokens.shape[:2]
    if not 1 <= count <= num_tokens:
        raise ValueError(f"cannot keep {count} of {num_tokens} tokens; keep 1 to {num_tokens}")
    steps = methods.resolve(method)
    if steps.needs_class_token:
        raise ValueError(f"method {method!r} plans with a class token's attention, which these tokens do not carry; "
                         "use tome, tome-features, random or cut")
    sides = dict(sides or {})
    if size is None:
        size = torch.ones(batch, num_tokens, 1, device=tokens.device)
    source = initial_source(batch, num_tokens, tokens.device)
    for index, r in enumerate(rounds(num_tokens, count)):
        heads = keys.unsqueeze(1)  # (B, 1, N, D): one head, as the methods take keys
        plan = steps.plan(methods.Evidence(tokens, heads, heads, size, index), r, 0)
        sides = {name: steps.follow(side, plan) for name, side in sides.items()}
        keys = steps.reduce(keys, size, None, plan)[0]
        tokens, new_size, new_source = steps.reduce(tokens, size, source, plan)
        size = new_size if new_size is not None else steps.follow(size, plan)
        source = new_source if new_source is not None else source
    return Reduced(tokens, size, source, sides)
