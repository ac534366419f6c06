"""Evaluating settings on an image folder, the work ``tokenmerge eval`` and
``tokenmerge compare`` share: top-1 and top-5 accuracy of every setting, how far it
is from the unpatched model on the same images (the share of images whose top-1
differs, and the mean KL divergence of its output distribution from the unpatched
model's: paired, so they resolve far smaller differences than top-1, and they need
no labels), with the throughput of every setting measured in the same run.

Every batch is decoded once and then run through every setting in turn (unpatched,
r1, r2, ..., each batch starting one setting further on), so all settings see the
same images and share whatever else the machine is doing; only the forward passes
are timed, after one untimed pass of every setting on the first batch. Files that
cannot be decoded are reported by name and left out of the counts.

Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous variables) the commands join a ``torch.distributed`` process group (gloo
on CPU, NCCL on CUDA). Processes take whole batches in turn, so every image is
evaluated exactly once and in the same batch as in a single process; the counts are
summed across processes, which gives exactly the figures of a single process.
Throughput is all images divided by the forward time of the slowest process: the
rate of the whole group, since it is done when its slowest member is.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.state import CappedRWarning

from . import options
from .accuracy import correct_predictions, disagreements, kl_divergence_sum
from .data import NO_LABEL, Batch, TolerantImageFiles, Unreadable, balanced_subset, folder_samples, read_class_map
from .distributed import combine, first_process, gather_objects, process_group, rank, shard_loader, world_size
from .files import Place, check_apart, check_figure_path, check_output_path, write_figure
from .messages import model_title
from .models import ImageModel, load_model, require_images, unwrap, with_zero_shot_head
from .progress import ProgressBar
from .reports import describe_environment, environment, format_table, run_record, write_rows
from .settings import UNPATCHED, Setting, cap_notes, configure, setting_runner, unique
from .timing import MIN_TIMED_ROUNDS, speed_warnings, spread_percent, time_interleaved, timed


@dataclass
class Tally:
    """What one setting has counted so far: correct predictions, images (and those with
    a label), top-1 differences from the unpatched model and their summed KL
    divergence, and the seconds per image of every timed repetition."""

    top1: int = 0
    top5: int = 0
    images: int = 0
    labelled: int = 0
    disagreeing: int = 0
    kl: float = 0.0
    per_image: list[float] = field(default_factory=list)


@dataclass
class EvalRow:
    """One setting: accuracy in percent and as counts of correct images (None without
    labels), the images counted (unreadable files excluded), the measured throughput
    with its speed-up over the unpatched model, and the fidelity to the unpatched
    model: the percentage (and count) of images whose top-1 differs from its, and the
    mean KL divergence of the output distribution from its, in nats."""

    setting: str
    method: str
    r: str
    tokens_left: int
    top1: Optional[float]
    top5: Optional[float]
    top1_correct: int
    top5_correct: int
    images: int
    images_per_second: float
    speedup: float
    iqr_percent: float = 0.0
    disagreement: float = 0.0
    kl: float = 0.0
    disagreeing: int = 0


@dataclass
class Evaluation:
    """The rows of every setting, the files that could not be read (not counted in
    any row), and the number of processes that shared the work."""

    rows: list[EvalRow]
    unreadable: list[Unreadable] = field(default_factory=list)
    processes: int = 1


# --- counting ----------------------------------------------------------------------


def warm_up(model: torch.nn.Module, settings: Sequence[Setting], images: torch.Tensor, amp: str) -> None:
    """One untimed pass per setting, so that first-call costs are not timed."""
    for setting in settings:
        configure(model, setting)
        with options.autocast(images.device, amp):
            model(images)


def rotated(settings: Sequence[Setting], turn: int) -> list[Setting]:
    """``settings`` starting at position ``turn`` (mod their number): each batch starts
    with the next setting, so that no setting always runs first after loading, when
    the data loader's workers are busiest."""
    start = turn % len(settings)
    return [*settings[start:], *settings[:start]]


def tally_batch(
    model: torch.nn.Module, settings: Sequence[Setting], images: torch.Tensor, labels: torch.Tensor,
    tallies: dict[str, Tally], amp: str = "none",
) -> None:
    """Run one batch through every setting in turn and add up what each got right and
    how far each is from the unpatched model."""
    outputs = {}
    for setting in settings:
        configure(model, setting)
        with options.autocast(images.device, amp):
            outputs[setting.name], seconds = timed(model, images)
        tallies[setting.name].per_image.append(seconds / len(images))
    reference = outputs[UNPATCHED]
    for name, logits in outputs.items():
        top1, top5 = correct_predictions(logits, labels)
        tally = tallies[name]
        tally.top1, tally.top5 = tally.top1 + top1, tally.top5 + top5
        tally.images += len(labels)
        tally.labelled += int((labels >= 0).sum())
        tally.disagreeing += disagreements(logits, reference)
        tally.kl += kl_divergence_sum(logits, reference)


def tally_batches(
    model: torch.nn.Module, batches: Iterable[Batch], settings: Sequence[Setting], device: torch.device,
    progress: bool, total: int, dtype: torch.dtype = torch.float32, amp: str = "none",
) -> tuple[dict[str, Tally], list[Unreadable]]:
    """The tallies of every setting over ``batches``, and the files that could not be read."""
    tallies = {setting.name: Tally() for setting in settings}
    unreadable: list[Unreadable] = []
    description = "evaluating" if world_size() == 1 else f"evaluating, share of process {rank()}"
    last = None
    with torch.inference_mode(), ProgressBar(total=total, desc=description, unit="img", disable=not progress) as bar:
        for turn, (images, labels, failed) in enumerate(batches):
            unreadable += failed
            if images is not None:
                images, labels = images.to(device=device, dtype=dtype), labels.to(device)
                if not any(tally.images for tally in tallies.values()):
                    warm_up(model, settings, images, amp)
                tally_batch(model, rotated(settings, turn), images, labels, tallies, amp)
                last = images
            bar.update(len(labels) + len(failed))
            if failed and progress:
                bar.write(f"unreadable: {', '.join(item.path for item in failed)}", file=sys.stderr)
    if last is not None:
        time_again(model, settings, last, tallies, amp, progress)
    return tallies, unreadable


def time_again(
    model: torch.nn.Module, settings: Sequence[Setting], images: torch.Tensor, tallies: dict[str, Tally],
    amp: str = "none", progress: bool = False,
) -> None:
    """Time every setting on ``images`` in interleaved rounds until each has
    :data:`~tokenmerge.tools.timing.MIN_TIMED_ROUNDS` timed repetitions, so that a
    few batches (or one) still give a spread to judge their speed by."""
    rounds = MIN_TIMED_ROUNDS - min(len(tally.per_image) for tally in tallies.values())
    if rounds <= 0:
        return
    runners = {setting.name: setting_runner(model, setting) for setting in settings}
    with options.autocast(images.device, amp):
        times = time_interleaved(runners, images, rounds, 0, progress, "timing again")
    for name, seconds in times.items():
        tallies[name].per_image += [value / len(images) for value in seconds]


def combine_tallies(tallies: dict[str, Tally], device: torch.device) -> None:
    """Sum the counts of all processes and pool their timings, in place."""
    counts = combine([value for t in tallies.values() for value in (t.top1, t.top5, t.images, t.labelled,
                                                                    t.disagreeing, t.kl)], device)
    for index, tally in enumerate(tallies.values()):
        mine = counts[6 * index:6 * index + 6]
        tally.top1, tally.top5, tally.images, tally.labelled, tally.disagreeing = (int(value) for value in mine[:5])
        tally.kl = float(mine[5])
        tally.per_image = gather_objects(tally.per_image)


def make_rows(model: torch.nn.Module, settings: Sequence[Setting], tallies: dict[str, Tally]) -> list[EvalRow]:
    baseline = tallies[UNPATCHED]
    rows = []
    for setting in settings:
        tally = tallies[setting.name]
        rows.append(EvalRow(
            setting=setting.name,
            method="" if setting.r is None else setting.method + ("" if setting.prop_attn else " without prop_attn"),
            r="" if setting.r is None else schedules.describe(setting.r),
            tokens_left=tokenmerge.token_counts(unwrap(model), r=setting.r or 0)[-1],
            top1=100 * tally.top1 / tally.labelled if tally.labelled else None,
            top5=100 * tally.top5 / tally.labelled if tally.labelled else None,
            top1_correct=tally.top1,
            top5_correct=tally.top5,
            images=tally.images,
            images_per_second=1 / statistics.median(tally.per_image),
            speedup=statistics.median(baseline.per_image) / statistics.median(tally.per_image),
            iqr_percent=spread_percent(tally.per_image),
            disagreement=100 * tally.disagreeing / tally.images,
            kl=tally.kl / tally.images,
            disagreeing=tally.disagreeing,
        ))
    return rows


def evaluate_settings(
    model: torch.nn.Module,
    dataset: Dataset,
    settings: Sequence[Setting],
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    amp: str = "none",
) -> Evaluation:
    """Top-1 and top-5 accuracy, fidelity to the unpatched model and images per second
    of ``model`` in every setting (the first being the unpatched model; no setting
    twice), on the (image tensor, label) items of ``dataset`` (a label below 0: no
    label, counted in the fidelity only), the model and the images in ``dtype``,
    under autocast to ``amp``.

    Each batch is loaded once and run through every setting, timing only the forward
    passes, so the figures of all settings come from the same images in the same
    run. Items that are :class:`tokenmerge.tools.data.Unreadable` (see
    :class:`tokenmerge.tools.data.TolerantImageFiles`) are reported and not counted.
    In a ``torch.distributed`` process group every process must call this with the
    same dataset; each evaluates its share and all get the combined result. The model
    is put in eval mode, moved to ``device`` and left unpatched.
    """
    if batch_size < 1 or workers < 0:
        raise ValueError("the batch size must be at least 1 and the number of workers at least 0")
    if len(dataset) == 0:
        raise ValueError("there are no images to evaluate")
    if not settings or settings[0].r is not None:
        raise ValueError("the first setting must be the unpatched model, which the speed-ups are relative to")
    repeats = unique(settings)[1]
    if repeats:
        raise ValueError(f"settings {', '.join(repeats)}: give every setting once, or its counts add up")
    for setting in settings:
        tokenmerge.token_counts(unwrap(model), r=setting.r or 0)  # validates every r before the long run
    device = torch.device(device)
    model = model.eval().to(device=device, dtype=dtype)
    loader = shard_loader(dataset, batch_size, workers)
    share = sum(len(indices) for indices in loader.batch_sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        tallies, unreadable = tally_batches(model, loader, settings, device, progress and rank() == 0, share,
                                            dtype, amp)
    configure(model, Setting(UNPATCHED))
    combine_tallies(tallies, device)
    unreadable = sorted(gather_objects(unreadable), key=lambda item: item.path)
    if tallies[UNPATCHED].images == 0:
        raise ValueError(f"none of the {len(dataset)} images could be read")
    return Evaluation(make_rows(model, settings, tallies), unreadable, world_size())


# --- output ------------------------------------------------------------------------

COLUMNS = [
    ("setting", "setting", "<"),
    ("tokens_left", "tokens left", "d"),
    ("top1", "top-1 %", ".2f"),
    ("top5", "top-5 %", ".2f"),
    ("disagreement", "differs %", ".2f"),
    ("kl", "KL", ".4f"),
    ("images", "images", "d"),
    ("images_per_second", "img/s", ".1f"),
    ("iqr_percent", "IQR %", ".1f"),
    ("speedup", "speed-up", ".2f"),
]
LABELLED_ONLY = ("top1", "top5")
#: What the figures can plot against measured speed: (row field, axis label).
MEASURES = {"top1": "top-1 accuracy (%)", "disagreement": "top-1 differs from unpatched (% of images)"}


def format_rows(rows: Sequence[EvalRow]) -> str:
    """The table of ``rows``; without labels, without the accuracy columns. "differs %"
    is the share of images whose top-1 differs from the unpatched model's, "KL" the
    mean KL divergence from its outputs."""
    labelled = any(row.top1 is not None for row in rows)
    columns = [column for column in COLUMNS if labelled or column[0] not in LABELLED_ONLY]
    return format_table([asdict(row) for row in rows], columns)


def describe_unreadable(unreadable: Sequence[Unreadable]) -> str:
    """``N unreadable images (not counted): path1, path2``, then the reason for each."""
    noun = "image" if len(unreadable) == 1 else "images"
    lines = [f"{len(unreadable)} unreadable {noun} (not counted): {', '.join(item.path for item in unreadable)}"]
    lines += [f"  {item.path}: {item.reason}" for item in unreadable]
    return "\n".join(lines)


# --- the commands' shared options and steps ------------------------------------------


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """The model, the image folder, batching, runtime and outputs: the same for every
    command that evaluates accuracy."""
    options.add_model_options(parser)
    group = parser.add_argument_group("images")
    group.add_argument("--data", required=True, metavar="DIR",
                       help="image folder: <synset>/<image> files, <class>/<image> files with --class-map, or any "
                       "images with --no-labels (a folder of images without sub-folders needs no flag)")
    group.add_argument("--no-labels", dest="labels", action="store_false",
                       help="read every image under --data, at any depth, without labels: no top-1/top-5, only the "
                       "differences from the unpatched model (differs %%, KL), which need none")
    group.add_argument("--class-map", metavar="FILE",
                       help="text file with one class name per line, the line number (from 0) being the class "
                       "index (timm's convention), for class folders not named by ImageNet synsets; "
                       "'tokenmerge train' writes one as OUTPUT/classes.txt")
    group.add_argument("--limit", type=options.positive_int, metavar="N",
                       help="evaluate N images only: a class-balanced sample drawn with --seed (default: all)")
    group.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default: 0)")
    group.add_argument("--batch-size", type=options.positive_int, default=64, help="images per batch (default: 64)")
    options.add_runtime_options(parser, workers=True)
    group = parser.add_argument_group("outputs")
    group.add_argument("--output", metavar="FILE",
                       help="write the rows, the options and the environment to a .json or .csv file")
    group.add_argument("--plot", metavar="FILE", help="plot top-1 (compare: and how often top-1 differs from the "
                       "unpatched model) against images/s to a .png (or .pdf, .svg) file")


def check_labels(samples: Sequence[tuple[Path, int]], model: ImageModel, class_map: Optional[str]) -> None:
    """Labels the model cannot predict would only ever count as wrong: refuse them,
    and a class map with another number of classes than the model's."""
    num_classes = model.num_classes
    if samples and samples[0][1] == NO_LABEL:
        return
    if class_map is None:
        if num_classes != 1000:
            raise ValueError(f"synset folders are labelled with ImageNet-1k indices, but the model has {num_classes} "
                             "classes; give --class-map with the model's class names")
        return
    names = len(read_class_map(class_map))
    if names != num_classes:
        raise ValueError(f"class map {class_map} names {names} classes, but the model has {num_classes}; give the "
                         f"class map of the model's classes, or a model with {names} (--num-classes {names})")


def classifier(args: argparse.Namespace, progress: bool = True) -> ImageModel:
    """The model to evaluate, as an :class:`tokenmerge.tools.models.ImageModel` with
    class logits: an open_clip model becomes a zero-shot classifier over the
    ImageNet-1k class names, or over the names of the class map."""
    model = load_model(args.library, args.model, args.checkpoint, num_classes=args.num_classes,
                       model_kwargs=args.model_kwargs, img_size=args.img_size)
    require_images(model, getattr(args, "command", "eval"))
    if model.num_classes is None and args.library == "open_clip":
        from open_clip import IMAGENET_CLASSNAMES

        names = read_class_map(args.class_map) if args.class_map else IMAGENET_CLASSNAMES
        if progress:
            print(f"building the zero-shot classifier of {args.model} over {len(names)} class names", flush=True)
        model = with_zero_shot_head(model, args.model, names, progress=progress)
    if model.num_classes is None:
        raise ValueError(f"{args.model} gives embeddings, not class scores; evaluate a classification model "
                         "(transformers: a *ForImageClassification checkpoint)")
    if model.transform is None:
        raise ValueError(missing_processor(str(args.checkpoint or args.model), model.network))
    return model


def missing_processor(folder: str, network: torch.nn.Module) -> str:
    """The error for a transformers folder without an image processor: how to write one
    (the model type's default processor at the model's image size), since a guess made
    here would evaluate with preprocessing the model was not trained with."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    config = network.config
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type) or {}
    name = names.get("torchvision") or names.get("pil") if isinstance(names, dict) else names
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    example = "" if not name else (
        f"; for {config.model_type}'s default preprocessing at {size}x{size}: python -c \"import transformers; "
        f"transformers.{name}(size={{'height': {size}, 'width': {size}}}).save_pretrained('{folder}')\" (give "
        "the mean, std and resizing the weights were trained with if they differ)")
    return (f"{folder} has no image processor configuration (preprocessor_config.json) to prepare images with; "
            f"write the one the model was trained with beside its weights{example}")


def load_samples(args: argparse.Namespace) -> tuple[list[tuple[Path, int]], int]:
    """The labelled images to evaluate (a balanced sample of ``--limit``) and how many
    the folder holds."""
    samples = folder_samples(args.data, args.class_map, args.labels)
    return (balanced_subset(samples, args.limit, args.seed) if args.limit else samples), len(samples)


def announce(args: argparse.Namespace, model: ImageModel, images: int, found: int, env: dict,
             labelled: bool = True) -> None:
    layout = "no labels" if not labelled else f"class map {args.class_map}" if args.class_map else \
        "ImageNet synset folders"
    kind = "class-balanced sample" if labelled else "sample"
    sample = f" (a {kind} of {found}, seed {args.seed})" if images < found else ""
    processes = f", {world_size()} processes" if world_size() > 1 else ""
    precision = args.dtype + (f", autocast {args.amp}" if args.amp != "none" else "")
    print(f"{model_title(args.model, model.weights)} on {images} image files{sample} in {args.data} "
          f"({layout}), batch {args.batch_size}, {precision}{processes}; every batch runs through every setting, "
          f"forward passes timed; {describe_environment(env)}", flush=True)
    if model.weights is None and labelled and first_process():
        options.note(getattr(args, "command", "eval"), "the model has random weights (no --checkpoint), so its "
                     "top-1 and top-5 are chance; give its trained weights with --checkpoint to measure accuracy")


#: What to do about noisy timings here, where every batch is one timing of every setting.
MORE_BATCHES = "measure again on more images (every batch is one timing), fewer --threads or on a quieter machine"


def report(
    args: argparse.Namespace, result: Evaluation, run: dict, env: dict,
    draw: Callable[[Sequence[EvalRow], Optional[str]], object],
) -> None:
    """Print the table and the unreadable files, and write ``--output`` and ``--plot``
    (drawn by ``draw(rows, title)``)."""
    print(format_rows(result.rows))
    for warning in speed_warnings({row.setting: row.speedup for row in result.rows[1:]},
                                  {row.setting: row.iqr_percent for row in result.rows}, remedy=MORE_BATCHES):
        options.note(getattr(args, "command", "eval"), warning, kind="warning")
    if result.unreadable:
        print(describe_unreadable(result.unreadable))
    if args.output:
        write_rows(args.output, [asdict(row) | {"unreadable": len(result.unreadable)} for row in result.rows],
                   run, env)
        print(f"wrote {args.output}")
    if args.plot:
        processes = "1 process" if env["processes"] == 1 else f"{env['processes']} processes"
        title = f"{args.model}: {result.rows[0].images} images, {env['device']}, {processes} x {env['threads']} threads"
        write_figure(args.plot, draw(result.rows, title), dpi=150)
        print(f"wrote {args.plot}")


def run_settings(
    args: argparse.Namespace,
    command: str,
    make_settings: Callable[[torch.nn.Module], list[Setting]],
    draw: Callable[[Sequence[EvalRow], Optional[str]], object],
) -> None:
    """Evaluate the settings ``make_settings(network)`` gives, as the arguments say,
    on one process or under torchrun, after checking everything that can be checked,
    and report them on the first process."""
    check_output_path(args.output)
    check_figure_path(args.plot)
    check_apart(args, [Place("--output", args.output), Place("--plot", args.plot)])
    device = options.check_runtime(args)
    samples, found = load_samples(args)
    model = classifier(args, progress=first_process())
    check_labels(samples, model, args.class_map)
    settings, notes = unique(make_settings(unwrap(model)))
    if first_process():
        for text in notes + cap_notes(unwrap(model), settings):
            options.note(command, text)
    dataset = TolerantImageFiles(samples, model.transform)
    with process_group(device) as device:
        env = environment(device) | {"processes": world_size()}
        if rank() == 0:
            announce(args, model, len(samples), found, env, labelled=samples[0][1] != NO_LABEL)
        workers = options.default_workers(args.workers, device)
        result = evaluate_settings(model, dataset, settings, args.batch_size, workers, device, rank() == 0,
                                   options.DTYPES[args.dtype], args.amp)
        if rank() == 0:
            record = run_record(args) | {"settings": [setting.name for setting in settings]}
            report(args, result, record, env, draw)
