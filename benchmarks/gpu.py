"""Every GPU figure in one run of at most 8 minutes, printed as Markdown as it goes.

    python benchmarks/gpu.py              # on one CUDA GPU (sized for an H200)
    python benchmarks/gpu.py --smoke      # tiny models on the CPU, float32, about a minute: that it runs
    python benchmarks/gpu.py --sections compiled-throughput --dtypes float16   # what a run skipped

Sections (random weights; no model hub needed):

1. eager-throughput: ViT-B/16 at batch 256 in float16 and bfloat16, merged against
   the cut limit (the same token counts, tokens cut unseen) and the unpatched model
   at r=8, 13 and 16.
2. eager-latency: batch 1, ViT-S/16 and ViT-B/16 in float16, merged at every r
   against the unpatched model.
3. training: steps (forward, backward, AdamW step) of ViT-B/16 under bfloat16
   autocast at batch 128, merged at r=13 against its cut limit and the unpatched
   model, as ``benchmarks/train_speed.py`` takes them (``train_step``, A B C C B A).
4. attention: one proportional attention call per formulation
   (``proportional_attention(..., formulation=)``, skipped if this version has none)
   at the token counts ViT-B/16 merges to, at batch 256, as SDPA picks its backend
   and with each backend forced by ``torch.nn.attention.sdpa_kernel`` ("refused":
   that backend does not take it).
5. compiled-latency and 6. compiled-throughput: sections 2 and 1 with every setting
   compiled once by ``tokenmerge.compile`` (inductor; CUDA graphs on a GPU), the
   first call, which compiles, timed apart ("compile s").

Every figure is a median over rounds in which the settings take turns, after untimed
warm-up rounds (stated with each table; compiled settings get at least three, which
CUDA graphs need to record), with the interquartile range in percent of the median;
inference runs under ``torch.inference_mode``, and the device is synchronised around
every timed call. Each section, and each model or dtype in it, runs in its own
try/except: an error is printed, the rest still runs, and the exit status is 1. A
compiled group whose compiles would overrun ``--budget`` (450 s from the start) is
skipped with a note that says how to run it alone.
"""
from __future__ import annotations

import argparse
import copy
import gc
import inspect
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Optional

import timm
import timm.optim
import torch
from speed import compiled_runners

import tokenmerge
from tokenmerge.state import CappedRWarning
from tokenmerge.tools.settings import Setting, configure
from tokenmerge.tools.timing import interquartile_range, synchronize, time_interleaved
from tokenmerge.tools.train import train_step

Runner = Callable[[torch.Tensor], torch.Tensor]

TIMM_NAMES = {"ViT-S/16": "vit_small_patch16_224", "ViT-B/16": "vit_base_patch16_224"}
#: What --smoke builds instead: 3 blocks on 32x32 images in 4x4 patches (64 patches).
SMOKE_SHAPES = {"ViT-S/16": dict(embed_dim=48, num_heads=3), "ViT-B/16": dict(embed_dim=96, num_heads=3)}
SECTIONS = ("eager-throughput", "eager-latency", "training", "attention", "compiled-latency", "compiled-throughput")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Plan:
    """What a run measures, and how many rounds: the GPU run, or --smoke's tiny CPU one."""

    smoke: bool
    device: torch.device
    dtypes: tuple[torch.dtype, ...]  # throughput and attention
    latency_dtype: torch.dtype
    train_autocast: Optional[torch.dtype]
    batch: int  # throughput and attention
    train_batch: int
    throughput_rounds: tuple[int, int]  # (timed, warm-up)
    latency_rounds: tuple[int, int]
    train_rounds: tuple[int, int]  # steps per setting (timed, warm-up)
    attention_rounds: tuple[int, int]
    attention_calls: int  # calls per timed round
    compile_guess_s: float  # per setting, until one is measured
    budget_s: float
    compile_kwargs: dict = field(default_factory=dict)
    threads: Optional[int] = None  # torch's CPU threads (default: torch's own)
    rs: tuple[int, ...] = (8, 13, 16)
    train_r: int = 13


GPU = Plan(smoke=False, device=torch.device("cuda"), dtypes=(torch.float16, torch.bfloat16),
           latency_dtype=torch.float16, train_autocast=torch.bfloat16, batch=256, train_batch=128,
           throughput_rounds=(20, 3), latency_rounds=(100, 10), train_rounds=(20, 5), attention_rounds=(10, 2),
           attention_calls=20, compile_guess_s=40.0, budget_s=450.0)
SMOKE = Plan(smoke=True, device=torch.device("cpu"), dtypes=(torch.float32,), latency_dtype=torch.float32,
             train_autocast=None, batch=2, train_batch=2, throughput_rounds=(3, 1), latency_rounds=(3, 1),
             train_rounds=(3, 1), attention_rounds=(3, 1), attention_calls=2, compile_guess_s=3.0, budget_s=600.0,
             compile_kwargs={"backend": "eager"},  # dynamo's graphs run eagerly: inductor would take minutes
             threads=1)  # tiny passes on a shared CPU: more threads wait on each other


def say(text: str = "") -> None:
    print(text, flush=True)


def name_of(dtype: Optional[torch.dtype]) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median_and_spread(values: Sequence[float]) -> tuple[float, str]:
    median = statistics.median(values)
    return median, f"{100 * interquartile_range(values) / median:.1f}"


class OverBudget(Exception):
    """The --budget is spent: what is left of a group is skipped, not failed."""


class Clock:
    """Seconds since the start against --budget, and compile times seen so far."""

    def __init__(self, plan: Plan):
        self.plan, self.start, self.compiles = plan, time.perf_counter(), []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.plan.budget_s - self.elapsed()

    def per_compile(self) -> float:
        return statistics.mean(self.compiles) if self.compiles else self.plan.compile_guess_s

    def afford(self, compiles: int, what: str, rerun: str) -> bool:
        """Whether ``compiles`` settings' compiles fit in what is left of the budget;
        if not, a note on what is skipped and how to run it."""
        need = compiles * self.per_compile()
        if need <= self.left():
            return True
        say(f"\n_skipped {what}: its {compiles} compiles would take about {need:.0f} s, {max(self.left(), 0):.0f} s "
            f"are left of --budget {self.plan.budget_s:.0f}; `python benchmarks/gpu.py {rerun}` runs it_")
        return False


class Failures:
    """Errors printed where they happen, so that every other figure still comes."""

    def __init__(self):
        self.labels: list[str] = []

    def guard(self, label: str, work: Callable[[], None]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CappedRWarning)
                work()
        except OverBudget as error:
            say(f"\n_skipped the rest of {label}: {error}_")
        except Exception:  # a GPU run is precious: say what failed and go on
            say(f"\n**FAILED: {label}**\n\n```\n{traceback.format_exc()}```")
            self.labels.append(label)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def build(plan: Plan, name: str) -> torch.nn.Module:
    """A randomly initialised timm model (the same weights at every call), in eval mode."""
    torch.manual_seed(0)
    shape = dict(img_size=32, patch_size=4, depth=3, **SMOKE_SHAPES[name]) if plan.smoke else {}
    return timm.create_model(TIMM_NAMES[name], **shape).eval()


def describe(plan: Plan, name: str) -> str:
    if not plan.smoke:
        return f"{name} ({TIMM_NAMES[name]}, random weights)"
    return f"{name} (smoke: {TIMM_NAMES[name]} cut to 3 blocks of width {SMOKE_SHAPES[name]['embed_dim']}, 32x32)"


def inference_settings(rs: Sequence[int], with_cut: bool) -> list[Setting]:
    settings = [Setting("unpatched")]
    for r in rs:
        settings += [Setting(f"r={r}", r)] + ([Setting(f"cut r={r}", r, "cut")] if with_cut else [])
    return settings


def tokens_left(model: torch.nn.Module, setting: Setting) -> int:
    return tokenmerge.token_counts(model, r=setting.r or 0)[-1]


def stepped(run: Runner) -> Runner:
    """A compiled runner whose every call begins a new CUDA-graph step, so that no
    output of an earlier pass (held by the merge state) keeps a graph from replaying."""
    def call(images: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return run(images)
    return call


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def cudagraph_note(plan: Plan, compiled: bool) -> str:
    """How many compiled graphs inductor ran without CUDA graphs so far (it logs why)."""
    if not compiled or plan.device.type != "cuda":
        return ""
    return f"; graphs inductor ran without CUDA graphs so far: {cudagraph_skips()}"


def runners_for(
    plan: Plan, clock: Clock, model: torch.nn.Module, settings: Sequence[Setting], inputs: torch.Tensor, compiled: bool
) -> tuple[dict[str, Runner], dict[str, float]]:
    """A copy of ``model`` per setting, each put in its setting once (nothing is
    patched between passes), compiled with :func:`tokenmerge.compile` if ``compiled``
    (the first call, which compiles, timed apart); and the compile seconds."""
    runners, seconds = {}, {}
    for setting in settings:
        if compiled:
            if clock.left() < clock.per_compile():
                raise OverBudget(f"another compile would overrun --budget {plan.budget_s:.0f} s")
            compiled_runner, compile_seconds = compiled_runners(model, [setting], inputs, **plan.compile_kwargs)
            runners[setting.name] = stepped(compiled_runner[setting.name])
            seconds[setting.name] = compile_seconds[setting.name]
            clock.compiles.append(compile_seconds[setting.name])
        else:
            variant = copy.deepcopy(model)
            configure(variant, setting)
            runners[setting.name] = variant
    return runners, seconds


def rounds_for(rounds: tuple[int, int], compiled: bool) -> tuple[int, int]:
    runs, warmup = rounds
    return runs, max(warmup, 3) if compiled else warmup


def throughput(plan: Plan, clock: Clock, failures: Failures, compiled: bool) -> None:
    section = "compiled-throughput" if compiled else "eager-throughput"
    settings = inference_settings(plan.rs, with_cut=True)
    runs, warmup = rounds_for(plan.throughput_rounds, compiled)
    how = "compiled (tokenmerge.compile)" if compiled else "eager"
    say(f"{describe(plan, 'ViT-B/16')}, batch {plan.batch}, {how}; {runs} timed rounds after {warmup} warm-up, "
        "interleaved. \"of limit\": merged img/s over the cut model's; \"speed-up\": over the unpatched model.")
    for dtype in plan.dtypes:
        label = f"ViT-B/16 {name_of(dtype)}"
        if compiled and not clock.afford(len(settings), f"{label} compiled",
                                         f"--sections {section} --dtypes {name_of(dtype)}"):
            continue

        def measure(dtype: torch.dtype = dtype, label: str = label) -> None:
            start = time.perf_counter()
            model = build(plan, "ViT-B/16").to(plan.device, dtype)
            inputs = torch.randn(plan.batch, 3, *model.patch_embed.img_size, device=plan.device, dtype=dtype)
            runners, compile_seconds = runners_for(plan, clock, model, settings, inputs, compiled)
            times = time_interleaved(runners, inputs, runs, warmup, progress=False)
            medians = {name: statistics.median(values) for name, values in times.items()}
            rows = []
            for setting in settings:
                if setting.method == "cut":
                    continue
                median, spread = median_and_spread(times[setting.name])
                limit = medians.get(f"cut {setting.name}")
                rows.append([name_of(dtype), setting.name, tokens_left(model, setting), f"{plan.batch / median:.1f}",
                             spread, f"{medians['unpatched'] / median:.2f}x",
                             "" if limit is None else f"{plan.batch / limit:.1f}",
                             "" if limit is None else f"{100 * limit / median:.1f}%"]
                            + ([f"{compile_seconds[setting.name]:.1f}"] if compiled else []))
            header = ["dtype", "setting", "tokens left", "img/s", "IQR %", "speed-up", "limit img/s", "of limit"]
            say()
            say(markdown(header + (["compile s"] if compiled else []), rows))
            say(f"\n_{label}: {time.perf_counter() - start:.1f} s{cudagraph_note(plan, compiled)}_")

        failures.guard(f"{section} {label}", measure)


def latency(plan: Plan, clock: Clock, failures: Failures, compiled: bool) -> None:
    section = "compiled-latency" if compiled else "eager-latency"
    settings = inference_settings(plan.rs, with_cut=False)
    runs, warmup = rounds_for(plan.latency_rounds, compiled)
    how = "compiled (tokenmerge.compile" + (", CUDA graphs)" if plan.device.type == "cuda" else ")") if compiled \
        else "eager"
    say(f"{describe(plan, 'ViT-B/16')} and {describe(plan, 'ViT-S/16')}, batch 1, {name_of(plan.latency_dtype)}, "
        f"{how}; {runs} timed rounds after {warmup} warm-up, interleaved. \"speed-up\": the unpatched model's "
        "latency over the setting's.")
    for name in ("ViT-B/16", "ViT-S/16"):
        if compiled and not clock.afford(len(settings), f"{name} compiled", f"--sections {section}"):
            continue

        def measure(name: str = name) -> None:
            start = time.perf_counter()
            model = build(plan, name).to(plan.device, plan.latency_dtype)
            image = torch.randn(1, 3, *model.patch_embed.img_size, device=plan.device, dtype=plan.latency_dtype)
            runners, compile_seconds = runners_for(plan, clock, model, settings, image, compiled)
            times = time_interleaved(runners, image, runs, warmup, progress=False)
            unpatched = statistics.median(times["unpatched"])
            rows = []
            for setting in settings:
                median, spread = median_and_spread(times[setting.name])
                rows.append([name, setting.name, tokens_left(model, setting), f"{1000 * median:.2f}",
                             spread, f"{unpatched / median:.2f}x"]
                            + ([f"{compile_seconds[setting.name]:.1f}"] if compiled else []))
            header = ["model", "setting", "tokens left", "ms", "IQR %", "speed-up"]
            say()
            say(markdown(header + (["compile s"] if compiled else []), rows))
            say(f"\n_{name}: {time.perf_counter() - start:.1f} s{cudagraph_note(plan, compiled)}_")

        failures.guard(f"{section} {name}", measure)


def training(plan: Plan, clock: Clock, failures: Failures) -> None:
    r = plan.train_r
    settings = [Setting("unpatched"), Setting(f"r={r}", r), Setting(f"cut r={r}", r, "cut")]
    steps, warmup = plan.train_rounds
    precision = "float32" if plan.train_autocast is None else \
        f"float32 weights under {name_of(plan.train_autocast)} autocast"
    say(f"{describe(plan, 'ViT-B/16')}, {precision}, batch "
        f"{plan.train_batch}, AdamW; a step is forward, cross-entropy, backward and optimizer step "
        f"(tokenmerge.tools.train.train_step); {steps} timed steps per setting after {warmup} warm-up, interleaved "
        "A B C C B A on one batch. \"of limit\": merged steps/s over the cut model's.")

    def measure() -> None:
        base = build(plan, "ViT-B/16").to(plan.device)
        models = {}
        for setting in settings:
            models[setting.name] = copy.deepcopy(base)
            configure(models[setting.name], setting)
        optimizers = {name: timm.optim.create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
                      for name, model in models.items()}
        images = torch.randn(plan.train_batch, 3, *base.patch_embed.img_size, device=plan.device)
        labels = torch.randint(0, base.num_classes, (plan.train_batch,), device=plan.device)
        del base
        names = list(models)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for step in range(warmup + steps):
            for name in names if step % 2 == 0 else names[::-1]:
                synchronize(plan.device)
                start = time.perf_counter()
                train_step(models[name], optimizers[name], images, labels, autocast_dtype=plan.train_autocast)
                synchronize(plan.device)
                if step >= warmup:
                    seconds[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        rows = []
        for setting in settings:
            median, spread = median_and_spread(seconds[setting.name])
            limit = medians.get(f"cut {setting.name}")
            rows.append([setting.name, f"{plan.train_batch / median:.1f}", f"{1000 * median:.1f}", spread,
                         f"{medians['unpatched'] / median:.2f}x",
                         "" if limit is None else f"{100 * limit / median:.1f}%"])
        say()
        say(markdown(["setting", "img/s", "ms/step", "IQR %", "speed-up", "of limit"], rows))

    failures.guard("training", measure)


def sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {short: getattr(SDPBackend, long) for short, long in names.items() if hasattr(SDPBackend, long)}


def attention(plan: Plan, clock: Clock, failures: Failures) -> None:
    from torch.nn.attention import sdpa_kernel

    from tokenmerge import attention as attention_module

    proportional = attention_module.proportional_attention
    if "formulation" not in inspect.signature(proportional).parameters:
        say("_skipped: tokenmerge.attention.proportional_attention takes no formulation= in this version_")
        return
    formulations = tuple(getattr(attention_module, "FORMULATIONS", ("mask", "channel")))
    vit = build(plan, "ViT-B/16")
    heads, head_dim = vit.blocks[0].attn.num_heads, vit.blocks[0].attn.head_dim
    counts = {r: tokenmerge.token_counts(vit, r=r) for r in plan.rs}  # tokens after every block
    token_counts = sorted({n for r in plan.rs for n in (counts[r][0], counts[r][-2])}, reverse=True)
    backends = sdpa_backends()
    runs, warmup = plan.attention_rounds
    say(f"One attention call at the shape of {describe(plan, 'ViT-B/16')}: batch {plan.batch}, {heads} heads of "
        f"{head_dim}, at the token counts entering its second and last blocks at r={', '.join(map(str, plan.rs))} "
        f"({', '.join(map(str, token_counts))}), token sizes 1 to 3. \"none\": SDPA without any bias, the cost of "
        "attention alone. µs per call, median of "
        f"{runs} rounds of {plan.attention_calls} calls after {warmup} warm-up, every formulation and backend "
        "interleaved; \"default\": SDPA's own pick; a backend column: that backend forced with sdpa_kernel, "
        "\"refused\" where it does not take the call.")

    def measure(dtype: torch.dtype) -> None:
        rows = []
        for n in token_counts:
            generator = torch.Generator(device=plan.device).manual_seed(n)
            q, k, v = (torch.randn(plan.batch, heads, n, head_dim, device=plan.device, dtype=dtype,
                                   generator=generator) for _ in range(3))
            size = torch.randint(1, 4, (plan.batch, n, 1), device=plan.device, generator=generator).float()
            calls: dict[str, Callable[[], torch.Tensor]] = {"none": partial(proportional, q, k, v, None)}
            for formulation in formulations:
                calls[formulation] = partial(proportional, q, k, v, size, formulation=formulation)
            runners: dict[str, Runner] = {}
            for name, call in calls.items():
                runners[f"{name} default"] = repeated(call, plan.attention_calls)
                for backend_name, backend in backends.items():
                    forced = under(sdpa_kernel, backend, call)
                    if accepts(forced):
                        runners[f"{name} {backend_name}"] = repeated(forced, plan.attention_calls)
            times = time_interleaved(runners, q, runs, warmup, progress=False)
            for name in calls:
                median, spread = median_and_spread(times[f"{name} default"])
                forced_times = [times.get(f"{name} {backend}") for backend in backends]
                rows.append([name_of(dtype), n, name, f"{1e6 * median / plan.attention_calls:.1f}", spread]
                            + ["refused" if values is None else
                               f"{1e6 * statistics.median(values) / plan.attention_calls:.1f}"
                               for values in forced_times])
        say()
        say(markdown(["dtype", "tokens", "formulation", "default µs", "IQR %"] + [f"{name} µs" for name in backends],
                     rows))

    for dtype in plan.dtypes:
        failures.guard(f"attention {name_of(dtype)}", lambda dtype=dtype: measure(dtype))


def repeated(call: Callable[[], torch.Tensor], times: int) -> Runner:
    def run(_: torch.Tensor) -> torch.Tensor:
        for _ in range(times - 1):
            call()
        return call()
    return run


def under(sdpa_kernel, backend, call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def forced() -> torch.Tensor:
        with sdpa_kernel(backend):
            return call()
    return forced


def accepts(call: Callable[[], torch.Tensor]) -> bool:
    """Whether the forced backend takes the call (SDPA raises when none of the allowed
    backends can run it, after warning why)."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        try:
            call()
        except RuntimeError:
            return False
    return True


def environment(plan: Plan) -> str:
    if plan.device.type == "cuda":
        properties = torch.cuda.get_device_properties(plan.device)
        device = (f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, compute capability "
                  f"{properties.major}.{properties.minor}), CUDA {torch.version.cuda}, cuDNN "
                  f"{torch.backends.cudnn.version()}")
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"
    return (f"device: {device}; torch {torch.__version__}, timm {timm.__version__}, tokenmerge "
            f"{tokenmerge.__version__}, python {platform.python_version()}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, float32: that everything runs")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all, in this order)")
    parser.add_argument("--dtypes", help="comma-separated dtypes for throughput and attention "
                        "(default: float16,bfloat16; float32 with --smoke)")
    parser.add_argument("--budget", type=float, help="seconds from the start by which compiling must be done: a "
                        "compiled group that would overrun them is skipped (default: 450; 600 with --smoke)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; 1 with --smoke)")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    plan = SMOKE if args.smoke else GPU
    if args.dtypes:
        plan = replace(plan, dtypes=tuple(DTYPES[name.strip()] for name in args.dtypes.split(",")))
    if args.budget is not None:
        plan = replace(plan, budget_s=args.budget)
    if args.threads is not None:
        plan = replace(plan, threads=args.threads)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --smoke runs the small CPU version")

    clock, failures = Clock(plan), Failures()
    say(f"# tokenmerge GPU figures{' (--smoke: tiny models on the CPU)' if plan.smoke else ''}\n")
    say(environment(plan))
    compile_how = ", ".join(f"{key}={value}" for key, value in plan.compile_kwargs.items()) or \
        ("inductor, mode reduce-overhead (CUDA graphs)" if plan.device.type == "cuda" else "inductor")
    say(f"Compiled: tokenmerge.compile ({compile_how}), dynamic=False, fullgraph=True. Budget for compiling: "
        f"{plan.budget_s:.0f} s.")
    runs = {
        "eager-throughput": ("ViT-B/16 inference throughput, eager", lambda: throughput(plan, clock, failures, False)),
        "eager-latency": ("Batch-1 latency, eager", lambda: latency(plan, clock, failures, False)),
        "training": ("Training step throughput", lambda: training(plan, clock, failures)),
        "attention": ("Attention formulations", lambda: attention(plan, clock, failures)),
        "compiled-latency": ("Batch-1 latency, compiled", lambda: latency(plan, clock, failures, True)),
        "compiled-throughput": ("ViT-B/16 inference throughput, compiled",
                                lambda: throughput(plan, clock, failures, True)),
    }
    for number, key in enumerate(sections, 1):
        title, work = runs[key]
        say(f"\n## {number}. {title} ({key})\n")
        start = time.perf_counter()
        failures.guard(key, work)
        torch._dynamo.reset()  # compiled copies and their CUDA graphs go
        say(f"\n_{key}: {time.perf_counter() - start:.1f} s; {clock.elapsed():.0f} s since the start_")
    if failures.labels:
        say(f"\nFAILED: {', '.join(failures.labels)}")
        return 1
    say(f"\nDone in {clock.elapsed():.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
