"""Processes started by ``torchrun``: joining the group, taking a share of the
batches, and combining numbers across processes."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from .data import collate_readable


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def launched() -> bool:
    """Whether a launcher such as ``torchrun`` started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def first_process() -> bool:
    """Whether this is the process that prints and writes (rank 0), even before the
    group is joined."""
    return rank() == 0 if distributed() else int(os.environ.get("RANK", "0")) == 0


@contextmanager
def process_group(device: str | torch.device) -> Iterator[torch.device]:
    """Join the ``torch.distributed`` group a launcher such as ``torchrun`` describes
    in the environment (``WORLD_SIZE`` > 1), with gloo on CPU and NCCL on CUDA, and
    leave it afterwards; yields the device this process should use (its own GPU
    under CUDA). Without such a launcher it only yields ``device``."""
    device = torch.device(device)
    if not launched() or distributed():
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


def combine(values: Sequence[float], device: torch.device, op: str = "sum") -> list[float]:
    """``values`` combined over all processes element by element, by ``"sum"`` or
    ``"max"`` (unchanged in a single process). Whole numbers stay exact: they are
    combined as float64, exact up to 2**53."""
    if not distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_objects(items: list) -> list:
    """The ``items`` of all processes in one list (``items`` in a single process)."""
    if not distributed():
        return items
    shares: list = [None] * world_size()
    dist.all_gather_object(shares, items)
    return [item for share in shares for item in share or []]
