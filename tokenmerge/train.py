"""``tokenmerge train``: fine-tune a timm model with token merging, on one process or
under ``torchrun``, with checkpoints that survive interruptions.

For notebooks and scripts::

    from tokenmerge.train import TrainConfig, train
    history = train(TrainConfig(model="vit_small_patch16_224", checkpoint="vit_s.safetensors",
                                data="flowers", output="runs/flowers-r13", r=13, epochs=10))

The data folder holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (or
another validation folder, such as ``test/``, named by ``val_split``); classes
are the sorted folder names of ``train/`` (written to ``classes.txt`` in the output
folder, a class map for ``tokenmerge eval --class-map``), and the classifier is
re-created for their number. Images go through the model's own timm data config:
timm's training transform (random resized crop, flip, colour jitter) with
``augment``, its evaluation transform otherwise and for validation.

Merging while training
----------------------
:func:`tokenmerge.apply` works on a model in ``train()`` mode: dropout and drop path
stay active, and gradients flow through the size-weighted merges and through
proportional attention (the log-size bias is a function of the sizes, which carry
no gradient, so the matching itself is a fixed choice per step, as in the paper).
Keep ``prop_attn=True`` during training: the model then learns with the same
attention it is evaluated with, where a merged token speaks for all of its patches;
training without it and evaluating with it (or the reverse) changes the attention
the weights were fitted to. Under autocast the sizes and the size-weighted sums stay
float32 and only the result is cast back, so bfloat16 and float16 lose no range
however many patches a token stands for.

Checkpoints
-----------
After every epoch the first process writes ``OUTPUT/epoch-N/`` (into a hidden
partial folder, renamed when complete, so an interruption never leaves a half-written
checkpoint): ``model.safetensors`` (the weights, plain timm keys),
``optimizer.safetensors`` (the optimizer's tensors) and ``state.json`` (epoch, step,
configuration, the optimizer's other values and the metrics so far; nothing
pickled). ``OUTPUT/model.safetensors`` is the latest weights. Running the same
configuration again resumes after the last finished epoch, and gives the same
weights as an uninterrupted run: the random state of every epoch is derived from the
seed, the epoch and the process, and the learning rate schedule from the step.
A checkpoint of another configuration is refused. ``metrics.csv`` and
``metrics.png`` hold a row and a point per epoch, ``steps.csv`` the loss of every step.

Processes
---------
Under ``torchrun --nproc_per_node=N`` every process trains on its share of each
global batch (``batch_size / N`` images, from a ``DistributedSampler``) within
``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA); gradients are averaged, so
with the same seed a step sees the images and takes the update of a single process.
Validation takes whole batches in turn and sums the counts, which gives exactly the
accuracy of a single process. Only the first process writes files and prints.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.data import ImageFiles, class_folders, labelled_samples
from tokenmerge.evaluate import CUDA_WORKERS, distributed, process_group, rank, shard_loader, world_size
from tokenmerge.models import create_timm_model, timm_transform

AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_PREFIX = "epoch-"
#: Fields of :class:`TrainConfig` that do not change what is computed, so a run may resume with others.
RUN_ONLY_FIELDS = ("output", "workers", "device", "progress")
METRIC_COLUMNS = [
    ("epoch", "epoch", "d"),
    ("train_loss", "train loss", ".4f"),
    ("train_top1", "train top-1 %", ".2f"),
    ("val_top1", "val top-1 %", ".2f"),
    ("images_per_second", "train img/s", ".1f"),
    ("epoch_seconds", "epoch s", ".1f"),
    ("lr", "lr", ".3g"),
]
STEP_FIELDS = ["epoch", "step", "loss", "lr"]


@dataclass
class TrainConfig:
    """Everything a fine-tuning run depends on.

    ``data`` holds ``train/`` class folders and validation class folders in
    ``val_split`` (``val/`` by default); ``checkpoint`` is a local
    weights file for the pretrained ``model`` (loaded through timm's pretrained
    config; random weights without it); ``model_kwargs`` go to
    ``timm.create_model`` (e.g. ``{"depth": 6}``). ``batch_size`` is the global
    batch over all processes. ``r`` is the merging schedule while training and
    ``eval_r`` (default: ``r``) for validation, as schedules or their text
    (:func:`tokenmerge.schedule.parse`). ``amp`` is none, bfloat16 or float16
    (float16 on CUDA only, with loss scaling); ``img_size`` builds the model for
    that input size (the transforms resize to it); ``augment=False`` trains on the
    evaluation transform, which makes runs comparable image for image. ``progress``
    shows a progress bar on the first process.
    """

    model: str
    data: str
    output: str
    val_split: str = "val"
    checkpoint: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    max_steps_per_epoch: Optional[int] = None
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int = 0
    r: schedules.Schedule = 0
    eval_r: Optional[schedules.Schedule] = None
    prop_attn: bool = True
    drop_path: float = 0.1
    amp: str = "none"
    seed: int = 0
    workers: Optional[int] = None
    device: str = "cpu"
    img_size: Optional[int] = None
    augment: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, str):
            self.r = schedules.parse(self.r)
        if isinstance(self.eval_r, str):
            self.eval_r = schedules.parse(self.eval_r)
        if self.eval_r is None:
            self.eval_r = self.r

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint must agree on to be resumed, as JSON values."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUN_ONLY_FIELDS}
        values["r"], values["eval_r"] = schedules.describe(self.r), schedules.describe(self.eval_r)
        return json.loads(json.dumps(values))


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    positive = {"epochs": config.epochs, "batch_size": config.batch_size,
                "max_steps_per_epoch": config.max_steps_per_epoch, "img_size": config.img_size}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if config.lr <= 0 or config.weight_decay < 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {config.lr:g} and {config.weight_decay:g}")
    if not 0 <= config.warmup_epochs < config.epochs:
        raise ValueError(f"warmup_epochs must be at least 0 and fewer than the {config.epochs} epochs, "
                         f"got {config.warmup_epochs}")
    if not 0 <= config.drop_path < 1:
        raise ValueError(f"drop_path must be in [0, 1), got {config.drop_path}")
    if config.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {config.amp!r}")
    if config.sched == "plateau":
        raise ValueError("sched 'plateau' needs a metric every epoch and is not supported; use cosine, step, poly, ...")
    if config.workers is not None and config.workers < 0:
        raise ValueError("workers must be at least 0")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device}: torch sees no CUDA GPU here; use cpu")
    if config.amp == "float16" and device.type != "cuda":
        raise ValueError("amp float16 needs a CUDA device; use bfloat16 on the CPU")


# --- data ---------------------------------------------------------------------------


@dataclass
class Splits:
    """The labelled training and validation images, and the class names by index."""

    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    classes: list[str]


def read_splits(root: str | Path, val_split: str = "val") -> Splits:
    """The ``train/`` and ``<val_split>/`` class folders of ``root``, labelled by the
    sorted class names of ``train/``; a validation class that training lacks is an error."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    for split in ("train", val_split):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"data folder {root} has no {split}/ folder: expected "
                                    f"{root}/train/<class>/<image> and {root}/{val_split}/<class>/<image>")
    train_folders, val_folders = class_folders(root / "train"), class_folders(root / val_split)
    classes = [folder.name for folder in train_folders]
    index = {name: i for i, name in enumerate(classes)}
    unknown = [folder.name for folder in val_folders if folder.name not in index]
    if unknown:
        raise ValueError(f"{root / val_split} has classes that {root / 'train'} lacks: {', '.join(unknown)}")
    return Splits(labelled_samples(root / "train", train_folders, index),
                  labelled_samples(root / val_split, val_folders, index), classes)


def data_transforms(model: torch.nn.Module, augment: bool) -> tuple[Any, Any]:
    """(training, evaluation) transforms from the model's timm data config, at the
    input size the model was built for."""
    evaluation = timm_transform(model)
    return (timm_transform(model, is_training=True) if augment else evaluation), evaluation


def train_loader(dataset: ImageFiles, config: TrainConfig, batch: int, workers: int, pin: bool) -> DataLoader:
    """This process's batches of ``batch`` images, reshuffled every epoch (call
    ``loader.sampler.set_epoch``); incomplete batches are dropped, so every step
    averages the same number of images on every process."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=config.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True, pin_memory=pin)


# --- model --------------------------------------------------------------------------


def create_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The timm model with a new ``num_classes`` classifier, its pretrained weights
    read from ``config.checkpoint`` (random without), and drop path set."""
    kwargs = dict(config.model_kwargs, num_classes=num_classes, drop_path_rate=config.drop_path)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    return create_timm_model(config.model, config.checkpoint, **kwargs)


def check_schedule(model: torch.nn.Module, r: schedules.Schedule, option: str, name: str) -> None:
    """Refuse a schedule the model cannot take as asked: a per-block list of the wrong
    length, or a block asked to merge more than half of its mergeable tokens (which
    would silently train at a smaller r)."""
    from tokenmerge.adapters import find_adapter

    adapter = find_adapter(model)
    adapter.check(model)
    depth = adapter.depth(model)
    try:
        wanted = schedules.resolve(r, depth)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{option} {schedules.describe(r)}: {error}") from None
    num_tokens, num_protected = adapter.token_layout(model, None)
    taken = schedules.capped(wanted, num_tokens, num_protected)
    if taken != wanted:
        block = next(i for i, (want, take) in enumerate(zip(wanted, taken)) if want != take)
        entering = num_tokens - sum(taken[:block])
        raise ValueError(f"{option} {schedules.describe(r)} is more than {name} can take: block "
                         f"{block} gets {entering} tokens ({num_protected} protected) and can merge at most "
                         f"{taken[block]}; token counts per block for this r would be "
                         f"{schedules.token_counts(num_tokens, wanted, num_protected)}; lower r, or give one r "
                         "per block")


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``DistributedDataParallel``, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# --- steps --------------------------------------------------------------------------


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> tuple[float, int]:
    """One optimisation step on a batch, the model in train mode (a plain model or one
    in ``DistributedDataParallel``): cross-entropy under autocast to
    ``autocast_dtype`` if given, backward (through ``scaler`` if given), optimizer
    step. Returns the batch's mean loss and its number of correct top-1 predictions."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, autocast_dtype):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.item(), int((logits.argmax(dim=-1) == labels).sum())


def evaluate_accuracy(
    model: torch.nn.Module,
    loader: Iterable,
    device: str | torch.device,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
) -> float:
    """Top-1 accuracy in percent of ``model`` (in eval mode, without gradients) on the
    ``(images, labels, ...)`` batches of ``loader``; in a process group the counts of
    all processes are summed, so each loader should hold its share of the images."""
    device = torch.device(device)
    model = unwrap_parallel(model).eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    with torch.inference_mode(), autocast(device, autocast_dtype):
        for images, labels, *_ in loader:
            labels = labels.to(device)
            counts[0] += (model(images.to(device)).argmax(dim=-1) == labels).sum()
            counts[1] += len(labels)
    if distributed():
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    if total == 0:
        raise ValueError("there are no images to evaluate")
    return 100 * correct / total


def global_sums(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over all processes (unchanged in a single process)."""
    if world_size() == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def seed_epoch(seed: int, epoch: int) -> None:
    """Derive every random state of an epoch (augmentation, dropout, drop path, data
    loading workers) from the seed, the epoch and the process: a resumed run draws
    what an uninterrupted one would, and processes draw differently."""
    value = (seed * 1_000_003 + epoch) * 1_009 + rank()
    random.seed(value)
    torch.manual_seed(value)


# --- checkpoints --------------------------------------------------------------------


def finished_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(finished epochs, folder) of every complete checkpoint in ``output``, oldest first."""
    found = []
    for folder in output.glob(f"{CHECKPOINT_PREFIX}*"):
        number = folder.name[len(CHECKPOINT_PREFIX):]
        if number.isdigit() and (folder / "state.json").is_file():
            found.append((int(number), folder))
    return sorted(found)


def optimizer_parts(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors keyed ``"<param>.<name>"``, everything else as JSON values)."""
    tensors, values = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def optimizer_from_parts(tensors: dict[str, torch.Tensor], rest: dict[str, Any], current: dict) -> dict:
    """The inverse of :func:`optimizer_parts`; values JSON turned from tuples into
    lists become tuples again where ``current`` (the fresh optimizer's state dict) has tuples."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, entries in rest["values"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{key: tuple(value) if isinstance(fresh.get(key), tuple) else value for key, value in group.items()}
              for group, fresh in zip(rest["param_groups"], current["param_groups"])]
    return {"state": state, "param_groups": groups}


def publish(source: Path, target: Path) -> None:
    """Make ``target`` the file ``source`` atomically: a hard link where possible, a copy otherwise."""
    temporary = target.with_name(f".{target.name}.partial")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def save_checkpoint(
    output: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write ``OUTPUT/epoch-<epoch>/`` whole or not at all, point
    ``OUTPUT/model.safetensors`` to its weights and delete older checkpoints."""
    from safetensors.torch import save_file

    final = output / f"{CHECKPOINT_PREFIX}{epoch}"
    partial = output / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt", "epoch": str(epoch)})
    tensors, rest = optimizer_parts(optimizer.state_dict())
    save_file(tensors, partial / "optimizer.safetensors", metadata={"epoch": str(epoch)})
    (partial / "state.json").write_text(json.dumps(state | {"optimizer": rest}, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    publish(final / "model.safetensors", output / "model.safetensors")
    for older, folder in finished_checkpoints(output):
        if older < epoch:
            shutil.rmtree(folder)
    return final


def describe_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(current))
    return "; ".join(f"{key}: {saved.get(key)!r} there, {current.get(key)!r} here"
                     for key in keys if saved.get(key) != current.get(key))


@dataclass
class Progress:
    """Where a run stands: finished epochs, optimisation steps taken, metric rows."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def resume(
    config: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler],
) -> Progress:
    """Load the latest checkpoint in the output folder, if any, into ``model``,
    ``optimizer`` and ``scaler``; refuse one written with another configuration."""
    from safetensors.torch import load_file

    checkpoints = finished_checkpoints(Path(config.output))
    if not checkpoints:
        return Progress()
    folder = checkpoints[-1][1]
    state = json.loads((folder / "state.json").read_text())
    differences = describe_differences(state["config"], config.identity())
    if differences:
        raise ValueError(f"{config.output} holds a checkpoint of another configuration ({differences}); "
                         "give another output folder, or the same settings to resume")
    model.load_state_dict(load_file(folder / "model.safetensors"))
    tensors = load_file(folder / "optimizer.safetensors")
    optimizer.load_state_dict(optimizer_from_parts(tensors, state["optimizer"], optimizer.state_dict()))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return Progress(state["epoch"], state["step"], state["history"])


# --- metrics files ------------------------------------------------------------------


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.csv`` with a row per finished epoch, replaced atomically."""
    temporary = output / ".metrics.csv.partial"
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(temporary, output / "metrics.csv")


def keep_steps(output: Path, last_step: int) -> None:
    """Cut ``steps.csv`` back to the steps of finished epochs (an interrupted epoch's
    rows are written again when it is trained again)."""
    path = output / "steps.csv"
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= last_step]
    write_steps(path, rows, mode="w")


def write_steps(path: Path, rows: list[dict[str, Any]], mode: str = "a") -> None:
    new = mode == "w" or not path.is_file()
    with path.open(mode if not new else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STEP_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def draw_metrics(history: list[dict[str, Any]], title: str):
    """A matplotlib ``Figure``: training loss, and training and validation top-1, per
    epoch. Built without pyplot, so it needs no display."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    loss_ax.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_ax.set_ylabel("training loss")
    accuracy_ax.plot(epochs, [row["train_top1"] for row in history], marker="o", label="train (with r)")
    accuracy_ax.plot(epochs, [row["val_top1"] for row in history], marker="s", label="val (with eval r)")
    accuracy_ax.set_ylabel("top-1 accuracy (%)")
    accuracy_ax.legend(fontsize=8)
    for ax in (loss_ax, accuracy_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    return figure


# --- the run ------------------------------------------------------------------------


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


def train_epoch(run: Run, epoch: int, progress: Progress) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Train one epoch; returns its figures over all processes and a row per step."""
    config, device = run.config, run.device
    dtype = AMP_DTYPES[config.amp]
    run.train_loader.sampler.set_epoch(epoch)
    tokenmerge.apply(run.network, r=config.r, prop_attn=config.prop_attn)
    loss_sum = correct = images = 0.0
    steps = []
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               disable=not (config.progress and rank() == 0))
    start = time.perf_counter()
    for batch, labels in islice(run.train_loader, run.steps_per_epoch):
        batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        lr = run.optimizer.param_groups[0]["lr"]
        loss, hits = train_step(run.model, run.optimizer, batch, labels, autocast_dtype=dtype, scaler=run.scaler)
        progress.step += 1
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=progress.step)
        loss_total, hits, count = global_sums([loss * len(labels), hits, len(labels)], device)
        loss_sum, correct, images = loss_sum + loss_total, correct + hits, images + count
        steps.append({"epoch": epoch + 1, "step": progress.step, "loss": loss_total / count, "lr": lr})
        bar.update()
        bar.set_postfix(loss=f"{loss_total / count:.4f}")
    seconds = time.perf_counter() - start
    bar.close()
    return {"train_loss": loss_sum / images, "train_top1": 100 * correct / images,
            "images_per_second": images / seconds, "lr": steps[-1]["lr"]}, steps


def validate(run: Run) -> float:
    """Top-1 on the validation images with the evaluation schedule."""
    tokenmerge.apply(run.network, r=run.config.eval_r, prop_attn=run.config.prop_attn)
    return evaluate_accuracy(run.model, run.val_loader, run.device, autocast_dtype=AMP_DTYPES[run.config.amp])


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
    title = (f"{config.model}: r={schedules.describe(config.r)} training, "
             f"r={schedules.describe(config.eval_r)} validation")
    draw_metrics(progress.history, title).savefig(output / "metrics.png", dpi=120)


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
    check_schedule(model, config.r, "r", config.model)
    check_schedule(model, config.eval_r, "eval r", config.model)
    tokenmerge.apply(model, r=config.r, prop_attn=config.prop_attn)
    model.to(device)
    optimizer = create_optimizer_v2(model, config.opt, lr=config.lr, weight_decay=config.weight_decay)
    workers = config.workers if config.workers is not None else CUDA_WORKERS if device.type == "cuda" else 0
    train_transform, eval_transform = data_transforms(model, config.augment)
    loader = train_loader(ImageFiles(splits.train, train_transform), config, config.batch_size // world_size(),
                          workers, device.type == "cuda")
    steps = min(len(loader), config.max_steps_per_epoch or len(loader))
    scheduler, _ = create_scheduler_v2(optimizer, config.sched, num_epochs=config.epochs,
                                       warmup_epochs=config.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=steps)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "float16" else None
    parallel = model
    if world_size() > 1:
        parallel = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    val_loader = shard_loader(ImageFiles(splits.val, eval_transform), config.batch_size, workers)
    return Run(config, device, parallel, optimizer, scheduler, scaler, loader, val_loader, steps)


def announce(config: TrainConfig, splits: Splits, progress: Progress) -> None:
    from .report import describe_environment, environment

    weights = config.checkpoint or "random weights"
    processes = ""
    if world_size() > 1:
        processes = f" ({config.batch_size // world_size()} per process x {world_size()} processes)"
    print(f"{config.model} ({weights}) on {len(splits.train)} training and {len(splits.val)} validation images of "
          f"{len(splits.classes)} classes in {config.data}; batch {config.batch_size}{processes}, "
          f"r={schedules.describe(config.r)} training, r={schedules.describe(config.eval_r)} validation, "
          f"amp {config.amp}; {describe_environment(environment(config.device))}", flush=True)
    if progress.epoch:
        print(f"resuming after epoch {progress.epoch} from {config.output}/{CHECKPOINT_PREFIX}{progress.epoch}",
              flush=True)


def prepare_output(config: TrainConfig, splits: Splits, progress: Progress) -> None:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "classes.txt").write_text("\n".join(splits.classes) + "\n")
    if progress.epoch:
        keep_steps(output, progress.step)
    else:
        (output / "steps.csv").unlink(missing_ok=True)


def train(config: TrainConfig) -> list[dict[str, Any]]:
    """Fine-tune as ``config`` says, on one process or in the ``torchrun`` group the
    environment describes, resuming after the last finished epoch of a checkpoint in
    the output folder; returns a row of metrics per epoch (earlier runs' included)."""
    check_config(config)
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file, not a folder")
    splits = read_splits(config.data, config.val_split)
    with process_group(config.device) as device:
        run = build_run(config, splits, device)
        progress = resume(config, run.network, run.optimizer, run.scaler)
        if rank() == 0:
            prepare_output(config, splits, progress)
            announce(config, splits, progress)
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=progress.step)
        for epoch in range(progress.epoch, config.epochs):
            start = time.perf_counter()
            seed_epoch(config.seed, epoch)
            figures, steps = train_epoch(run, epoch, progress)
            row = {"epoch": epoch + 1, **figures, "val_top1": validate(run),
                   "epoch_seconds": time.perf_counter() - start}
            row = {key: row[key] for key, _, _ in METRIC_COLUMNS}
            progress.history.append(row)
            finish_epoch(run, epoch, progress, steps)
            if rank() == 0:
                print(describe_epoch(row, config), flush=True)
        tokenmerge.remove(run.network)
    return progress.history


# --- command ------------------------------------------------------------------------


def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """``["depth=6", "patch_size=8"]`` as ``{"depth": 6, "patch_size": 8}`` (values as Python literals, else text)."""
    kwargs = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise ValueError(f"--model-kwargs takes KEY=VALUE items, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def add_parser(subparsers) -> None:
    from .cli import parse_schedule

    defaults = TrainConfig(model="", data="", output="")
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a timm model with token merging on an image folder, on one process or under torchrun",
        description="Fine-tune a timm model on DATA/train/<class>/<image> with token merging, validating on "
        "DATA/val/<class>/<image> (or --val-split) after every epoch. A checkpoint is written after every epoch; "
        "running the same command again resumes after the last finished one. Under torchrun --nproc_per_node=N "
        "the global batch is shared by N processes (DistributedDataParallel).",
    )
    parser.add_argument("--model", required=True, help="timm model name")
    parser.add_argument("--checkpoint", help="local pretrained weights file for the model (safetensors or torch), "
                        "loaded through timm's pretrained config; the classifier is re-created "
                        "(default: random weights)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more arguments for timm.create_model, e.g. depth=6")
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with train/ and val/ class folders")
    parser.add_argument("--val-split", default=defaults.val_split, metavar="NAME",
                        help="the validation folder in DIR, e.g. test (default: val)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for checkpoints, metrics.csv, metrics.png and steps.csv; "
                        "resumed if it holds a checkpoint")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"(default: {defaults.epochs})")
    parser.add_argument("--max-steps-per-epoch", type=int, metavar="N", help="end every epoch after N steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"global batch over all processes (default: {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default: {defaults.lr:g})")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help=f"(default: {defaults.weight_decay:g})")
    parser.add_argument("--opt", default=defaults.opt, help=f"timm optimizer name (default: {defaults.opt})")
    parser.add_argument("--sched", default=defaults.sched, help=f"timm scheduler name (default: {defaults.sched})")
    parser.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs,
                        help=f"(default: {defaults.warmup_epochs})")
    parser.add_argument("--merge-r", "--r", dest="r", type=parse_schedule, default=defaults.r,
                        help="r schedule while training: an int, 'decreasing:R', 'linear:R:SLOPE' or one int per block "
                        "'8/8/4/...' (default: 0); under torchrun write --merge-r, since torchrun reads --r as an "
                        "abbreviation of its own options")
    parser.add_argument("--eval-r", type=parse_schedule, help="r schedule for validation (default: the training r)")
    parser.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=defaults.prop_attn,
                        help="proportional attention while training and validating (default: on)")
    parser.add_argument("--drop-path", type=float, default=defaults.drop_path,
                        help=f"drop path rate (default: {defaults.drop_path:g})")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default=defaults.amp,
                        help="mixed precision: bfloat16 (CPU or GPU) or float16 (GPU, with loss scaling) "
                        "(default: none)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"(default: {defaults.seed})")
    parser.add_argument("--workers", type=int, help=f"data loading processes per process (default: 0 on CPU, "
                        f"{CUDA_WORKERS} on CUDA)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (default: cpu)")
    parser.add_argument("--img-size", type=int, help="build the model for this input size (images are resized to it)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment,
                        help="timm's training augmentation; --no-augment trains on the evaluation transform "
                        "(default: on)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    parser.set_defaults(run=run_command)


def run_command(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {f.name for f in fields(TrainConfig)} - {"progress"}
    values = {name: value for name, value in vars(args).items() if name in names}
    history = train(TrainConfig(**values | {"model_kwargs": parse_model_kwargs(args.model_kwargs)}))
    if os.environ.get("RANK", "0") == "0" and history:  # the process group is left by now
        from .report import format_table

        print(format_table(history, METRIC_COLUMNS))
        print(f"wrote {Path(args.output) / 'model.safetensors'}, metrics.csv, metrics.png and steps.csv")
