"""The images a run trains and validates on, and the loaders that feed them, with an
augmentation drawn for every image from the seed, the epoch and the image alone.
A file that cannot be decoded is set apart in its batch (see
:func:`tokenmerge.tools.data.collate_readable`) rather than ending the run."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data import TolerantImageFiles, check_folder, class_folders, collate_readable, labelled_samples
from ..distributed import rank, world_size
from ..models import timm_transform
from .config import TrainConfig


@dataclass
class Splits:
    """The labelled training and validation images, and the class names by index."""

    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    classes: list[str]


def read_splits(root: str | Path, val_split: str = "val") -> Splits:
    """The ``train/`` and ``<val_split>/`` class folders of ``root``, labelled by the
    sorted class names of ``train/``; a validation class that training lacks is an error."""
    root = check_folder(root, "data folder", f"train/ and {val_split}/")
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


class SeededImages(TolerantImageFiles):
    """:class:`TolerantImageFiles` whose random transform draws, for image ``index`` in epoch
    ``epoch`` (set with :meth:`set_epoch`), from random states seeded by the seed, the
    epoch and the index alone, leaving the process's own random states untouched. An
    image is then augmented alike whichever process loads it (no workers or any
    number), and the model's random draws (dropout, drop path) do not depend on it."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Optional[Callable], seed: int):
        super().__init__(samples, transform)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Any:
        value = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63
        saved = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(value)
                torch.manual_seed(value)
                return super().__getitem__(index)
        finally:
            random.setstate(saved)


def train_loader(dataset: SeededImages, config: TrainConfig, batch: int, workers: int, pin: bool) -> DataLoader:
    """This process's batches of ``batch`` images, reshuffled every epoch (call
    ``loader.sampler.set_epoch`` and ``loader.dataset.set_epoch``), as
    :class:`tokenmerge.tools.data.Batch` (the readable images, their labels, the
    unreadable files); incomplete batches are dropped, so every step averages the same
    number of images on every process (less any unreadable ones)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=config.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True, pin_memory=pin,
                      collate_fn=collate_readable)
