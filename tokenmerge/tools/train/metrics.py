"""The files a run writes for people: ``metrics.csv`` (a row per epoch),
``steps.csv`` (a row per step) and ``metrics.png``."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..files import write_csv

METRIC_COLUMNS = [
    ("epoch", "epoch", "d"),
    ("train_loss", "train loss", ".4f"),
    ("train_top1", "train top-1 %", ".2f"),
    ("val_top1", "val top-1 %", ".2f"),
    ("images_per_second", "train img/s", ".1f"),
    ("images_per_second_iqr_percent", "img/s IQR %", ".1f"),
    ("epoch_seconds", "epoch s", ".1f"),
    ("lr", "lr", ".3g"),
]
STEP_FIELDS = ["epoch", "step", "loss", "lr"]


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.csv`` with a row per finished epoch, replaced atomically."""
    write_csv(output / "metrics.csv", [key for key, _, _ in METRIC_COLUMNS], history)


def keep_steps(output: Path, last_step: int) -> None:
    """``steps.csv`` cut back to the steps of finished epochs (none for a new run),
    replaced atomically: an interrupted epoch's rows are written again when it is
    trained again."""
    path = output / "steps.csv"
    rows = []
    if last_step and path.is_file():
        with path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= last_step]
    write_csv(path, STEP_FIELDS, rows)


def write_steps(path: Path, rows: list[dict[str, Any]]) -> None:
    """Add the rows of an epoch's steps to ``steps.csv`` (begun by :func:`keep_steps`)."""
    with path.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=STEP_FIELDS).writerows(rows)


def draw_metrics(history: list[dict[str, Any]], title: str):
    """A matplotlib ``Figure`` per epoch: training loss, training and validation top-1,
    training images per second and the learning rate. Built without pyplot, so it
    needs no display."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12, 3.4), layout="constrained")
    loss_ax, accuracy_ax, speed_ax, lr_ax = figure.subplots(1, 4)
    epochs = [row["epoch"] for row in history]
    loss_ax.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_ax.set_ylabel("training loss")
    accuracy_ax.plot(epochs, [row["train_top1"] for row in history], marker="o", label="train (with r)")
    accuracy_ax.plot(epochs, [row["val_top1"] for row in history], marker="s", label="val (with eval r)")
    accuracy_ax.set_ylabel("top-1 accuracy (%)")
    accuracy_ax.legend(fontsize=8)
    speed_ax.plot(epochs, [row["images_per_second"] for row in history], marker="o")
    speed_ax.set_ylabel("training images / s")
    speed_ax.set_ylim(bottom=0)
    lr_ax.plot(epochs, [row["lr"] for row in history], marker="o")
    lr_ax.set_ylabel("learning rate (end of epoch)")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, accuracy_ax, speed_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    return figure
