"""Timing forward passes: synchronised, warm-up excluded, settings interleaved, and
the spread of the timings judged before a figure is trusted."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from .progress import ProgressBar

#: An interquartile range above this share of the median makes a timing untrustworthy.
TRUSTED_SPREAD_PERCENT = 10.0
#: The fewest timed repetitions of a setting from which its spread is estimated.
MIN_TIMED_ROUNDS = 5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The output of ``run(inputs)`` and the seconds it took, the device synchronised."""
    synchronize(inputs.device)
    start = time.perf_counter()
    output = run(inputs)
    synchronize(inputs.device)
    return output, time.perf_counter() - start


def time_interleaved(
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    inputs: torch.Tensor,
    runs: int,
    warmup: int,
    progress: bool = True,
    description: str = "timing",
) -> dict[str, list[float]]:
    """Seconds per forward pass of every runner over ``runs`` interleaved rounds
    (runner 1, runner 2, ..., runner 1, ...), after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    total = (runs + warmup) * len(runners)
    with torch.inference_mode(), ProgressBar(total=total, disable=not progress, desc=description, unit="pass") as bar:
        for round_index in range(warmup + runs):
            for name, run in runners.items():
                _, seconds = timed(run, inputs)
                if round_index >= warmup:
                    times[name].append(seconds)
                bar.update()
    return times


def interquartile_range(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def spread_percent(values: Sequence[float]) -> float:
    """The interquartile range of ``values`` in percent of their median."""
    return 100 * interquartile_range(values) / statistics.median(values)


#: What to do about noisy timings, in the words of the commands that time rounds.
MORE_RUNS = "measure again with more --runs, fewer --threads or on a quieter machine"


def untrusted(spreads: dict[str, float], remedy: str = MORE_RUNS) -> str:
    """A warning naming the timings whose spread is too large to trust (all of them
    as "every setting"), with ``remedy``, or ``""``."""
    noisy = {name: spread for name, spread in spreads.items() if spread > TRUSTED_SPREAD_PERCENT}
    if not noisy:
        return ""
    worst = max(noisy.values())
    named = "every setting" if len(noisy) == len(spreads) > 1 else ", ".join(noisy)
    return (f"the timings of {named} vary by up to {worst:.0f}% (interquartile range over the median, "
            f"trusted up to {TRUSTED_SPREAD_PERCENT:.0f}%): the machine was busy and these timings are not to be "
            f"trusted; {remedy}")


def too_few_rounds(rounds: dict[str, int], unit: str = "rounds", remedy: str = MORE_RUNS) -> str:
    """A warning naming the timings with fewer than :data:`MIN_TIMED_ROUNDS` timed
    repetitions (``unit``), whose spread cannot be estimated, with ``remedy``, or ``""``."""
    few = {name: count for name, count in rounds.items() if count < MIN_TIMED_ROUNDS}
    if not few:
        return ""
    listed = ", ".join(f"{name} ({count})" for name, count in few.items())
    return (f"{listed} timed over fewer than {MIN_TIMED_ROUNDS} {unit}: the spread is unknown and the speed is "
            f"not to be trusted; {remedy}")


def speed_warnings(
    speedups: dict[str, float],
    spreads: dict[str, float],
    of_limit: Optional[dict[str, float]] = None,
    remedy: str = MORE_RUNS,
) -> list[str]:
    """Warnings for every speed figure not to be taken as fact: timings whose spread is
    too large (:func:`untrusted`); settings measured slower than the unpatched model (a
    speed-up below 1), which is timing noise where they merge little and means merging
    does not pay on this machine where the spread is small; and settings measured faster
    than their zero-overhead limit (``of_limit`` above 1), which can only be noise.
    ``remedy`` says what to do about noise."""
    noisy = untrusted(spreads, remedy)
    warnings = [noisy] if noisy else []
    slower = {name: speedup for name, speedup in speedups.items() if speedup < 1}
    if slower:
        listed = ", ".join(f"{name} {speedup:.2f}x" for name, speedup in slower.items())
        warnings.append(f"{listed} measured slower than the unpatched model: within the spread this is noise; "
                        "otherwise merging does not pay for this model on this machine")
    beyond = {name: share for name, share in (of_limit or {}).items() if share > 1}
    if beyond:
        listed = ", ".join(f"{name} {100 * share:.0f}%" for name, share in beyond.items())
        warnings.append(f"{listed} of the cut limit: faster than tokens cut without any merging cost, which is "
                        f"timing noise; {remedy}")
    return warnings


def steady_throughput(items: Sequence[int], seconds: Sequence[float]) -> tuple[float, float, int]:
    """Items per second over the steps after the first (which warms up: allocations,
    loader workers starting), the spread of the seconds per item of those steps in
    percent (:func:`spread_percent`), and how many steps were timed. With a single
    step, that step is all there is."""
    timed_items, timed_seconds = (items[1:], seconds[1:]) if len(items) > 1 else (items, seconds)
    per_item = [step / count for count, step in zip(timed_items, timed_seconds)]
    return sum(timed_items) / sum(timed_seconds), spread_percent(per_item), len(timed_items)
