"""What ``tokenmerge tune`` runs on the model: its outputs on calibration images,
which score a schedule for the search, and its timings, which give the FLOP line of
this device and the speed-up a schedule reaches."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..accuracy import disagreements, kl_divergence_sum
from ..settings import UNPATCHED, Setting, configure, largest_r, setting_runner, variant
from ..timing import spread_percent, time_interleaved, untrusted
from .search import Candidate, Score, Space
from .targets import CostLine, Target


class Calibration:
    """Calibration images and the unmerged model's outputs for them, to score schedules."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, batch_size: int):
        self.model, self.images, self.batch_size = model, images, batch_size
        configure(model, Setting(UNPATCHED))
        self.reference = self.outputs()

    def outputs(self) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.model(self.images[i:i + self.batch_size])
                              for i in range(0, len(self.images), self.batch_size)])

    def score(self, r: list[int], name: str) -> Score:
        """How far the model run with ``r`` and variant ``name`` is from its unmerged
        outputs (a :data:`.search.Scorer`)."""
        method, prop_attn = variant(name)
        configure(self.model, Setting("candidate", list(r), method, prop_attn))
        logits = self.outputs()
        configure(self.model, Setting(UNPATCHED))
        count = len(self.images)
        return Score(kl_divergence_sum(logits, self.reference) / count,
                     100 * disagreements(logits, self.reference) / count)


@dataclass
class Timings:
    """The median seconds per pass of every setting timed, and the spread of its
    timings (interquartile range over the median, in percent)."""

    seconds: dict[str, float]
    spreads: dict[str, float]

    def describe_spread(self) -> str:
        """How far to trust a figure derived from these timings, to end a sentence:
        the spread, or a warning naming the settings whose timings were noisy."""
        warning = untrusted(self.spreads)
        if warning:
            return f"; but {warning}"
        return f" (the timings vary by up to {max(self.spreads.values()):.0f}% between runs)"


def median_seconds(
    model: torch.nn.Module, settings: Sequence[Setting], inputs: torch.Tensor, runs: int, warmup: int = 2,
    progress: bool = False,
) -> Timings:
    runners = {s.name: setting_runner(model, s) for s in settings}
    times = time_interleaved(runners, inputs, runs, warmup, progress=progress, description="timing")
    configure(model, Setting(UNPATCHED))
    return Timings({name: statistics.median(values) for name, values in times.items()},
                   {name: spread_percent(values) for name, values in times.items()})


def timing_inputs(target: Target, img_size: tuple[int, int], batch_size: int, device: torch.device) -> torch.Tensor:
    """Random images to time with: one for a latency, ``batch_size`` otherwise."""
    return torch.randn(1 if target.kind == "latency_ms" else batch_size, 3, *img_size, device=device)


def cost_line_settings(space: Space) -> list[Setting]:
    """The settings timed for the FLOP line: unpatched, and four r up to the largest."""
    top = largest_r(space.network, space.img_size)
    rs = sorted({max(1, round(top * share)) for share in (0.25, 0.5, 0.75, 1.0)})
    return [Setting(UNPATCHED)] + [Setting(f"r={r}", r) for r in rs]


def cost_line(
    model: torch.nn.Module, space: Space, inputs: torch.Tensor, runs: int, progress: bool = False
) -> tuple[CostLine, Timings]:
    """The FLOP line of this device, and the timings it was fitted to (the unpatched
    model's among them)."""
    settings = cost_line_settings(space)
    timings = median_seconds(model, settings, inputs, runs, progress=progress)
    points = [(space.flops([setting.r or 0] * space.depth), timings.seconds[setting.name]) for setting in settings]
    return CostLine.fit(points), timings


@dataclass(frozen=True)
class Measured:
    """A schedule's measured speed-up over the unpatched model, its milliseconds per
    image, and the larger spread of the two timings (IQR over the median, in percent)."""

    speedup: float
    latency_ms: float
    spread_percent: float


def measure(
    model: torch.nn.Module, best: Candidate, inputs: torch.Tensor, runs: int, progress: bool = False
) -> Measured:
    """What ``best`` measures against the unpatched model, interleaved."""
    method, prop_attn = variant(best.name)
    settings = [Setting(UNPATCHED), Setting("best", best.r, method, prop_attn)]
    timings = median_seconds(model, settings, inputs, runs, progress=progress)
    seconds = timings.seconds
    return Measured(seconds[UNPATCHED] / seconds["best"], 1000 * seconds["best"] / len(inputs),
                    max(timings.spreads.values()))


def pass_seconds(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Seconds of one unpatched forward pass over ``inputs`` (after one untimed pass),
    to plan how many timed rounds a budget affords."""
    return median_seconds(model, [Setting(UNPATCHED)], inputs, runs=1, warmup=1).seconds[UNPATCHED]
