"""What a tuned schedule must reach, and how a FLOP budget per image follows from it:
directly for a FLOP target, through a line fitted to timings for a speed-up or a
latency. Arithmetic only; the timings come from :mod:`.measuring`."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Target:
    """What the schedule must reach: ``speedup`` (measured, over the unpatched model),
    ``flops`` (GFLOPs per image), ``flops_share`` (a fraction of the unpatched model's
    FLOPs) or ``latency_ms`` (per image at batch size 1)."""

    kind: str
    value: float

    def describe(self) -> str:
        return {"speedup": f"speed-up {self.value:g}x", "flops": f"{self.value:g} GFLOPs per image",
                "flops_share": f"{100 * self.value:g}% of the unpatched FLOPs",
                "latency_ms": f"{self.value:g} ms per image"}[self.kind]

    def in_gflops(self, unpatched_flops: float) -> Target:
        """A share of the unpatched FLOPs as GFLOPs per image (other targets as they are),
        so that the schedule file states the budget it met."""
        if self.kind != "flops_share":
            return self
        return Target("flops", self.value * unpatched_flops / 1e9)


@dataclass
class CostLine:
    """Seconds per pass as ``intercept + slope * FLOPs per image``, fitted to timings."""

    intercept: float
    slope: float

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]]) -> CostLine:
        flops = [f for f, _ in points]
        seconds = [s for _, s in points]
        mean_f, mean_s = statistics.fmean(flops), statistics.fmean(seconds)
        spread = sum((f - mean_f) ** 2 for f in flops)
        slope = sum((f - mean_f) * (s - mean_s) for f, s in points) / spread if spread else 0.0
        slope = max(slope, 1e-30)  # more FLOPs never take less time
        return cls(mean_s - slope * mean_f, slope)

    def seconds(self, flops: float) -> float:
        return self.intercept + self.slope * flops

    def flops_for(self, seconds: float) -> float:
        return (seconds - self.intercept) / self.slope

    def through(self, flops: float, seconds: float) -> CostLine:
        """The same slope through a measured point."""
        return CostLine(seconds - self.slope * flops, self.slope)


def budget_for(target: Target, line: Optional[CostLine], unpatched_seconds: Optional[float],
               batch_size: int) -> float:
    """FLOPs per image that meet ``target`` (in GFLOPs if a FLOP target), by the FLOP
    line where it is a time."""
    if target.kind == "flops":
        return target.value * 1e9
    seconds = unpatched_seconds / target.value if target.kind == "speedup" else target.value / 1000 * batch_size
    return line.flops_for(seconds)


def reached(target: Target, speedup: float, latency_ms: float) -> float:
    """How far the measured figure is from the target, relatively: 0 on it, above 0 past it."""
    if target.kind == "speedup":
        return speedup / target.value - 1
    return target.value / latency_ms - 1
