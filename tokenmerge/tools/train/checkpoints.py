"""Checkpoints: written after every epoch, whole or not at all, with checksums;
read back to resume exactly where a run stopped."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokenmerge.reading import read_text

from ..files import write_atomically
from ..messages import error_summary
from .config import TrainConfig

CHECKPOINT_PREFIX = "epoch-"
WEIGHT_FILES = ("model.safetensors", "optimizer.safetensors")


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
    """Make ``target`` the file ``source`` atomically (see
    :func:`tokenmerge.tools.files.write_atomically`): a hard link where possible, a
    copy otherwise."""
    write_atomically(target, lambda file: link_or_copy(source, file))


def link_or_copy(source: Path, file: Path) -> None:
    """``file``, new, as a hard link to ``source``, or a copy where links cannot be made."""
    try:
        os.link(source, file)
    except OSError:
        shutil.copyfile(source, file)


def save_checkpoint(
    output: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write ``OUTPUT/epoch-<epoch>/`` whole or not at all (its ``state.json`` holding
    the SHA-256 of its weight files), point
    ``OUTPUT/model.safetensors`` to its weights and delete older checkpoints."""
    final = output / f"{CHECKPOINT_PREFIX}{epoch}"
    partial = output / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt", "epoch": str(epoch)})
    tensors, rest = optimizer_parts(optimizer.state_dict())
    save_file(tensors, partial / "optimizer.safetensors", metadata={"epoch": str(epoch)})
    checksums = {name: sha256(partial / name) for name in WEIGHT_FILES}
    (partial / "state.json").write_text(json.dumps(state | {"optimizer": rest, "sha256": checksums}, indent=1) + "\n")
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
    ``optimizer`` and ``scaler``; refuse one written with another configuration, and
    one whose files are unreadable, changed since they were written, or do not fit."""
    checkpoints = finished_checkpoints(Path(config.output))
    if not checkpoints:
        return Progress()
    folder = checkpoints[-1][1]
    state = read_state(folder / "state.json")
    differences = describe_differences(state["config"], config.identity())
    if differences:
        raise ValueError(f"{config.output} holds a checkpoint of another configuration ({differences}); "
                         "give another output folder, or the same settings to resume")
    for name in WEIGHT_FILES:
        if sha256(folder / name) != state["sha256"].get(name):
            raise ValueError(f"checkpoint file {folder / name} does not match the checksum its state.json recorded: "
                             f"it changed or was corrupted after it was written; start again in a new output folder "
                             f"(or delete {config.output})")
    try:
        model.load_state_dict(load_file(folder / "model.safetensors"))
        tensors = load_file(folder / "optimizer.safetensors")
        optimizer.load_state_dict(optimizer_from_parts(tensors, state["optimizer"], optimizer.state_dict()))
    except (RuntimeError, ValueError, KeyError, SafetensorError) as error:
        detail = error_summary(error)
        raise ValueError(f"checkpoint {folder} does not fit this run's model or optimizer ({detail}); start again "
                         "in a new output folder") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return Progress(state["epoch"], state["step"], state["history"])


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, with every key a resume reads; a one-line error
    naming the file otherwise."""
    text = read_text(path, "checkpoint state", "start again in a new output folder")
    try:
        state = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"cannot read checkpoint state {path} ({error}); it is truncated or corrupt: start again "
                         "in a new output folder") from None
    missing = [key for key in ("epoch", "step", "config", "history", "optimizer", "sha256")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"checkpoint state {path} lacks {', '.join(missing)}: it was not written by this version "
                         "of tokenmerge train, or was changed; start again in a new output folder")
    return state


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex ("" for a missing file)."""
    if not path.is_file():
        return ""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
