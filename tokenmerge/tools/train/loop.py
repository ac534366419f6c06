"""A fine-tuning run from start to end: build it, resume it, train and validate
every epoch, write what it finished.

A training or validation image that cannot be decoded is skipped and named once in a
note, as ``tokenmerge eval`` does, so that one bad file costs neither the run nor a
finished epoch; a run only stops at a training batch none of whose images can be
read, or after an epoch (kept) if no validation image can."""
from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.api import checked_adapter
from tokenmerge.state import CappedRWarning

from ..data import Batch, TolerantImageFiles, Unreadable
from ..distributed import combine, gather_objects, process_group, rank, shard_loader, world_size
from ..files import Place, check_apart, check_writable_folder, write_figure, write_text
from ..models import create_timm_model
from ..options import default_workers, note
from ..progress import ProgressBar
from ..reports import describe_environment, environment
from ..settings import Setting, cap_notes
from ..timing import steady_throughput, too_few_rounds, untrusted
from .checkpoints import CHECKPOINT_PREFIX, Progress, resume, save_checkpoint
from .config import AMP_DTYPES, TrainConfig, check_config
from .metrics import METRIC_COLUMNS, draw_metrics, keep_steps, write_metrics, write_steps
from .splits import SeededImages, Splits, data_transforms, read_splits, train_loader
from .steps import count_correct, train_step, unwrap_parallel


def create_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The timm model with a new ``num_classes`` classifier, its pretrained weights
    read from ``config.checkpoint`` (random without), and drop path set; a model
    tokenmerge cannot merge in is refused, naming what it does not support."""
    kwargs = dict(config.model_kwargs, num_classes=num_classes, drop_path_rate=config.drop_path)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    model = create_timm_model(config.model, config.checkpoint, **kwargs)
    try:
        checked_adapter(model)
    except TypeError as error:
        raise ValueError(f"--model {config.model}: {error}") from None
    return model


def schedule_notes(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """What the cap policy says about the training and validation schedules (see
    :func:`tokenmerge.tools.settings.cap_notes`); an error for a schedule the model
    cannot take at all, such as a per-block list of the wrong length."""
    settings = [Setting("r", config.r, config.method), Setting("eval r", config.eval_r, config.method)]
    for setting in settings:
        try:
            cap_notes(model, [setting])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{setting.name} {schedules.describe(setting.r)}: {error}") from None
    return cap_notes(model, settings)


#: timm's learning rate schedulers that step with the updates, as a run does ("plateau",
#: which needs a metric, is refused apart by the configuration's check).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt")


def check_timm_names(opt: str, sched: str, prefix: str = "") -> None:
    """Refuse an optimizer or a scheduler that timm does not have, naming the option
    (``prefix`` + its name: ``--`` on the command line) and listing the choices,
    before anything is built; timm itself would only fail once the model exists."""
    from timm.optim import list_optimizers

    optimizers = list_optimizers()
    if opt.lower().split("_")[-1] not in optimizers:  # (timm reads "lookahead_adamw" as adamw with lookahead)
        raise ValueError(f"{prefix}opt {opt}: timm has no optimizer of that name; choose one of "
                         f"{', '.join(optimizers)}")
    if sched not in SCHEDULERS and sched != "plateau":
        raise ValueError(f"{prefix}sched {sched}: timm has no scheduler of that name; choose one of "
                         f"{', '.join(SCHEDULERS)}")


def method_text(config: TrainConfig) -> str:
    attention = "" if config.prop_attn else " without proportional attention"
    return "" if config.method == "tome" and config.prop_attn else f"{config.method}{attention}, "


def check_output_folder(output: Path) -> None:
    """The output folder must be a folder this process can write, or creatable: tried
    in it or in the folder it would be made in (see
    :func:`tokenmerge.tools.files.check_writable_folder`)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file, not a folder")
    existing = next(folder for folder in (output, *output.parents) if folder.exists())
    try:
        check_writable_folder(existing)
    except OSError as error:
        raise ValueError(f"output {output} cannot be written ({existing}: {error.strerror}); "
                         "choose another folder") from None


#: The files a run writes in its output folder, beside its checkpoint folders.
OUTPUT_FILES = ("model.safetensors", "classes.txt", "metrics.csv", "metrics.png", "steps.csv")


def run_outputs(output: Path) -> list[Place]:
    """What a run writes in its output folder: its files, and the checkpoint folders
    there now (which it may replace or delete); its own checkpoints are no input of
    any option, so that a run still resumes from them."""
    folders = sorted(output.glob(f"{CHECKPOINT_PREFIX}*")) + sorted(output.glob(f".{CHECKPOINT_PREFIX}*.partial"))
    return [Place("--output", path) for path in [output / name for name in OUTPUT_FILES] + folders]


def seed_epoch(seed: int, epoch: int) -> None:
    """Derive every random state of an epoch (augmentation, dropout, drop path, data
    loading workers) from the seed, the epoch and the process: a resumed run draws
    what an uninterrupted one would, and processes draw differently."""
    value = (seed * 1_000_003 + epoch) * 1_009 + rank()
    random.seed(value)
    torch.manual_seed(value)


@dataclass
class Run:
    """What the epochs of one run share."""

    config: TrainConfig
    device: torch.device
    model: torch.nn.Module  # in DistributedDataParallel under a process group
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int

    @property
    def network(self) -> torch.nn.Module:
        return unwrap_parallel(self.model)


def train_epoch(
    run: Run, epoch: int, progress: Progress
) -> tuple[dict[str, float], list[dict[str, Any]], list[Unreadable]]:
    """Train one epoch on the readable images of every batch; returns its figures over
    all processes, a row per step and the files of this process that could not be read."""
    config, device = run.config, run.device
    dtype = AMP_DTYPES[config.amp]
    run.train_loader.sampler.set_epoch(epoch)
    run.train_loader.dataset.set_epoch(epoch)
    tokenmerge.apply(run.network, r=config.r, method=config.method, prop_attn=config.prop_attn)
    loss_sum = correct = images = 0.0
    steps, skipped, step_images, step_seconds = [], [], [], []
    bar = ProgressBar(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               disable=not (config.progress and rank() == 0))
    start = time.perf_counter()
    for batch, labels, unreadable in islice(run.train_loader, run.steps_per_epoch):
        skipped += unreadable
        if batch is None:
            bar.close()
            raise ValueError(
                f"no image of a training batch could be read ({', '.join(item.path for item in unreadable)}); "
                f"replace or remove them and run again: {config.output} keeps the checkpoint of every finished "
                f"epoch ({epoch})")
        batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        lr = run.optimizer.param_groups[0]["lr"]
        loss, hits = train_step(run.model, run.optimizer, batch, labels, autocast_dtype=dtype, scaler=run.scaler)
        progress.step += 1
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=progress.step)
        loss_total, hits, count = combine([loss * len(labels), hits, len(labels)], device)
        if not math.isfinite(loss_total):
            bar.close()
            raise ValueError(
                f"the training loss became {loss_total / count} at step {progress.step} (epoch {epoch + 1}); the run "
                f"stops, and {config.output} keeps the checkpoint of every finished epoch ({epoch}); lower --lr, "
                "or train in bfloat16 rather than float16")
        loss_sum, correct, images = loss_sum + loss_total, correct + hits, images + count
        steps.append({"epoch": epoch + 1, "step": progress.step, "loss": loss_total / count, "lr": lr})
        step_images.append(count)
        step_seconds.append(time.perf_counter() - start)  # loading included: the speed a run trains at
        start = time.perf_counter()
        bar.update()
        bar.set_postfix(loss=f"{loss_total / count:.4f}")
    bar.close()
    speed, spread, timed_steps = steady_throughput(step_images, step_seconds)
    return {"train_loss": loss_sum / images, "train_top1": 100 * correct / images, "images_per_second": speed,
            "images_per_second_iqr_percent": spread, "timed_steps": timed_steps, "lr": steps[-1]["lr"]}, steps, skipped


#: What to do about an epoch's untrustworthy images per second.
MORE_STEPS = "give an epoch more steps (--max-steps-per-epoch), fewer --threads or a quieter machine"


def speed_warning(row: dict[str, Any]) -> str:
    """The shared warning (:mod:`tokenmerge.tools.timing`) when an epoch's images per
    second is not to be trusted: timed over too few steps to estimate a spread, or
    over steps whose times spread too much; ``""`` otherwise."""
    name = f"train img/s of epoch {row['epoch']}"
    return (too_few_rounds({name: row["timed_steps"]}, unit="steps after the first", remedy=MORE_STEPS)
            or untrusted({name: row["images_per_second_iqr_percent"]}, remedy=MORE_STEPS))


def readable_batches(loader: Iterable[Batch], unreadable: list[Unreadable]) -> Iterator[tuple[torch.Tensor, ...]]:
    """The (images, labels) of ``loader``'s batches that hold a readable image, adding
    the files that could not be read to ``unreadable``."""
    for batch in loader:
        unreadable += batch.unreadable
        if batch.images is not None:
            yield batch.images, batch.labels


def validate(run: Run) -> tuple[float, list[Unreadable]]:
    """Top-1 on the readable validation images with the evaluation schedule (NaN if
    there are none), and the files of this process that could not be read."""
    tokenmerge.apply(run.network, r=run.config.eval_r, method=run.config.method, prop_attn=run.config.prop_attn)
    unreadable: list[Unreadable] = []
    correct, total = count_correct(run.model, readable_batches(run.val_loader, unreadable), run.device,
                                   autocast_dtype=AMP_DTYPES[run.config.amp])
    return (100 * correct / total if total else math.nan), unreadable


def note_unreadable(split: str, unreadable: list[Unreadable], reported: set[str]) -> None:
    """Name, on the first process, the files of every process that could not be read
    and were not named before (``reported``, updated): each once in a run, not every epoch."""
    new = {item.path: item for item in gather_objects(unreadable) if item.path not in reported}
    reported.update(new)
    if new and rank() == 0:
        noun = "image" if len(new) == 1 else "images"
        files = ", ".join(f"{item.path} ({item.reason})" for item in sorted(new.values(), key=lambda item: item.path))
        note("train", f"{len(new)} unreadable {split} {noun} skipped, not counted: {files}")


def finish_epoch(run: Run, epoch: int, progress: Progress, steps: list[dict[str, Any]]) -> None:
    """On the first process: the step rows, the checkpoint, then the metrics files."""
    if rank() != 0:
        return
    output, config = Path(run.config.output), run.config
    write_steps(output / "steps.csv", steps)
    state = {"epoch": epoch + 1, "step": progress.step, "processes": world_size(), "config": config.identity(),
             "history": progress.history, "scaler": run.scaler.state_dict() if run.scaler else None}
    save_checkpoint(output, epoch + 1, run.network, run.optimizer, state)
    write_metrics(output, progress.history)
    title = (f"{config.model}: {method_text(config)}r={schedules.describe(config.r)} training, "
             f"r={schedules.describe(config.eval_r)} validation")
    write_figure(output / "metrics.png", draw_metrics(progress.history, title), dpi=120)


def describe_epoch(row: dict[str, Any], config: TrainConfig) -> str:
    return (f"epoch {row['epoch']}/{config.epochs}: loss {row['train_loss']:.4f}, "
            f"train top-1 {row['train_top1']:.2f}%, "
            f"val top-1 {row['val_top1']:.2f}% (r={schedules.describe(config.eval_r)}), "
            f"{row['images_per_second']:.1f} img/s, {row['epoch_seconds']:.1f} s, lr {row['lr']:.3g}")


def build_run(config: TrainConfig, splits: Splits, device: torch.device) -> Run:
    """Model, optimizer, scheduler and loaders on this process, merging applied."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    if config.batch_size % world_size():
        raise ValueError(f"the global batch of {config.batch_size} images cannot be shared evenly by "
                         f"{world_size()} processes; give a multiple of {world_size()}")
    if len(splits.train) < config.batch_size:
        raise ValueError(f"{len(splits.train)} training images are fewer than one batch of {config.batch_size}")
    torch.manual_seed(config.seed)
    model = create_model(config, len(splits.classes))
    if rank() == 0:
        for text in schedule_notes(model, config):
            note("train", text)
    tokenmerge.apply(model, r=config.r, method=config.method, prop_attn=config.prop_attn)
    model.to(device)
    optimizer = create_optimizer_v2(model, config.opt, lr=config.lr, weight_decay=config.weight_decay)
    workers = default_workers(config.workers, device)
    train_transform, eval_transform = data_transforms(model, config.augment)
    loader = train_loader(SeededImages(splits.train, train_transform, config.seed), config,
                          config.batch_size // world_size(), workers, device.type == "cuda")
    steps = min(len(loader), config.max_steps_per_epoch or len(loader))
    scheduler, _ = create_scheduler_v2(optimizer, config.sched, num_epochs=config.epochs,
                                       warmup_epochs=config.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=steps)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "float16" else None
    parallel = model
    if world_size() > 1:
        parallel = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    val_loader = shard_loader(TolerantImageFiles(splits.val, eval_transform), config.batch_size, workers)
    return Run(config, device, parallel, optimizer, scheduler, scaler, loader, val_loader, steps)


def announce(config: TrainConfig, splits: Splits, progress: Progress) -> None:
    weights = config.checkpoint or "random weights"
    processes = ""
    if world_size() > 1:
        processes = f" ({config.batch_size // world_size()} per process x {world_size()} processes)"
    print(f"{config.model} ({weights}) on {len(splits.train)} training and {len(splits.val)} validation images of "
          f"{len(splits.classes)} classes in {config.data}; batch {config.batch_size}{processes}, "
          f"{method_text(config)}r={schedules.describe(config.r)} training, "
          f"r={schedules.describe(config.eval_r)} validation, "
          f"amp {config.amp}; {describe_environment(environment(config.device))}", flush=True)
    if progress.epoch:
        print(f"resuming after epoch {progress.epoch} from {config.output}/{CHECKPOINT_PREFIX}{progress.epoch}",
              flush=True)


def prepare_output(config: TrainConfig, splits: Splits, progress: Progress) -> None:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "classes.txt", "\n".join(splits.classes) + "\n")
    keep_steps(output, progress.step)


def train(config: TrainConfig) -> list[dict[str, Any]]:
    """Fine-tune as ``config`` says, on one process or in the ``torchrun`` group the
    environment describes, resuming after the last finished epoch of a checkpoint in
    the output folder; returns a row of metrics per epoch (earlier runs' included)."""
    check_config(config)
    check_timm_names(config.opt, config.sched)
    check_output_folder(Path(config.output))
    check_apart(config, run_outputs(Path(config.output)))
    splits = read_splits(config.data, config.val_split)
    with process_group(config.device) as device, warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)  # (a capped r is said once, in a note)
        run = build_run(config, splits, device)
        progress = resume(config, run.network, run.optimizer, run.scaler)
        if rank() == 0:
            prepare_output(config, splits, progress)
            announce(config, splits, progress)
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=progress.step)
        reported: set[str] = set()
        for epoch in range(progress.epoch, config.epochs):
            start = time.perf_counter()
            seed_epoch(config.seed, epoch)
            figures, steps, skipped = train_epoch(run, epoch, progress)
            val_top1, unreadable = validate(run)
            row = {"epoch": epoch + 1, **figures, "val_top1": val_top1, "epoch_seconds": time.perf_counter() - start}
            warning = speed_warning(row)
            row = {key: row[key] for key, _, _ in METRIC_COLUMNS}
            progress.history.append(row)
            finish_epoch(run, epoch, progress, steps)
            if rank() == 0:
                print(describe_epoch(row, config), flush=True)
                if warning:
                    note("train", warning, kind="warning")
            note_unreadable("training", skipped, reported)
            note_unreadable("validation", unreadable, reported)
            if math.isnan(val_top1):
                raise ValueError(f"none of the {len(splits.val)} validation images could be read; epoch {epoch + 1} "
                                 f"is saved in {config.output}: replace them and run the same command to go on")
        tokenmerge.remove(run.network)
    return progress.history
