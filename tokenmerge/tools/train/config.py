"""What a fine-tuning run depends on (:class:`TrainConfig`), and the checks made on
it before anything is loaded."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from tokenmerge import schedule as schedules
from tokenmerge.methods import METHODS

from ..options import AMP_DTYPES, check_device

#: Fields of :class:`TrainConfig` that do not change what is computed, so a run may
#: resume with others: the data order and the augmentation of every image are drawn
#: from the seed, the epoch and the image, whatever the number of loading processes.
RUN_ONLY_FIELDS = ("output", "workers", "progress", "allow_other_model")


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
    (:func:`tokenmerge.schedule.parse`), ``method`` and ``prop_attn`` those of
    :func:`tokenmerge.apply` (default: ``tome`` with proportional attention, or for a
    schedule file ``r`` the method and attention it was tuned with). A schedule file
    tuned for a model other than ``model`` is refused unless ``allow_other_model``;
    a checkpoint records a file's schedule, not its name, so a file changed since is
    another run. ``amp`` is none, bfloat16 or float16
    (float16 on CUDA only, with loss scaling); ``img_size`` (one size, or height and width) builds the model for
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
    method: Optional[str] = None
    prop_attn: Optional[bool] = None
    allow_other_model: bool = False
    drop_path: float = 0.1
    amp: str = "none"
    seed: int = 0
    workers: Optional[int] = None
    device: str = "cpu"
    img_size: Optional[int | list[int]] = None
    augment: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, str):
            self.r = schedules.parse(self.r)
        if isinstance(self.eval_r, str):
            self.eval_r = schedules.parse(self.eval_r)
        if self.eval_r is None:
            self.eval_r = self.r
        if self.method is None:
            self.method = self.r.method if isinstance(self.r, schedules.Tuned) else "tome"
        if self.prop_attn is None:
            self.prop_attn = self.r.prop_attn if isinstance(self.r, schedules.Tuned) else True

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint must agree on to be resumed, as JSON values."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUN_ONLY_FIELDS}
        values["r"], values["eval_r"] = recorded_schedule(self.r), recorded_schedule(self.eval_r)
        values["device"] = torch.device(self.device).type  # kernels differ between device types
        if isinstance(self.img_size, int):
            values["img_size"] = [self.img_size, self.img_size]
        return json.loads(json.dumps(values))


def recorded_schedule(schedule: schedules.Schedule) -> str:
    """The text of a schedule as a checkpoint records it: a file's schedule itself
    (one r per block), not its name, so that a file changed between runs is another run."""
    return schedules.describe(list(schedule) if isinstance(schedule, schedules.Tuned) else schedule)


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    positive = {"epochs": config.epochs, "batch_size": config.batch_size,
                "max_steps_per_epoch": config.max_steps_per_epoch}
    sizes = config.img_size if isinstance(config.img_size, (list, tuple)) else [config.img_size]
    positive |= {"img_size": min(sizes) if config.img_size is not None else None}
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
    trainable = [name for name, method in METHODS.items() if not method.speed_reference]
    if config.method not in trainable:
        raise ValueError(f"method must be one of {', '.join(trainable)}, got {config.method!r}")
    for schedule in (config.r, config.eval_r):
        schedules.check_model(schedule, config.model, config.allow_other_model,
                              "--allow-other-model (allow_other_model=True)")
    device = check_device(config.device)
    if config.amp == "float16" and device.type != "cuda":
        raise ValueError("amp float16 needs a CUDA device; use bfloat16 on the CPU")
