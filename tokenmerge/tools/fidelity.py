"""``tokenmerge fidelity``: how close a diffusion pipeline's images stay with token
merging to the images it makes without, from the same seeds, on the user's own
pipeline and prompts, and how much sooner they come.

Every sample (a prompt and a seed) is generated unmerged and then with every setting
in turn, so that all settings are timed on the same inputs under the same machine
load. Per setting it reports the PSNR and SSIM of every image to the unmerged image of
the same sample (and LPIPS where the ``lpips`` package and its weights are on this
machine), and the speed-up of the whole generation as the median over samples of the
unmerged time over the setting's, with its spread.

The unmerged image is the reference, not the truth: what the distances are worth as a
measure of quality can only be judged on real weights, with the prompts the pipeline
will see.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import options
from .cli import COMMANDS
from .files import Place, check_apart, check_output_path, check_writable_folder, write_atomically, write_csv
from .messages import error_summary
from .progress import ProgressBar
from .reports import describe_environment, environment, format_table
from .settings import AppliedSetting
from .timing import MIN_TIMED_ROUNDS, speed_warnings, spread_percent, synchronize, too_few_rounds

UNMERGED = "unmerged"
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_RATIOS = (0.3, 0.5)
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
MORE_SAMPLES = "measure with more --seeds or prompts, with fewer --threads or on a quieter machine"
#: Options of ``tokenmerge.apply`` for diffusion models that take the names and meanings of tomesd's.
TOMESD_OPTIONS = ("max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp")
#: The standard SSIM of Wang et al. (2004): an 11 x 11 Gaussian window of sigma 1.5, and
#: the constants K1 and K2, for images in [0, 1].
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
#: An image distance: (image, reference), both (N, 3, H, W) in [0, 1], to a number.
Distance = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class Sample:
    """One image to generate: a prompt (the ``prompt_index``-th) and the seed of its noise."""

    prompt: str
    prompt_index: int
    seed: int

    @property
    def stem(self) -> str:
        """The file name its images take, without the suffix."""
        return f"prompt{self.prompt_index:03d}-seed{self.seed}"


@dataclass
class Result:
    """One setting's image of one sample: the seconds the whole generation took, its
    distances to the unmerged image of the sample (LPIPS None where not measured),
    and the files it was written to."""

    seconds: float
    psnr: float
    ssim: float
    lpips: Optional[float] = None
    files: list[Path] = field(default_factory=list)


@dataclass
class Fidelity:
    """What :func:`measure_fidelity` found: the samples, every setting's result for every
    sample (by setting name, the unmerged first), one summary row per setting (see
    :func:`summarize`), and why LPIPS was not measured ("" where it was)."""

    samples: list[Sample]
    results: dict[str, list[Result]]
    rows: list[dict[str, Any]]
    lpips_skipped: str


# --- image distances ---------------------------------------------------------------------


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """The peak signal-to-noise ratio of ``image`` to ``reference`` in dB, both in
    [0, 1] (a peak of 1): infinite where they are identical."""
    error = torch.mean((image.double() - reference.double()) ** 2).item()
    return math.inf if error == 0 else 10 * math.log10(1 / error)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The 1-D Gaussian of ``size`` taps and deviation ``sigma``, summing to 1, in float64;
    SSIM's 2-D window is its outer product with itself."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return weights / weights.sum()


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean structural similarity of ``image`` to ``reference`` (Wang et al. 2004):
    local means, variances and covariance under an 11 x 11 Gaussian window (sigma 1.5)
    at every position where the window lies inside the image (no padding), for every
    channel (and frame) apart, on a data range of 1; 1 exactly where they are identical."""
    height, width = image.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {height} x {width}")
    x, y = (tensor.double().reshape(-1, 1, height, width) for tensor in (image, reference))
    taps = gaussian_window()

    def blur(planes: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(planes, taps.view(1, 1, -1, 1)), taps.view(1, 1, 1, -1))

    mean_x, mean_y = blur(x), blur(y)
    variance_x, variance_y = blur(x * x) - mean_x * mean_x, blur(y * y) - mean_y * mean_y
    covariance = blur(x * y) - mean_x * mean_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    similarity = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)
                  / ((mean_x * mean_x + mean_y * mean_y + c1) * (variance_x + variance_y + c2)))
    return similarity.mean().item()


def load_lpips(device: torch.device) -> tuple[Optional[Distance], str]:
    """LPIPS (AlexNet) as a :data:`Distance`, or None and the reason it is skipped: the
    ``lpips`` package is not installed, or the torchvision AlexNet weights it builds on
    are not in torch's hub cache (nothing is downloaded)."""
    try:
        import lpips
        import torchvision
    except ImportError as error:
        return None, f"LPIPS skipped: the {error.name} package is not installed (pip install lpips)"
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not backbone.is_file():
        return None, f"LPIPS skipped: the AlexNet weights it needs are not in {backbone.parent} (from {url})"
    try:
        model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as error:  # a package version that cannot build on this torch: skip, saying why
        return None, f"LPIPS skipped: lpips cannot be built here ({error_summary(error)})"

    def distance(image: torch.Tensor, reference: torch.Tensor) -> float:
        with torch.inference_mode():
            return model(image.to(device), reference.to(device), normalize=True).mean().item()

    return distance, ""


# --- what to run on ----------------------------------------------------------------------


def read_prompts(prompts: Optional[Path], prompt: Sequence[str]) -> list[str]:
    """The prompts: the lines of the file ``prompts`` (blank lines left out), or the
    ``--prompt`` texts, or the default prompt; a one-line error for an unusable file."""
    if prompts is None:
        return list(prompt) or [DEFAULT_PROMPT]
    if not prompts.is_file():
        raise ValueError(f"--prompts {prompts}: no such file; give a text file of one prompt per line")
    try:
        lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts {prompts} cannot be read ({error_summary(error)})") from None
    found = [line for line in lines if line]
    if not found:
        raise ValueError(f"--prompts {prompts} holds no prompts")
    return found


def samples_of(prompts: Sequence[str], seeds: Sequence[int]) -> list[Sample]:
    """Every prompt with every seed, prompt by prompt."""
    return [Sample(prompt, index, seed) for index, prompt in enumerate(prompts) for seed in seeds]


def settings_of(ratios: Sequence[float], merge_options: dict[str, Any]) -> list[AppliedSetting]:
    """The unmerged pipeline, then one setting per ratio, each with ``merge_options``."""
    return [AppliedSetting(UNMERGED)] + [AppliedSetting(f"ratio={ratio:g}", {"ratio": ratio, **merge_options})
                                           for ratio in ratios]


def load_pipeline(folder: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The diffusers pipeline ``save_pretrained`` wrote to ``folder`` (``from_pretrained``,
    nothing downloaded), on ``device``, its own progress bar off; a one-line error for
    a folder that holds none."""
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder}: no model_index.json; give a folder written by a diffusers pipeline's "
                         "save_pretrained")
    try:
        import diffusers
    except ImportError:
        raise ValueError("tokenmerge fidelity needs diffusers: pip install 'tokenmerge[diffusers]'") from None
    try:
        pipeline = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{folder}: cannot load a diffusers pipeline ({error_summary(error)})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- merging -------------------------------------------------------------------------------


def merge(pipeline: Any, setting: AppliedSetting, seed: int = 0) -> None:
    """Apply ``setting``'s token merging to ``pipeline`` (nothing for the unmerged one),
    its random destinations drawn from ``seed`` unless the setting names a seed or
    generator of its own, so that a run gives the same images again."""
    import tokenmerge

    if setting.apply:
        own = "seed" in setting.apply or "generator" in setting.apply
        tokenmerge.apply(pipeline, **setting.apply if own else {**setting.apply, "seed": seed})


def unmerge(pipeline: Any, setting: AppliedSetting) -> None:
    """Remove what :func:`merge` applied for ``setting``."""
    import tokenmerge

    if setting.apply:
        tokenmerge.remove(pipeline)


def check_settings(pipeline: Any, settings: Sequence[AppliedSetting]) -> None:
    """Apply and remove every setting once before any work, so that a pipeline
    tokenmerge does not merge, or an option it refuses, is one line now and not an
    error after the first images."""
    for setting in settings:
        try:
            merge(pipeline, setting)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{setting.name}: {error_summary(error)}") from None
        unmerge(pipeline, setting)


# --- measuring -----------------------------------------------------------------------------


def frames_of(output: Any) -> torch.Tensor:
    """The images of a pipeline's output (``output_type="pt"``) as (N, 3, H, W) in [0, 1]
    on the CPU: one image, or every frame of a video."""
    pictures = output.images if hasattr(output, "images") else output.frames
    pictures = pictures[0] if isinstance(pictures, (list, tuple)) else pictures
    return pictures.reshape(-1, *pictures.shape[-3:]).float().cpu()


def generate(pipeline: Any, sample: Sample, call: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, float]:
    """``sample``'s image (see :func:`frames_of`) and the seconds the whole pipeline call
    took, its noise drawn from a CPU generator seeded with the sample's seed, so that
    every setting and device starts from the same noise."""
    generator = torch.Generator("cpu").manual_seed(sample.seed)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = pipeline(prompt=sample.prompt, generator=generator, output_type="pt", **call)
    synchronize(device)
    return frames_of(output), time.perf_counter() - start


def save_images(folder: Path, sample: Sample, frames: torch.Tensor) -> list[Path]:
    """Write ``frames`` (N, 3, H, W) in [0, 1] as PNG files named after ``sample`` in
    ``folder`` (a video's frames numbered), each whole or not at all."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = [f"{sample.stem}.png"] if len(frames) == 1 else [f"{sample.stem}-frame{i:03d}.png"
                                                             for i in range(len(frames))]
    written = []
    for name, picture in zip(names, pixels):
        image = Image.fromarray(picture)
        written.append(write_atomically(folder / name, lambda file, image=image: image.save(file, format="PNG")))
    return written


def measure(pipeline: Any, samples: Sequence[Sample], settings: Sequence[AppliedSetting],
            call: Optional[dict[str, Any]] = None, device: Optional[torch.device] = None, warmup: int = 1,
            lpips: Optional[Distance] = None, output_dir: Optional[Path] = None,
            progress: bool = True) -> dict[str, list[Result]]:
    """Every setting's result for every sample, the first setting (unmerged) the
    reference of the others, the settings interleaved per sample, after ``warmup``
    untimed rounds of the first sample, with the pipeline ``call`` arguments, on
    ``device`` (the pipeline's execution device by default); the images written to one folder per
    setting in ``output_dir`` where given."""
    device = device if device is not None else execution_device(pipeline)
    call = call or {}
    results: dict[str, list[Result]] = {setting.name: [] for setting in settings}
    total = (len(samples) + warmup) * len(settings)
    with ProgressBar(total=total, disable=not progress, desc="generating", unit="image") as bar:
        for index in range(-warmup, len(samples)):
            sample = samples[max(index, 0)]
            reference: Optional[torch.Tensor] = None
            for setting in settings:
                merge(pipeline, setting, sample.seed)
                try:
                    frames, seconds = generate(pipeline, sample, call, device)
                finally:
                    unmerge(pipeline, setting)
                bar.update()
                reference = frames if reference is None else reference
                if index < 0:
                    continue
                result = Result(seconds, psnr(frames, reference), ssim(frames, reference),
                                lpips(frames, reference) if lpips is not None else None)
                if output_dir is not None:
                    result.files = save_images(output_dir / setting.name, sample, frames)
                results[setting.name].append(result)
    return results


def summarize(results: dict[str, list[Result]]) -> list[dict[str, Any]]:
    """One row per setting: the mean distances of its images to the unmerged ones and
    its speed-up (the median over samples of the per-sample ratio of the unmerged
    time over the setting's, with its spread in percent)."""
    reference = next(iter(results.values()))
    rows = []
    for name, measured in results.items():
        speedups = [unmerged.seconds / result.seconds for unmerged, result in zip(reference, measured)]
        measured_lpips = [result.lpips for result in measured if result.lpips is not None]
        rows.append({
            "setting": name,
            "samples": len(measured),
            "psnr": statistics.mean(result.psnr for result in measured),
            "ssim": statistics.mean(result.ssim for result in measured),
            "lpips": statistics.mean(measured_lpips) if measured_lpips else float("nan"),
            "seconds": statistics.median(result.seconds for result in measured),
            "speedup": statistics.median(speedups),
            "spread": spread_percent(speedups) if len(speedups) > 1 else float("nan"),
        })
    return rows


def measure_fidelity(pipeline: Any, prompts: Sequence[str], seeds: Sequence[int] = DEFAULT_SEEDS,
                     ratios: Sequence[float] = DEFAULT_RATIOS, call: Optional[dict[str, Any]] = None,
                     warmup: int = 1, output_dir: Optional[Path] = None, lpips: bool = True, progress: bool = True,
                     **merge_options: Any) -> Fidelity:
    """Generate every prompt from every seed with the diffusers ``pipeline`` unmerged and
    with token merging at every ratio (``merge_options``: more options of
    ``tokenmerge.apply``, such as tomesd's), in turn, with the pipeline ``call``
    arguments (``num_inference_steps``, ...), and measure how close every image stays to
    the unmerged one of the same seed and how much sooner it comes: what ``tokenmerge
    fidelity`` does, on a pipeline already loaded. Every setting is applied and removed
    once first, so that one tokenmerge refuses is an error before any image; LPIPS is
    measured where ``lpips`` and its weights are on this machine; the images are written
    to one folder per setting in ``output_dir`` where given."""
    settings = settings_of(ratios, merge_options)
    check_settings(pipeline, settings)
    device = execution_device(pipeline)
    distance, skipped = load_lpips(device) if lpips else (None, "LPIPS not asked for")
    samples = samples_of(prompts, seeds)
    results = measure(pipeline, samples, settings, call, device, warmup, distance, output_dir, progress)
    return Fidelity(samples, results, summarize(results), skipped)


def execution_device(pipeline: Any) -> torch.device:
    """Where ``pipeline`` runs its models: the device a diffusers pipeline computes on
    (under CPU offload, the GPU the models visit, not the CPU they rest on)."""
    return getattr(pipeline, "_execution_device", pipeline.device)


def columns_of(with_lpips: bool) -> list[tuple[str, str, str]]:
    """The printed table's columns: LPIPS only where it was measured."""
    return [
        ("setting", "setting", ""),
        ("samples", "samples", "d"),
        ("psnr", "PSNR dB", ".2f"),
        ("ssim", "SSIM", ".4f"),
        *([("lpips", "LPIPS", ".4f")] if with_lpips else []),
        ("seconds", "seconds", ".3f"),
        ("speedup", "speed-up", ".2f"),
        ("spread", "spread %", ".0f"),
    ]


def warnings_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What makes the speed figures not to be taken as fact: too few samples, a spread
    too large, a setting measured slower than the unmerged pipeline."""
    merged = [row for row in rows if row["setting"] != UNMERGED]
    few = too_few_rounds({row["setting"]: row["samples"] for row in merged}, "samples", MORE_SAMPLES)
    trusted = [row for row in merged if row["samples"] >= MIN_TIMED_ROUNDS]
    found = [few] if few else []
    return found + speed_warnings({row["setting"]: row["speedup"] for row in merged},
                                  {row["setting"]: row["spread"] for row in trusted}, remedy=MORE_SAMPLES)


def result_rows(samples: Sequence[Sample], results: dict[str, list[Result]]) -> list[dict[str, Any]]:
    """One row per sample and setting, for ``--output``: its distances, time and files."""
    return [{"prompt": sample.prompt, "seed": sample.seed, "setting": name, "psnr": result.psnr,
             "ssim": result.ssim, "lpips": "" if result.lpips is None else result.lpips, "seconds": result.seconds,
             "files": ";".join(str(path) for path in result.files)}
            for name, measured in results.items() for sample, result in zip(samples, measured)]


# --- the command ---------------------------------------------------------------------------


def parse_ratios(text: str) -> list[float]:
    """``"0.3,0.5"``: shares of the tokens to merge, each in [0, 1), each once."""
    ratios = []
    for item in text.split(","):
        try:
            ratio = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: give shares of the tokens to merge, such as 0.3,0.5") from None
        if not 0 <= ratio < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: a ratio is a share of the tokens in [0, 1)")
        ratios.append(ratio)
    return list(dict.fromkeys(ratios))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers, such as 0,1,2,3,4") from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed cannot be negative")
    return seeds


def merge_options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options every setting applies: tomesd's that were given, then ``--merge-kwargs``."""
    given = {name: getattr(args, name) for name in TOMESD_OPTIONS if getattr(args, name) is not None}
    return given | args.merge_kwargs


def call_of(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call's arguments: those given, the pipeline's own defaults for the others."""
    height, width = args.size if args.size else (None, None)
    given = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": height, "width": width}
    return {name: value for name, value in given.items() if value is not None} | args.pipeline_kwargs


def check_output_dir(folder: Optional[Path]) -> None:
    """Fail before the work on an ``--output-dir`` that is a file or cannot take new files."""
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output-dir {folder} is a file; give a folder for the images")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_writable_folder(folder)
    except OSError as error:
        raise ValueError(f"--output-dir {folder} cannot be written ({error.strerror}); choose another folder") from None


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fidelity", help=COMMANDS["fidelity"][1],
        description="Generate every prompt from every seed with the diffusers pipeline unmerged and with every "
        "setting of token merging, in turn, and report how close each setting's images are to the unmerged ones "
        "(PSNR, SSIM, and LPIPS where its weights are here) and how much sooner they come. The pipeline is loaded "
        "with from_pretrained from a local folder.")
    parser.add_argument("pipeline", type=Path, help="a folder written by a diffusers pipeline's save_pretrained")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help=f"a prompt; give it again for more (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--prompts", type=Path, metavar="FILE", help="a text file of one prompt per line, "
                        "instead of --prompt")
    parser.add_argument("--seeds", type=parse_seeds, default=list(DEFAULT_SEEDS), metavar="S,S,...",
                        help="the seeds every prompt is generated from (default: 0,1,2,3,4)")
    parser.add_argument("--steps", type=options.positive_int, metavar="N",
                        help="denoising steps (default: the pipeline's)")
    parser.add_argument("--size", type=options.whole_number(SSIM_WINDOW), nargs="+", action=options.ImageSize,
                        metavar="SIZE", help="image size, SIZE or HEIGHT WIDTH in pixels, at least SSIM's window "
                        f"of {SSIM_WINDOW} (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, metavar="SCALE",
                        help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--pipeline-kwargs", nargs="*", default={}, action=options.ModelKwargs, metavar="KEY=VALUE",
                        help="more arguments of the pipeline call, e.g. num_frames=17 negative_prompt='blurry'")
    merging = parser.add_argument_group("merging (tokenmerge.apply's options; default: tokenmerge's)")
    merging.add_argument("--ratio", type=parse_ratios, default=list(DEFAULT_RATIOS), metavar="R,R,...",
                         help="the share of tokens every setting merges (default: 0.3,0.5)")
    merging.add_argument("--max-downsample", type=int, choices=[1, 2, 4, 8],
                         help="UNets: merge in the levels downsampled at most this much, as in tomesd")
    for name, what in (("sx", "width"), ("sy", "height")):
        merging.add_argument(f"--{name}", type=options.positive_int, help=f"UNets: the {what} of a destination cell, "
                             "as in tomesd")
    for name, what in (("use_rand", "a random destination in every cell"),
                       ("merge_attn", "merge before self-attention"), ("merge_crossattn", "merge before "
                       "cross-attention"), ("merge_mlp", "merge before the MLP")):
        merging.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                             help=f"UNets: {what}, as in tomesd")
    merging.add_argument("--merge-kwargs", nargs="*", default={}, action=options.ModelKwargs, metavar="KEY=VALUE",
                         help="more options of tokenmerge.apply, e.g. for a diffusion transformer")
    parser.add_argument("--warmup", type=options.non_negative_int, default=1, metavar="N",
                        help="untimed rounds of the first sample (default: 1)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="write every image, one folder per setting")
    parser.add_argument("--output", type=Path, metavar="FILE.csv",
                        help="write every image's distances and time")
    options.add_runtime_options(parser, amp=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    device = options.check_runtime(args)
    settings = settings_of(args.ratio, merge_options_of(args))
    image_folders = [Place("--output-dir", args.output_dir / setting.name) for setting in settings
                     if args.output_dir is not None]
    check_apart(args, [Place("--output", args.output), *image_folders],
                [Place("PIPELINE", args.pipeline), *([Place("--prompts", args.prompts)] if args.prompts else [])])
    check_output_path(args.output, (".csv",))
    check_output_dir(args.output_dir)
    prompts = read_prompts(args.prompts, args.prompt)
    pipeline = load_pipeline(args.pipeline, device, options.DTYPES[args.dtype])
    call = call_of(args)
    found = measure_fidelity(pipeline, prompts, args.seeds, args.ratio, call, args.warmup, args.output_dir,
                             **merge_options_of(args))
    given = ", ".join(f"{name} {value}" for name, value in call.items()) or "the pipeline's defaults"
    print(f"# {type(pipeline).__name__} from {args.pipeline}: {plural(len(prompts), 'prompt')} x "
          f"{plural(len(args.seeds), 'seed')}, {given}; {describe_environment(environment(device))}")
    print(format_table(found.rows, columns_of(not found.lpips_skipped)))
    for line in [found.lpips_skipped] if found.lpips_skipped else []:
        options.note("fidelity", line)
    for warning in warnings_of(found.rows):
        options.note("fidelity", warning, "warning")
    if args.output is not None:
        columns = ["prompt", "seed", "setting", "psnr", "ssim", "lpips", "seconds", "files"]
        write_csv(args.output, columns, result_rows(found.samples, found.results))
