"""The best schedule for a target, found and measured: :func:`tune` times the FLOP
line of this device, runs the :mod:`.search` within the budget it gives, measures
the best schedule and corrects the line through the measured point a few times when
the speed-up or latency misses the target. It returns a :class:`TuneResult`, from
which the schedule file is written."""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tokenmerge.state import CappedRWarning

from ..settings import UNPATCHED, variant
from ..timing import MIN_TIMED_ROUNDS, TRUSTED_SPREAD_PERCENT
from .measuring import (
    Calibration,
    Measured,
    Timings,
    cost_line,
    cost_line_settings,
    measure,
    pass_seconds,
    timing_inputs,
)
from .search import Search, Space, search
from .targets import CostLine, Target, budget_for, reached

#: Corrections of the FLOP budget after measuring, at most.
CORRECTIONS = 4
#: A measured speed-up (or latency) this close to the target, relatively, is kept.
TOLERANCE = 0.02
#: The share of the budget that timing may take: the FLOP line and the final measurements.
TIMING_SHARE = 0.3


@dataclass(frozen=True)
class TuneResult:
    """The schedule tuned for ``target`` and what was measured of it."""

    r: list[int]
    variant_name: str  # the variant tuned with, a name of tools.settings.variants
    method: str
    prop_attn: bool
    target: Target  # a share of the FLOPs already turned into GFLOPs
    measured_speedup: float  # over the unpatched model, at batch_size (at 1 for a latency)
    measured_spread_percent: float  # the larger interquartile range of the two timings, over their medians
    latency_ms: Optional[float]  # per image, measured only for a latency target
    gflops: float  # per image
    unpatched_gflops: float
    kl: float  # mean KL divergence from the unmerged outputs on the calibration images
    disagreement_percent: float  # of calibration images whose top-1 differs from the unmerged one
    calibration_images: int
    batch_size: int
    img_size: tuple[int, int]
    depth: int
    methods: list[str]  # the variants searched
    schedules_scored: int
    seconds: float  # the whole tuning, timings included

    def record(self, model: str, library: str, checkpoint: Optional[str], data: str,
               environment: dict[str, Any]) -> dict[str, Any]:
        """The schedule file's content (JSON-ready), given what tuning did not see: the
        model's name, library and checkpoint, the calibration folder and the machine."""
        return {
            "r": self.r, "method": self.method, "prop_attn": self.prop_attn,
            "measured_speedup": self.measured_speedup, "measured_spread_percent": self.measured_spread_percent,
            "target": {self.target.kind: self.target.value},
            "model": model, "library": library, "checkpoint": checkpoint,
            "img_size": list(self.img_size), "depth": self.depth, "batch_size": self.batch_size,
            "gflops": self.gflops, "unpatched_gflops": self.unpatched_gflops, "latency_ms": self.latency_ms,
            "calibration": {"data": data, "images": self.calibration_images, "kl": self.kl,
                            "disagreement_percent": self.disagreement_percent},
            "search": {"schedules_scored": self.schedules_scored, "seconds": self.seconds, "methods": self.methods},
            "environment": environment,
        }

    def describe(self) -> str:
        """One sentence of what was found and measured."""
        return (f"r={'/'.join(map(str, self.r))} with {self.variant_name}; measured speed-up "
                f"{self.measured_speedup:.2f}x (spread {self.measured_spread_percent:.0f}%) at batch {self.batch_size} "
                f"({self.target.describe()} asked), "
                f"{self.gflops:.2f} of {self.unpatched_gflops:.2f} GFLOPs; on {self.calibration_images} calibration "
                f"images KL {self.kl:.4f}, top-1 differs on {self.disagreement_percent:.1f}%; "
                f"{self.schedules_scored} schedules scored in {self.seconds:.0f} s")


def tune(
    model: torch.nn.Module, space: Space, images: torch.Tensor, target: Target, names: Sequence[str],
    budget_minutes: float, batch_size: int = 16, runs: int = 20, seed: int = 0, progress: bool = True,
) -> TuneResult:
    """The best schedule for ``target`` among the variants ``names``, scored on the
    calibration ``images`` and searched for ``budget_minutes``, and what was measured
    of it; a share of the FLOPs is turned into GFLOPs first."""
    if not 0 < budget_minutes < math.inf:
        raise ValueError(f"budget_minutes must be a positive, finite number of minutes, got {budget_minutes}")
    started = time.monotonic()
    deadline = started + 60 * budget_minutes
    unpatched_flops = space.flops([0] * space.depth)
    target = target.in_gflops(unpatched_flops)
    inputs = timing_inputs(target, space.img_size, batch_size, images.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        one_pass = pass_seconds(model, inputs)
        runs = affordable_runs(runs, one_pass, len(cost_line_settings(space)) + 4, 60 * budget_minutes)
        measuring = 2 * (runs + 2) * one_pass  # unpatched and the best schedule, warm-up included
        line, timings = (None, None) if target.kind == "flops" else cost_line(model, space, inputs, runs, progress)
        unpatched_seconds = timings.seconds[UNPATCHED] if timings else None
        fewest = min(space.flops(space.most(), variant(name)[0]) for name in names)
        budget = budget_for(target, line, unpatched_seconds, len(inputs))
        check_reachable(target, budget, fewest, unpatched_flops, line, timings, len(inputs))
        calibration = Calibration(model, images, max(batch_size, 32))
        # the final measurement, and one more if it is too noisy to trust, come out of the budget too
        state = search(space, calibration.score, names, budget, deadline - 2 * measuring, progress=progress,
                       seed=seed)
        measured = measure(model, state.best, inputs, runs, progress)
        for _ in range(CORRECTIONS if target.kind != "flops" else 0):
            if abs(reached(target, measured.speedup, measured.latency_ms)) <= TOLERANCE:
                break
            if time.monotonic() + 3 * measuring > deadline:
                break
            line = line.through(space.flops(state.best.r, variant(state.best.name)[0]),
                                unpatched_seconds / measured.speedup)
            budget = max(fewest, budget_for(target, line, unpatched_seconds, len(inputs)))
            state = search(space, calibration.score, names, budget, deadline - 2 * measuring, state,
                           progress=False, seed=seed)
            measured = measure(model, state.best, inputs, runs, progress)
        if measured.spread_percent > TRUSTED_SPREAD_PERCENT and time.monotonic() + measuring <= deadline:
            again = measure(model, state.best, inputs, runs, progress)
            measured = min(measured, again, key=lambda m: m.spread_percent)
    return result_of(state, space, target, measured, unpatched_flops, len(images), batch_size, names,
                     time.monotonic() - started)


def affordable_runs(runs: int, pass_seconds: float, settings: int, budget_seconds: float) -> int:
    """Timed rounds per measurement: ``runs``, or fewer where timing ``settings``
    settings (the FLOP line's and two final measurements') would take more than
    :data:`TIMING_SHARE` of the budget; never fewer than
    :data:`~tokenmerge.tools.timing.MIN_TIMED_ROUNDS` (or ``runs``, if fewer are asked)."""
    affordable = int(TIMING_SHARE * budget_seconds / (settings * max(pass_seconds, 1e-6))) - 2
    return max(min(runs, MIN_TIMED_ROUNDS), min(runs, affordable))


def result_of(state: Search, space: Space, target: Target, measured: Measured, unpatched_flops: float,
              images: int, batch_size: int, names: Sequence[str], seconds: float) -> TuneResult:
    """The :class:`TuneResult` of a search's best schedule and its measured speed-up
    and milliseconds per image."""
    best = state.best
    method, prop_attn = variant(best.name)
    return TuneResult(
        r=best.r, variant_name=best.name, method=method, prop_attn=prop_attn, target=target,
        measured_speedup=measured.speedup, measured_spread_percent=measured.spread_percent,
        latency_ms=measured.latency_ms if target.kind == "latency_ms" else None,
        gflops=space.flops(best.r, method) / 1e9, unpatched_gflops=unpatched_flops / 1e9,
        kl=best.score.kl, disagreement_percent=best.score.disagreement, calibration_images=images,
        batch_size=batch_size, img_size=space.img_size, depth=space.depth, methods=list(names),
        schedules_scored=state.scored, seconds=seconds,
    )


def check_reachable(target: Target, budget: float, fewest: float, unpatched_flops: float,
                    line: Optional[CostLine], timings: Optional[Timings], batch: int) -> None:
    """A one-line error, saying what is reachable, for a target merging cannot meet;
    for a timed target also how much the timings varied, since on a busy machine the
    figure it gives is noise rather than a limit."""
    if target.kind == "flops":
        if budget >= unpatched_flops:
            raise ValueError(f"--flops: the unpatched model takes {unpatched_flops / 1e9:.2f} GFLOPs per image "
                             "already; ask for fewer")
        if budget < fewest:
            raise ValueError(f"--flops {target.value:.3g} GFLOPs cannot be reached: with every block merging as "
                             f"much as it can the model takes {fewest / 1e9:.2f}; ask for at least that")
        return
    fastest, unpatched_seconds, spread = line.seconds(fewest), timings.seconds[UNPATCHED], timings.describe_spread()
    if target.kind == "speedup" and budget < fewest:
        raise ValueError(f"--speedup {target.value:g} cannot be reached here: with every block merging as much "
                         f"as it can the model is about {unpatched_seconds / fastest:.2f}x faster; ask for at "
                         f"most that{spread}")
    if target.kind == "latency_ms":
        unpatched_ms = 1000 * unpatched_seconds / batch
        if target.value >= unpatched_ms:
            raise ValueError(f"--latency-ms {target.value:g}: the unpatched model takes {unpatched_ms:.1f} ms per "
                             f"image here already; ask for less{spread}")
        if budget < fewest:
            raise ValueError(f"--latency-ms {target.value:g} cannot be reached here: with every block merging as "
                             f"much as it can an image takes about {1000 * fastest / batch:.1f} ms; ask for at "
                             f"least that{spread}")
