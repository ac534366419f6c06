"""The search for the r schedule (and the variant) that keeps a model closest to its
unmerged outputs within a FLOP budget per image.

It runs nothing and times nothing: schedules are scored by the function it is given
(in ``tokenmerge tune``, the KL divergence on calibration images,
:class:`.measuring.Calibration`), their FLOPs are counted from the token counts, and
the only clock it reads is the one its deadline is on.

1. **Shapes.** For every variant, schedules that change linearly over depth (merging
   early, evenly or late) are fitted to the budget and scored.
2. **Moves.** From the best, merges are moved between two blocks (and the schedule
   refitted to the budget) and kept when the score falls, until no move helps or the
   deadline passes.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.adapters import find_adapter

from ..progress import ProgressBar
from ..settings import variant

#: Linear schedules the search starts from: slope 1 merges early, -1 late.
SLOPES = (1.0, 0.5, 0.0, -0.5, -1.0)
#: Moves in a row that do not help before the search ends, per block.
PATIENCE_PER_BLOCK = 4


@dataclass
class Space:
    """What the search may try on one model: its depth, the merges each block can take
    given the ones before, and the FLOPs of a schedule."""

    network: torch.nn.Module
    img_size: tuple[int, int]

    def __post_init__(self):
        adapter = find_adapter(self.network)
        self.depth = adapter.depth(self.network)
        self.num_tokens, self.num_protected = adapter.token_layout(self.network, self.img_size)

    def flops(self, r: Sequence[int], method: str = "tome") -> float:
        return tokenmerge.flops_per_image(self.network, list(r), self.img_size, method)

    def capped(self, r: Sequence[int]) -> list[int]:
        return schedules.capped([max(0, v) for v in r], self.num_tokens, self.num_protected)

    def most(self) -> list[int]:
        """Every block merging as much as it can: the fewest FLOPs merging reaches."""
        return self.capped([self.num_tokens] * self.depth)

    def fit(self, r: Sequence[int], budget: float, method: str) -> list[int]:
        """``r`` brought within ``budget`` FLOPs, close to it, keeping its shape: every
        block scaled by one factor, then single merges added from the last block on
        while above the budget, and at most one taken away from each block, from the
        last on, while that stays within it (a late merge moves the FLOPs least)."""
        base = [max(0, v) for v in r] if any(r) else [1] * self.depth
        low, high = 0.0, 2.0 * self.num_tokens
        for _ in range(40):
            middle = (low + high) / 2
            if self.flops(self.capped([round(middle * v) for v in base]), method) > budget:
                low = middle
            else:
                high = middle
        r = self.capped([round(high * v) for v in base])
        while self.flops(r, method) > budget:  # one more merge per block, from the last block on
            grown = next((more for i in reversed(range(self.depth))
                          if (more := self.capped(r[:i] + [r[i] + 1] + r[i + 1:])) != r), None)
            if grown is None:
                break
            r = grown
        for i in reversed(range(self.depth)):  # and at most one fewer per block while within budget
            fewer = self.capped(r[:i] + [r[i] - 1] + r[i + 1:]) if r[i] > 0 else r
            if self.flops(fewer, method) <= budget:
                r = fewer
        return r

    def shaped(self, slope: float, budget: float, method: str) -> list[int]:
        """The linear schedule of ``slope`` brought to ``budget``."""
        return self.fit(schedules.Linear(self.num_tokens / self.depth, slope).per_block(self.depth), budget, method)


@dataclass(order=True)
class Score:
    """Mean KL divergence from the unmerged outputs, then the share of images whose
    top-1 differs (in percent): lower is closer."""

    kl: float
    disagreement: float


#: How close a schedule keeps the model: ``score(r, name)`` for variant ``name``
#: (a name of ``tools.settings.variants``).
Scorer = Callable[[list[int], str], Score]


@dataclass
class Candidate:
    r: list[int]
    name: str  # a variant name (tools.settings.variants)
    score: Score


@dataclass
class Search:
    """The best candidate so far and how many schedules were scored."""

    best: Optional[Candidate] = None
    scored: int = 0
    seen: dict[tuple[tuple[int, ...], str], Score] = field(default_factory=dict)

    def consider(self, score: Scorer, r: list[int], name: str) -> bool:
        """Score ``r`` with variant ``name`` (once per schedule); whether it is the new best."""
        key = (tuple(r), name)
        if key not in self.seen:
            self.seen[key] = score(list(r), name)
            self.scored += 1
        candidate = Candidate(list(r), name, self.seen[key])
        if self.best is None or candidate.score < self.best.score:
            self.best = candidate
            return True
        return False


def starts(
    space: Space, names: Sequence[str], budget: float, previous: Optional[Candidate]
) -> list[tuple[list[int], str]]:
    """The (schedule, variant) pairs a search scores first: an earlier search's best
    refitted to ``budget``, then every linear shape of every variant."""
    first = [(space.fit(previous.r, budget, variant(previous.name)[0]), previous.name)] if previous else []
    return first + [(space.shaped(slope, budget, variant(name)[0]), name) for name in names for slope in SLOPES]


def moved(best: Candidate, rng: random.Random) -> list[int]:
    """``best``'s schedule with 1, 2 or 4 merges moved from one block to another."""
    i, j = rng.sample(range(len(best.r)), 2)
    step = rng.choice((1, 2, 4))
    r = list(best.r)
    r[i], r[j] = r[i] + step, max(0, r[j] - step)
    return r


def search(
    space: Space, score: Scorer, names: Sequence[str], budget: float, deadline: float,
    state: Optional[Search] = None, progress: bool = True, seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> Search:
    """The schedule (and variant of ``names``) within ``budget`` FLOPs that ``score``
    rates best, looked for until ``clock()`` passes ``deadline``. Given the ``state``
    of an earlier search (for another budget), its best schedule, refitted, is the
    first one tried and no schedule is scored twice."""
    state = state or Search()
    previous, state.best = state.best, None
    rng = random.Random(seed)
    started = clock()
    with ProgressBar(total=max(1, round(deadline - started)), desc="tuning", disable=not progress,
                     bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s of the budget{postfix}") as bar:

        def in_time() -> bool:
            bar.n = min(round(clock() - started), bar.total)
            bar.set_postfix(best_kl=f"{state.best.score.kl:.4f}", scored=state.scored, refresh=False)
            bar.refresh()
            return clock() < deadline

        for r, name in starts(space, names, budget, previous):
            state.consider(score, r, name)
            if not in_time():
                return state
        failures = 0
        while failures < PATIENCE_PER_BLOCK * space.depth and in_time():
            fitted = space.fit(moved(state.best, rng), budget, variant(state.best.name)[0])
            failures = 0 if state.consider(score, fitted, state.best.name) else failures + 1
    return state
