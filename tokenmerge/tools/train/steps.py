"""One optimisation step, and top-1 accuracy on a loader: what a run does with a batch."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..accuracy import correct_predictions
from ..distributed import combine
from ..options import autocast


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``DistributedDataParallel``, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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
    return loss.item(), correct_predictions(logits, labels)[0]


def count_correct(
    model: torch.nn.Module,
    loader: Iterable,
    device: str | torch.device,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
) -> tuple[int, int]:
    """Correct top-1 predictions of ``model`` (in eval mode, without gradients) on the
    ``(images, labels, ...)`` batches of ``loader``, and the images counted; in a
    process group the counts of all processes are summed, so each loader should hold
    its share of the images."""
    device = torch.device(device)
    model = unwrap_parallel(model).eval()
    correct = total = 0
    with torch.inference_mode(), autocast(device, autocast_dtype):
        for images, labels, *_ in loader:
            correct += correct_predictions(model(images.to(device)), labels.to(device))[0]
            total += len(labels)
    correct, total = combine([correct, total], device)
    return int(correct), int(total)


def evaluate_accuracy(
    model: torch.nn.Module,
    loader: Iterable,
    device: str | torch.device,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
) -> float:
    """Top-1 accuracy in percent of ``model`` on the batches of ``loader``, counted as
    :func:`count_correct` counts; no image at all is an error."""
    correct, total = count_correct(model, loader, device, autocast_dtype=autocast_dtype)
    if total == 0:
        raise ValueError("there are no images to evaluate")
    return 100 * correct / total
