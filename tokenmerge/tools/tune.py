"""``tokenmerge tune``: the r schedule (one r per block) and the method that keep a
model closest to its unmerged outputs on calibration images while meeting a target:
a speed-up measured on this device, a FLOP budget or a latency.

How it searches, so that it is cheap enough to need no resuming:

1. **What a FLOP costs here.** The unpatched model and four constant schedules are
   timed interleaved; a line through their (FLOPs, seconds) points turns a target
   speed-up or latency into a FLOP budget per image.
2. **Shapes.** For every method, schedules that change linearly over depth (merging
   early, evenly or late) are scaled to the budget and scored: the mean KL
   divergence of their outputs from the unmerged model's on the calibration images
   (labels are never needed).
3. **Moves.** From the best, merges are moved between two blocks (and the schedule
   refitted to the budget) and kept when the divergence falls, until no move helps or
   ``--budget-minutes`` runs out.
4. **Measured.** The best schedule is timed against the unpatched model; if the
   speed-up or latency misses the target, the FLOP line is corrected through the
   measured point and the schedule refitted, a few times.

The schedule file holds ``{"r": [...], "method", "prop_attn", "measured_speedup",
"target", ...}`` and the environment; every command reads it as ``--r @FILE`` and
Python as ``tokenmerge.apply(model, r=tokenmerge.load_schedule(FILE))``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.adapters import find_adapter
from tokenmerge.state import CappedRWarning

from . import options
from .accuracy import disagreements, kl_divergence_sum
from .data import TolerantImageFiles, balanced_subset, collate_readable, folder_samples
from .models import load_model, unwrap
from .reports import check_output_path, environment
from .settings import UNPATCHED, VARIANTS, Setting, configure, largest_r, setting_runner, variant
from .timing import spread_percent, time_interleaved, untrusted

#: Linear schedules the search starts from: slope 1 merges early, -1 late.
SLOPES = (1.0, 0.5, 0.0, -0.5, -1.0)
#: Corrections of the FLOP budget after measuring, at most.
CORRECTIONS = 4
#: A measured speed-up (or latency) this close to the target, relatively, is kept.
TOLERANCE = 0.02
DEFAULT_METHODS = ("tome", "tome-attended")


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


def parse_speedup(text: str) -> float:
    value = _positive_float(text, "--speedup")
    if value <= 1:
        raise argparse.ArgumentTypeError(f"a speed-up must be more than 1 (the unpatched model is 1), got {text}")
    return value


def parse_flops(text: str) -> Target:
    """GFLOPs per image (``1.2``) or a share of the unpatched model's (``60%``)."""
    if not text.endswith("%"):
        return Target("flops", _positive_float(text, "--flops"))
    share = _positive_float(text[:-1], "--flops") / 100
    if share >= 1:
        raise argparse.ArgumentTypeError(f"--flops {text}: a share of the unpatched model's FLOPs below 100%")
    return Target("flops_share", share)


def parse_latency(text: str) -> float:
    return _positive_float(text, "--latency-ms")


def parse_minutes(text: str) -> float:
    """A search budget: minutes the clock can count down, so neither 0 nor infinite."""
    return _positive_float(text, "--budget-minutes")


def _positive_float(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{option}: expected a finite number, got {text}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{option}: expected a positive number, got {text}")
    return value


# --- the cost of a FLOP ----------------------------------------------------------------


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


# --- schedules within a budget ---------------------------------------------------------


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


# --- how close a schedule keeps the model ------------------------------------------------


@dataclass(order=True)
class Score:
    """Mean KL divergence from the unmerged outputs, then the share of images whose
    top-1 differs: lower is closer."""

    kl: float
    disagreement: float


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

    def score(self, r: Sequence[int], method: str, prop_attn: bool) -> Score:
        configure(self.model, Setting("candidate", list(r), method, prop_attn))
        logits = self.outputs()
        configure(self.model, Setting(UNPATCHED))
        count = len(self.images)
        return Score(kl_divergence_sum(logits, self.reference) / count,
                     100 * disagreements(logits, self.reference) / count)


# --- the search --------------------------------------------------------------------------


@dataclass
class Candidate:
    r: list[int]
    name: str  # a variant name (tools.settings.VARIANTS)
    score: Score


@dataclass
class Search:
    """The best candidate so far and how many schedules were scored."""

    best: Optional[Candidate] = None
    scored: int = 0
    seen: dict = field(default_factory=dict)

    def consider(self, calibration: Calibration, r: list[int], name: str) -> bool:
        """Score ``r`` with variant ``name`` (once per schedule); whether it is the new best."""
        key = (tuple(r), name)
        if key not in self.seen:
            method, prop_attn = variant(name)
            self.seen[key] = calibration.score(r, method, prop_attn)
            self.scored += 1
        candidate = Candidate(list(r), name, self.seen[key])
        if self.best is None or candidate.score < self.best.score:
            self.best = candidate
            return True
        return False


def search(
    space: Space, calibration: Calibration, names: Sequence[str], budget: float, deadline: float,
    state: Optional[Search] = None, progress: bool = True, seed: int = 0,
) -> Search:
    """The schedule (and variant of ``names``) within ``budget`` FLOPs that scores
    best, looked for until the clock passes ``deadline`` (``time.monotonic()``).
    Given the ``state`` of an earlier search (for another budget), its best schedule,
    refitted, is the first one tried and no schedule is scored twice."""
    state = state or Search()
    previous, state.best = state.best, None
    starts = [(space.fit(previous.r, budget, variant(previous.name)[0]), previous.name)] if previous else []
    starts += [(space.shaped(slope, budget, variant(name)[0]), name) for name in names for slope in SLOPES]
    rng = random.Random(seed)
    started = time.monotonic()
    with tqdm(total=max(1, round(deadline - started)), desc="tuning", unit="s", disable=not progress) as bar:

        def tick() -> bool:
            bar.n = min(round(time.monotonic() - started), bar.total)
            bar.set_postfix(best_kl=f"{state.best.score.kl:.4f}", scored=state.scored, refresh=False)
            bar.refresh()
            return time.monotonic() < deadline

        for r, name in starts:
            state.consider(calibration, r, name)
            if not tick():
                return state
        failures, patience = 0, 4 * space.depth
        while failures < patience and tick():
            method = variant(state.best.name)[0]
            i, j = rng.sample(range(space.depth), 2)
            step = rng.choice((1, 2, 4))
            r = list(state.best.r)
            r[i], r[j] = r[i] + step, max(0, r[j] - step)
            improved = state.consider(calibration, space.fit(r, budget, method), state.best.name)
            failures = 0 if improved else failures + 1
    return state


# --- measuring ---------------------------------------------------------------------------


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
    model: torch.nn.Module, settings: Sequence[Setting], inputs: torch.Tensor, runs: int, warmup: int = 2
) -> Timings:
    runners = {s.name: setting_runner(model, s) for s in settings}
    times = time_interleaved(runners, inputs, runs, warmup, progress=False)
    configure(model, Setting(UNPATCHED))
    return Timings({name: statistics.median(values) for name, values in times.items()},
                   {name: spread_percent(values) for name, values in times.items()})


def timing_inputs(target: Target, img_size: tuple[int, int], batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(1 if target.kind == "latency_ms" else batch_size, 3, *img_size, device=device)


def cost_line(model: torch.nn.Module, space: Space, inputs: torch.Tensor, runs: int) -> tuple[CostLine, Timings]:
    """The FLOP line of this device, and the timings it was fitted to (the unpatched
    model's among them)."""
    top = largest_r(space.network, space.img_size)
    rs = sorted({max(1, round(top * share)) for share in (0.25, 0.5, 0.75, 1.0)})
    settings = [Setting(UNPATCHED)] + [Setting(f"r={r}", r) for r in rs]
    timings = median_seconds(model, settings, inputs, runs)
    points = [(space.flops([0] * space.depth), timings.seconds[UNPATCHED])]
    points += [(space.flops([r] * space.depth), timings.seconds[f"r={r}"]) for r in rs]
    return CostLine.fit(points), timings


def budget_for(target: Target, line: Optional[CostLine], unpatched_seconds: float, unpatched_flops: float,
               batch_size: int) -> float:
    """FLOPs per image that meet ``target``, by the FLOP line where it is a time."""
    if target.kind == "flops":
        return target.value * 1e9
    seconds = unpatched_seconds / target.value if target.kind == "speedup" else target.value / 1000 * batch_size
    return line.flops_for(seconds)


def reached(target: Target, speedup: float, latency_ms: float) -> float:
    """How far the measured figure is from the target, relatively: 0 on it, above 0 past it."""
    if target.kind == "speedup":
        return speedup / target.value - 1
    return target.value / latency_ms - 1


# --- the command ---------------------------------------------------------------------


def calibration_images(args: argparse.Namespace, found: list[tuple[Path, int]], transform: Callable) -> torch.Tensor:
    """The decoded calibration images: ``--images`` of the image files ``found`` in
    ``--data``, after saying how many it holds; unreadable files are left out with a note."""
    samples = balanced_subset(found, args.images, args.seed)
    sample = f" (a sample of {len(found)}, seed {args.seed})" if len(samples) < len(found) else ""
    print(f"{args.model}: calibrating on {len(samples)} image files{sample} in {args.data}", flush=True)
    loader = DataLoader(TolerantImageFiles(samples, transform), batch_size=64, collate_fn=collate_readable)
    batches, unreadable = [], []
    for batch in loader:
        unreadable += batch.unreadable
        if batch.images is not None:
            batches.append(batch.images)
    if unreadable:
        options.note("tune", f"{len(unreadable)} unreadable images left out: "
                     f"{', '.join(item.path for item in unreadable)}")
    if not batches:
        raise ValueError(f"none of the {len(samples)} images in {args.data} could be read")
    return torch.cat(batches)


def check_names(names: Sequence[str], num_protected: int) -> list[str]:
    """The variants to search: merging ones only (pruning loses more), those that need
    a class token only where there is one."""
    merging = [name for name in names if variant(name)[0].startswith("tome")]
    if not merging:
        raise ValueError(f"--methods {','.join(names)}: tune searches merging methods; give some of "
                         f"{', '.join(n for n in VARIANTS if n.startswith('tome'))}")
    usable = [name for name in merging if num_protected >= 1 or variant(name)[0] != "tome-attended"]
    if not usable:
        raise ValueError("tome-attended needs a class token, and the model has none; give --methods tome")
    return usable


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="find the r schedule that keeps the model closest to its unmerged outputs at a target speed",
        description="Search per-block r schedules (and the merging method) for the one that keeps the model "
        "closest to its unmerged outputs on unlabelled calibration images (mean KL divergence), at a speed-up "
        "measured on this device, a FLOP budget or a latency, and write it to a JSON file that every command "
        "reads as --r @FILE.",
    )
    options.add_model_options(parser)
    group = parser.add_argument_group("target (one of)")
    targets = group.add_mutually_exclusive_group(required=True)
    targets.add_argument("--speedup", type=parse_speedup, metavar="S",
                         help="throughput over the unpatched model, measured here at --batch-size, e.g. 1.8")
    targets.add_argument("--flops", type=parse_flops, metavar="G",
                         help="GFLOPs per image (e.g. 1.2), or a share of the unpatched model's (e.g. 60%%)")
    targets.add_argument("--latency-ms", type=parse_latency, metavar="MS",
                         help="milliseconds per image at batch size 1, measured here")
    group = parser.add_argument_group("search")
    group.add_argument("--data", required=True, metavar="DIR",
                       help="calibration images: any image files under DIR, at any depth; no labels needed")
    group.add_argument("--images", type=options.positive_int, default=256, metavar="N",
                       help="calibration images to use, drawn with --seed (default: 256)")
    group.add_argument("--seed", type=int, default=0, help="seed of the image draw and of the search (default: 0)")
    group.add_argument("--methods", type=options.parse_methods, default=list(DEFAULT_METHODS), metavar="M,M,...",
                       help=f"merging methods to search (default: {','.join(DEFAULT_METHODS)}; tome-attended where "
                       "the model has a class token)")
    group.add_argument("--budget-minutes", type=parse_minutes, default=10.0, metavar="M",
                       help="stop searching after M minutes with the best found (default: 10)")
    group.add_argument("--batch-size", type=options.positive_int, default=16,
                       help="images per batch when timing a speed-up, as in bench (default: 16)")
    group.add_argument("--runs", type=options.positive_int, default=20,
                       help="timed rounds per measurement (default: 20)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the schedule file to write (.json)")
    options.add_runtime_options(parser, dtype=False, amp=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.output, (".json",))
    device = options.check_runtime(args)
    found = folder_samples(args.data, labels=False)  # a missing or empty folder fails before the model loads
    model = load_model(args.library, args.model, args.checkpoint, num_classes=args.num_classes,
                       model_kwargs=args.model_kwargs, img_size=args.img_size)
    model = model.eval().to(device)
    network = unwrap(model)
    space = Space(network, tuple(find_adapter(network).input_size(network)))
    names = check_names(args.methods, space.num_protected)
    result = tune(model, space, calibration_images(args, found, model.transform).to(device), target_of(args), names,
                  args.budget_minutes, args.batch_size, args.runs, args.seed)
    record = {
        "r": result["r"], "method": result["method"], "prop_attn": result["prop_attn"],
        "measured_speedup": result["measured_speedup"], "target": {result["target"].kind: result["target"].value},
        "model": args.model, "library": args.library, "checkpoint": args.checkpoint,
        "img_size": list(space.img_size), "depth": space.depth, "batch_size": args.batch_size,
        "gflops": result["gflops"], "unpatched_gflops": result["unpatched_gflops"],
        "latency_ms": result["latency_ms"],
        "calibration": {"data": args.data, "images": result["images"], "kl": result["score"].kl,
                        "disagreement_percent": result["score"].disagreement},
        "search": {"schedules_scored": result["scored"], "seconds": result["seconds"], "methods": names},
        "environment": environment(device),
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.model}: r={'/'.join(map(str, result['r']))} with {result['name']}; measured speed-up "
          f"{result['measured_speedup']:.2f}x at batch {args.batch_size} ({result['target'].describe()} asked), "
          f"{result['gflops']:.2f} of {result['unpatched_gflops']:.2f} GFLOPs; on {result['images']} calibration "
          f"images KL {result['score'].kl:.4f}, top-1 differs on {result['score'].disagreement:.1f}%; "
          f"{result['scored']} schedules scored in {result['seconds']:.0f} s; wrote {args.output}", flush=True)


def target_of(args: argparse.Namespace) -> Target:
    if args.speedup is not None:
        return Target("speedup", args.speedup)
    if args.latency_ms is not None:
        return Target("latency_ms", args.latency_ms)
    return args.flops


def tune(
    model: torch.nn.Module, space: Space, images: torch.Tensor, target: Target, names: Sequence[str],
    budget_minutes: float, batch_size: int = 16, runs: int = 20, seed: int = 0, progress: bool = True,
) -> dict:
    """The best schedule for ``target`` and what was measured of it, as the fields of
    the schedule file; a share of the FLOPs is turned into GFLOPs first."""
    if not 0 < budget_minutes < math.inf:
        raise ValueError(f"budget_minutes must be a positive, finite number of minutes, got {budget_minutes}")
    started = time.monotonic()
    deadline = started + 60 * budget_minutes
    unpatched_flops = space.flops([0] * space.depth)
    if target.kind == "flops_share":
        target = Target("flops", target.value * unpatched_flops / 1e9)
    inputs = timing_inputs(target, space.img_size, batch_size, images.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        line, timings = (None, None) if target.kind == "flops" else cost_line(model, space, inputs, runs)
        unpatched_seconds = timings.seconds[UNPATCHED] if timings else None
        timed_batch = len(inputs)
        fewest = min(space.flops(space.most(), variant(name)[0]) for name in names)
        budget = budget_for(target, line, unpatched_seconds, unpatched_flops, timed_batch)
        check_reachable(target, budget, fewest, unpatched_flops, line, timings, timed_batch)
        calibration = Calibration(model, images, max(batch_size, 32))
        state = search(space, calibration, names, budget, deadline, progress=progress, seed=seed)
        measured = measure(model, state.best, inputs, runs)
        for _ in range(CORRECTIONS if target.kind != "flops" else 0):
            if abs(reached(target, *measured)) <= TOLERANCE:
                break
            flops = space.flops(state.best.r, variant(state.best.name)[0])
            line = line.through(flops, unpatched_seconds / measured[0])
            budget = max(fewest, budget_for(target, line, unpatched_seconds, unpatched_flops, timed_batch))
            state = search(space, calibration, names, budget, max(deadline, time.monotonic() + 1), state,
                           progress=False, seed=seed)
            measured = measure(model, state.best, inputs, runs)
    best = state.best
    method, prop_attn = variant(best.name)
    return {
        "r": best.r, "name": best.name, "method": method, "prop_attn": prop_attn, "target": target,
        "measured_speedup": measured[0], "latency_ms": measured[1] if target.kind == "latency_ms" else None,
        "gflops": space.flops(best.r, method) / 1e9, "unpatched_gflops": unpatched_flops / 1e9,
        "score": best.score, "images": len(images), "scored": state.scored, "seconds": time.monotonic() - started,
    }


def measure(model: torch.nn.Module, best: Candidate, inputs: torch.Tensor, runs: int) -> tuple[float, float]:
    """The measured speed-up of ``best`` over the unpatched model, and its milliseconds
    per image."""
    method, prop_attn = variant(best.name)
    settings = [Setting(UNPATCHED), Setting("best", best.r, method, prop_attn)]
    seconds = median_seconds(model, settings, inputs, runs).seconds
    return seconds[UNPATCHED] / seconds["best"], 1000 * seconds["best"] / len(inputs)


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
