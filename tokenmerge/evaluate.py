"""``tokenmerge eval``: top-1 and top-5 accuracy of a model on an image folder for a
sweep of r, with the throughput of every setting measured in the same run.

Every batch is decoded once and then run through every setting in turn (unpatched,
r1, r2, ..., each batch starting one setting further on), so all settings see the
same images and share whatever else the machine is doing; only the forward passes
are timed, after one untimed pass of every setting on the first batch. Files that cannot be decoded
are reported by name and left out of the counts.

For notebooks::

    from tokenmerge.evaluate import evaluate
    result = evaluate(model, dataset, rs=[0, 8, 13])   # dataset yields (image, label)
    result.rows[2].top1, result.rows[2].images_per_second

Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous variables) the command joins a ``torch.distributed`` process group (gloo
on CPU, NCCL on CUDA). Processes take whole batches in turn, so every image is
evaluated exactly once and in the same batch as in a single process; the counts are
summed across processes, which gives exactly the figures of a single process.
Throughput is all images divided by the forward time of the slowest process: the
rate of the whole group, since it is done when its slowest member is.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from tqdm import tqdm

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.bench import UNPATCHED, Setting, configure, make_settings, synchronize
from tokenmerge.data import Batch, Unreadable, collate_readable
from tokenmerge.models import unwrap
from tokenmerge.state import CappedRWarning

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
#: Data loading processes by default on a GPU; on CPU images are decoded between the timed passes.
CUDA_WORKERS = 4


@dataclass
class Tally:
    """What one setting has counted so far: correct predictions, images, forward time."""

    top1: int = 0
    top5: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class EvalRow:
    """One setting: accuracy in percent and as counts of correct images, the images
    counted (unreadable files excluded), and the measured throughput, with its
    speed-up over the unpatched model."""

    setting: str
    method: str
    r: str
    tokens_left: int
    top1: float
    top5: float
    top1_correct: int
    top5_correct: int
    images: int
    images_per_second: float
    speedup: float


@dataclass
class Evaluation:
    """The rows of every setting, the files that could not be read (not counted in
    any row), and the number of processes that shared the work."""

    rows: list[EvalRow]
    unreadable: list[Unreadable] = field(default_factory=list)
    processes: int = 1


# --- processes -------------------------------------------------------------------


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


@contextmanager
def process_group(device: str | torch.device) -> Iterator[torch.device]:
    """Join the ``torch.distributed`` group a launcher such as ``torchrun`` describes
    in the environment (``WORLD_SIZE`` > 1), with gloo on CPU and NCCL on CUDA, and
    leave it afterwards; yields the device this process should use (its own GPU
    under CUDA). Without such a launcher it only yields ``device``."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or distributed():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
        # Tear the group down only once every process is done: a gloo process whose
        # peer is still writing its outputs can abort while closing its connections.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """A loader over this process's share of ``dataset``: the batches a single
    process would make, taken in turn by the processes (batch k by process k mod N).
    Nothing is padded or repeated, and each image sits in the same batch as it
    would in a single process, so the per-image results are the same."""
    batches = list(BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False))
    return DataLoader(dataset, batch_sampler=batches[rank()::world_size()], num_workers=workers,
                      collate_fn=collate_readable)


def reduce_tallies(tallies: dict[str, Tally], device: torch.device) -> None:
    """Sum the counts of all processes and take the longest forward time, in place."""
    if not distributed():
        return
    counts = torch.tensor([[t.top1, t.top5, t.images] for t in tallies.values()], dtype=torch.int64, device=device)
    seconds = torch.tensor([t.seconds for t in tallies.values()], dtype=torch.float64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    for tally, (top1, top5, images), slowest in zip(tallies.values(), counts.tolist(), seconds.tolist()):
        tally.top1, tally.top5, tally.images, tally.seconds = top1, top5, images, slowest


def gather_unreadable(unreadable: list[Unreadable]) -> list[Unreadable]:
    """The unreadable files of all processes, sorted by path."""
    if distributed():
        shares: list[Optional[list[Unreadable]]] = [None] * world_size()
        dist.all_gather_object(shares, unreadable)
        unreadable = [item for share in shares for item in share or []]
    return sorted(unreadable, key=lambda item: item.path)


# --- counting ----------------------------------------------------------------------


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many labels are the top prediction, and how many are among the top five."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return int(hits[:, 0].sum()), int(hits.any(dim=-1).sum())


def timed_forward(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The logits of ``images`` and the seconds the forward pass took."""
    synchronize(images.device)
    start = time.perf_counter()
    logits = model(images)
    synchronize(images.device)
    return logits, time.perf_counter() - start


def warm_up(model: torch.nn.Module, settings: Sequence[Setting], images: torch.Tensor) -> None:
    """One untimed pass per setting, so that first-call costs are not timed."""
    for setting in settings:
        configure(model, setting)
        model(images)


def rotated(settings: Sequence[Setting], turn: int) -> list[Setting]:
    """``settings`` starting at position ``turn`` (mod their number): each batch starts
    with the next setting, so that no setting always runs first after loading, when
    the data loader's workers are busiest."""
    start = turn % len(settings)
    return [*settings[start:], *settings[:start]]


def tally_batch(
    model: torch.nn.Module, settings: Sequence[Setting], images: torch.Tensor, labels: torch.Tensor,
    tallies: dict[str, Tally],
) -> None:
    """Run one batch through every setting in turn and add up what each got right."""
    for setting in settings:
        configure(model, setting)
        logits, seconds = timed_forward(model, images)
        top1, top5 = correct_predictions(logits, labels)
        tally = tallies[setting.name]
        tally.top1, tally.top5 = tally.top1 + top1, tally.top5 + top5
        tally.images += len(labels)
        tally.seconds += seconds


def tally_batches(
    model: torch.nn.Module, batches: Iterable[Batch], settings: Sequence[Setting], device: torch.device,
    progress: bool, total: int,
) -> tuple[dict[str, Tally], list[Unreadable]]:
    """The tallies of every setting over ``batches``, and the files that could not be read."""
    tallies = {setting.name: Tally() for setting in settings}
    unreadable: list[Unreadable] = []
    description = "evaluating" if world_size() == 1 else f"evaluating, share of process {rank()}"
    with torch.inference_mode(), tqdm(total=total, desc=description, unit="img", disable=not progress) as bar:
        for turn, (images, labels, failed) in enumerate(batches):
            unreadable += failed
            if images is not None:
                images, labels = images.to(device), labels.to(device)
                if not any(tally.images for tally in tallies.values()):
                    warm_up(model, settings, images)
                tally_batch(model, rotated(settings, turn), images, labels, tallies)
            bar.update(len(labels) + len(failed))
            if failed and progress:
                bar.write(f"unreadable: {', '.join(item.path for item in failed)}", file=sys.stderr)
    return tallies, unreadable


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
            top1=100 * tally.top1 / tally.images,
            top5=100 * tally.top5 / tally.images,
            top1_correct=tally.top1,
            top5_correct=tally.top5,
            images=tally.images,
            images_per_second=tally.images / tally.seconds,
            speedup=baseline.seconds / tally.seconds,
        ))
    return rows


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    rs: Sequence[schedules.Schedule],
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Evaluation:
    """Top-1 and top-5 accuracy and images per second of ``model`` unpatched and with
    every schedule in ``rs``, on the (image tensor, label) items of ``dataset``
    (see :func:`evaluate_settings`)."""
    settings = make_settings(rs, with_limit=False)
    return evaluate_settings(model, dataset, settings, batch_size, workers, device, progress)


def evaluate_settings(
    model: torch.nn.Module,
    dataset: Dataset,
    settings: Sequence[Setting],
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Evaluation:
    """Top-1 and top-5 accuracy and images per second of ``model`` in every setting
    (the first being the unpatched model), on the (image tensor, label) items of
    ``dataset``.

    Each batch is loaded once and run through every setting, timing only the forward
    passes, so the figures of all settings come from the same images in the same
    run. Items that are :class:`tokenmerge.data.Unreadable` (see
    :class:`tokenmerge.data.TolerantImageFiles`) are reported and not counted. In a
    ``torch.distributed`` process group every process must call this with the same
    dataset; each evaluates its share and all get the combined result. The model is
    put in eval mode, moved to ``device`` and left unpatched.
    """
    if batch_size < 1 or workers < 0:
        raise ValueError("the batch size must be at least 1 and the number of workers at least 0")
    if len(dataset) == 0:
        raise ValueError("there are no images to evaluate")
    if not settings or settings[0].r is not None:
        raise ValueError("the first setting must be the unpatched model, which the speed-ups are relative to")
    for setting in settings:
        tokenmerge.token_counts(unwrap(model), r=setting.r or 0)  # validates every r before the long run
    device = torch.device(device)
    model = model.eval().to(device)
    loader = shard_loader(dataset, batch_size, workers)
    share = sum(len(indices) for indices in loader.batch_sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        tallies, unreadable = tally_batches(model, loader, settings, device, progress and rank() == 0, share)
    configure(model, Setting(UNPATCHED))
    reduce_tallies(tallies, device)
    unreadable = gather_unreadable(unreadable)
    if tallies[UNPATCHED].images == 0:
        raise ValueError(f"none of the {len(dataset)} images could be read")
    return Evaluation(make_rows(model, settings, tallies), unreadable, world_size())


# --- output ------------------------------------------------------------------------

COLUMNS = [
    ("setting", "setting", "<"),
    ("tokens_left", "tokens left", "d"),
    ("top1", "top-1 %", ".2f"),
    ("top5", "top-5 %", ".2f"),
    ("images", "images", "d"),
    ("images_per_second", "img/s", ".1f"),
    ("speedup", "speed-up", ".2f"),
]


def format_rows(rows: Sequence[EvalRow]) -> str:
    from .report import format_table

    return format_table([asdict(row) for row in rows], COLUMNS)


def describe_unreadable(unreadable: Sequence[Unreadable]) -> str:
    """``N unreadable images (not counted): path1, path2``, then the reason for each."""
    noun = "image" if len(unreadable) == 1 else "images"
    lines = [f"{len(unreadable)} unreadable {noun} (not counted): {', '.join(item.path for item in unreadable)}"]
    lines += [f"  {item.path}: {item.reason}" for item in unreadable]
    return "\n".join(lines)


def draw_plot(rows: Sequence[EvalRow], title: Optional[str] = None):
    """A matplotlib ``Figure`` of top-1 accuracy against measured images per second,
    one labelled point per setting. Built without pyplot, so it needs no display."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    for row in rows:
        unpatched = row.setting == UNPATCHED
        style = dict(marker="s", markersize=11, markerfacecolor="none", color="tab:gray") if unpatched else \
            dict(marker="o", color="tab:blue")
        ax.plot(row.images_per_second, row.top1, linestyle="none", **style)
        ax.annotate(row.setting, (row.images_per_second, row.top1), textcoords="offset points",
                    xytext=(6, -12) if unpatched else (6, 5), fontsize=8)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("images / s (measured)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return figure


def check_plot_path(path: str | Path | None) -> None:
    """Fail before the run, not after it, on a figure name that cannot be written."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"cannot write {path}: use a file name ending in {', '.join(PLOT_SUFFIXES)}")
    if not path.resolve().parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its folder does not exist")


# --- command -----------------------------------------------------------------------


def add_parser(subparsers) -> None:
    from .bench import add_method_argument
    from .cli import SWEEP_HELP, parse_sweep

    parser = subparsers.add_parser(
        "eval",
        help="top-1/top-5 accuracy and throughput on an image folder for a sweep of r",
        description="Evaluate a model unpatched and for every r on an image folder: ImageNet synset folders "
        "(n01440764/...) labelled with ImageNet-1k indices, or class folders labelled through --class-map. "
        "Images go through the model's own evaluation transform. Every batch runs through every setting, "
        "so accuracy and throughput come from the same run. Run it under torchrun to share the images "
        "between processes.",
    )
    parser.add_argument("--r", "--sweep", dest="r", default="0,8,13,16", type=parse_sweep,
                        help=SWEEP_HELP + " (default: 0,8,13,16); under torchrun write --sweep, since torchrun "
                        "reads --r as an abbreviation of its own options")
    add_method_argument(parser)
    add_evaluation_arguments(parser)
    parser.set_defaults(run=run)


def add_evaluation_arguments(parser) -> None:
    """The model, the image folder, batching, device and outputs: the same for every
    command that evaluates accuracy."""
    from .cli import add_model_arguments

    add_model_arguments(parser, default_model=None)
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="image folder: <synset>/<image> files, or <class>/<image> files with --class-map")
    parser.add_argument("--class-map", metavar="FILE",
                        help="text file with one class name per line, the line number (from 0) being the class index "
                        "(timm's convention), for class folders not named by ImageNet synsets")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--workers", type=int,
                        help="data loading processes per process (default: 0 on CPU, where workers would take cores "
                        f"from the timed forward passes; {CUDA_WORKERS} on CUDA)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    parser.add_argument("--output", help="write the rows to a .json or .csv file")
    parser.add_argument("--plot", metavar="FILE", help="plot top-1 against images/s to a .png (or .pdf, .svg) file")


def check_device(device: str) -> None:
    """A clear error, not a traceback, for a GPU that is not there."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")


def check_labels(samples: Sequence[tuple[Path, int]], model: torch.nn.Module, class_map: Optional[str]) -> None:
    """Labels the model cannot predict would only ever count as wrong: refuse them."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        return
    if class_map is None and num_classes != 1000:
        raise ValueError(f"synset folders are labelled with ImageNet-1k indices, but the model has {num_classes} "
                         "classes; give --class-map with the model's class names")
    largest = max(label for _, label in samples)
    if largest >= num_classes:
        raise ValueError(f"class map {class_map} gives class index {largest}, but the model has only "
                         f"{num_classes} classes")


def classifier(args):
    """The model to evaluate, as an :class:`tokenmerge.models.ImageModel` with class
    logits: an open_clip model becomes a zero-shot classifier over the ImageNet-1k
    class names, or over the names of the class map."""
    from .data import read_class_map
    from .models import load_model, with_zero_shot_head

    model = load_model(args.library, args.model, args.checkpoint)
    if model.num_classes is None and args.library == "open_clip":
        from open_clip import IMAGENET_CLASSNAMES

        names = read_class_map(args.class_map) if args.class_map else IMAGENET_CLASSNAMES
        model = with_zero_shot_head(model, args.model, names)
    if model.num_classes is None:
        raise ValueError(f"{args.model} gives embeddings, not class scores; evaluate a classification model "
                         "(transformers: a *ForImageClassification checkpoint)")
    if model.transform is None:
        raise ValueError(f"{args.checkpoint or args.model} has no image processor configuration "
                         "(preprocessor_config.json) to prepare images with")
    return model


def load_samples(args) -> list[tuple[Path, int]]:
    from .data import folder_samples

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    samples = folder_samples(args.data, args.class_map)
    return samples[:args.limit] if args.limit else samples


def announce(args, images: int, env: dict) -> None:
    from .report import describe_environment

    weights = args.checkpoint or "random weights"
    layout = f"class map {args.class_map}" if args.class_map else "ImageNet synset folders"
    processes = f", {world_size()} processes" if world_size() > 1 else ""
    print(f"{args.model} ({weights}) on {images} image files in {args.data} ({layout}), batch {args.batch_size}"
          f"{processes}; every batch runs through every setting, forward passes timed; {describe_environment(env)}",
          flush=True)


def report(args, result: Evaluation, env: dict, draw=None) -> None:
    """Print the table and the unreadable files, and write ``--output`` and ``--plot``
    (drawn by ``draw(rows, title)``, :func:`draw_plot` by default)."""
    from .report import write_rows

    print(format_rows(result.rows))
    if result.unreadable:
        print(describe_unreadable(result.unreadable))
    if args.output:
        write_rows(args.output, [asdict(row) | {"unreadable": len(result.unreadable)} for row in result.rows], env)
        print(f"wrote {args.output}")
    if args.plot:
        processes = "1 process" if env["processes"] == 1 else f"{env['processes']} processes"
        title = f"{args.model}: {result.rows[0].images} images, {env['device']}, {processes} x {env['threads']} threads"
        (draw or draw_plot)(result.rows, title).savefig(args.plot, dpi=150)
        print(f"wrote {args.plot}")


def run(args) -> None:
    run_settings(args, make_settings(args.r, with_limit=False, method=args.method), report)


def run_settings(args, settings: Sequence[Setting], report_result) -> None:
    """Evaluate ``settings`` as the arguments say, on one process or under torchrun,
    and let ``report_result(args, result, env)`` show the result on the first process."""
    from .data import TolerantImageFiles
    from .report import check_output_path, environment

    check_output_path(args.output)
    check_plot_path(args.plot)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = load_samples(args)
    model = classifier(args)
    check_labels(samples, model, args.class_map)
    dataset = TolerantImageFiles(samples, model.transform)
    with process_group(args.device) as device:
        env = environment(str(device)) | {"processes": world_size()}
        if rank() == 0:
            announce(args, len(samples), env)
        workers = args.workers if args.workers is not None else CUDA_WORKERS if device.type == "cuda" else 0
        result = evaluate_settings(model, dataset, settings, args.batch_size, workers, device, progress=rank() == 0)
        if rank() == 0:
            report_result(args, result, env)
