"""The ways a tool runs a model: unpatched, or reducing tokens with a method (and its
variant of attention) at a schedule; and the sweeps of them that commands measure.

A sweep never holds the same setting twice: two would be counted into one tally.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import tokenmerge
from tokenmerge import methods
from tokenmerge import schedule as schedules
from tokenmerge.adapters import find_adapter

from .models import unwrap

UNPATCHED = "unpatched"

#: What a variant name adds to a merging method's name to run it without proportional attention.
NO_PROP_ATTN = "-no-prop-attn"


def variants() -> dict[str, tuple[str, bool]]:
    """Every variant name a command accepts, read from the registry at each call so
    that a method registered after import is a variant too, with the method of
    :data:`tokenmerge.methods.METHODS` it runs and whether its attention is
    proportional: every registered method but the speed references under its own name,
    and every merging one also as ``NAME-no-prop-attn`` (``prop_attn=False``)."""
    named: dict[str, tuple[str, bool]] = {}
    for name, method in methods.METHODS.items():
        if not method.speed_reference:
            named[name] = (name, True)
            if method.merges:
                named[name + NO_PROP_ATTN] = (name, False)
    return named


def compared_by_default() -> list[str]:
    """The variants ``compare`` runs unless told: every registered method under its own
    name, and the paper's ablation of proportional attention, ``tome-no-prop-attn``
    (the other ``*-no-prop-attn`` variants only when named)."""
    names = [name for name, (method, prop_attn) in variants().items() if prop_attn]
    return names[:1] + ["tome" + NO_PROP_ATTN] + names[1:]


def merging(name: str) -> bool:
    """Whether variant ``name`` merges tokens (False for a name that is no variant)."""
    found = variants().get(name)
    return found is not None and methods.resolve(found[0]).merges


@dataclass(frozen=True)
class AppliedSetting:
    """One way to run a vision-language model or a diffusion pipeline: ``apply``, the
    keyword arguments of ``tokenmerge.apply`` (none: the model as it is)."""

    name: str
    apply: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    """One way to run the model: unpatched (``r=None``) or reducing tokens with
    ``method``, with or without proportional attention."""

    name: str
    r: Optional[schedules.Schedule] = None
    method: str = "tome"
    prop_attn: bool = True

    @property
    def key(self) -> tuple:
        """What the setting computes: settings with equal keys are the same setting."""
        if self.r is None:
            return (UNPATCHED,)
        return schedules.describe(self.r), self.method, self.prop_attn


def variant(name: Optional[str], prop_attn: Optional[bool] = None) -> tuple[str, bool]:
    """(method, prop_attn) of variant ``name`` (default ``tome``); ``prop_attn`` given
    overrides the variant's own, except that a ``*-no-prop-attn`` variant never has it."""
    name = name or "tome"
    known = variants()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(known)}")
    method, own = known[name]
    return method, own and (True if prop_attn is None else prop_attn)


def configure(model: torch.nn.Module, setting: Setting) -> None:
    """Put ``model`` (or the network of a :class:`tokenmerge.tools.models.ImageModel`) in ``setting``."""
    model = unwrap(model)
    if setting.r is None:
        if tokenmerge.is_applied(model):
            tokenmerge.remove(model)
    else:
        tokenmerge.apply(model, r=setting.r, method=setting.method, prop_attn=setting.prop_attn)


def setting_runner(model: torch.nn.Module, setting: Setting) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` as a function of images that first puts it in ``setting``: one model
    takes turns between settings (patching is cheap), as timed interleaved runs need."""
    def run(images: torch.Tensor) -> torch.Tensor:
        configure(model, setting)
        return model(images)
    return run


def tuned_variant(
    r: schedules.Schedule, name: Optional[str] = None, prop_attn: Optional[bool] = None
) -> tuple[str, Optional[bool]]:
    """The variant name and ``prop_attn`` to run schedule ``r`` with: those given, or
    for a schedule file those it was tuned with, or ``tome``."""
    if name is not None or not isinstance(r, schedules.Tuned):
        return name or "tome", prop_attn
    if r.method not in variants():
        raise ValueError(f"schedule file {r.path} was tuned with method {r.method!r}, which this version does not "
                         f"know ({', '.join(variants())}); give --method")
    return r.method, r.prop_attn if prop_attn is None else prop_attn


def check_schedule_files(
    network: torch.nn.Module, rs: Sequence[Optional[schedules.Schedule]], args: argparse.Namespace
) -> None:
    """Refuse a schedule file (``--r @FILE``) given to a model of another depth, or
    tuned for a model other than ``--model`` unless ``--allow-other-model`` says that
    is meant (see :func:`tokenmerge.schedule.check_model`)."""
    depth = find_adapter(network).depth(network)
    for r in rs:
        if isinstance(r, schedules.Tuned):
            schedules.resolve(r, depth)
            schedules.check_model(r, args.model, args.allow_other_model, "--allow-other-model")


def label(r: schedules.Schedule, name: str = "tome") -> str:
    """``r=R`` for merging, ``NAME r=R`` for any other method or variant."""
    return ("" if name == "tome" else f"{name} ") + f"r={schedules.describe(r)}"


def sweep_settings(
    rs: Sequence[schedules.Schedule], name: Optional[str] = None, prop_attn: Optional[bool] = None,
    with_limit: bool = False,
) -> list[Setting]:
    """The unpatched model, then method (or variant) ``name`` (default: ``tome``, or
    for a schedule file the method it was tuned with) at every r, each followed by its
    cut limit ``with_limit`` (the same token counts, tokens cut unseen: what the method
    would give if it cost nothing)."""
    settings = [Setting(UNPATCHED)]
    for r in rs:
        own, own_prop_attn = tuned_variant(r, name, prop_attn)
        method, attention = variant(own, own_prop_attn)
        settings.append(Setting(label(r, own), r, method, attention))
        if with_limit and schedules.describe(r) != "0":
            settings.append(Setting(f"cut {label(r, own)}", r, "cut", attention))
    return settings


def comparison_settings(
    names: Sequence[str], rs: Sequence[schedules.Schedule], prop_attn: Optional[bool] = None
) -> list[Setting]:
    """The unpatched model, then every method or variant at every r."""
    settings = [Setting(UNPATCHED)]
    for name in names:
        method, attention = variant(name, prop_attn)
        settings += [Setting(f"{name} r={schedules.describe(r)}", r, method, attention) for r in rs]
    return settings


def unique(settings: Sequence[Setting]) -> tuple[list[Setting], list[str]]:
    """``settings`` without repeats (the first of equal settings kept), and a note
    for every one left out."""
    kept: dict[tuple, Setting] = {}
    notes = []
    for setting in settings:
        first = kept.setdefault(setting.key, setting)
        if first is not setting:
            same = "" if first.name == setting.name else f" (the same as {first.name})"
            notes.append(f"{setting.name} is given more than once{same}; it is measured once")
    return list(kept.values()), notes


def largest_r(network: torch.nn.Module, img_size: Optional[tuple[int, int]] = None) -> int:
    """The constant r that merges about every patch token by the last block:
    (patch tokens) // (blocks), the paper's r=16 for a 197-token, 12-block ViT."""
    adapter = find_adapter(network)
    num_tokens, num_protected = adapter.token_layout(network, img_size)
    return max(1, (num_tokens - num_protected) // adapter.depth(network))


def default_sweep(
    network: torch.nn.Module, img_size: Optional[tuple[int, int]] = None, with_zero: bool = True
) -> list[int]:
    """The sweep a command measures unless told: r=0 (merging nothing, which shows
    what patching alone costs) and a half, four fifths and all of :func:`largest_r`:
    0, 8, 13, 16 for a 197-token ViT with 12 blocks, 0, 2, 3, 4 for a 50-token one."""
    top = largest_r(network, img_size)
    rs = sorted({round(top / 2), round(0.8 * top), top} | ({0} if with_zero else set()))
    return [r for r in rs if with_zero or r > 0]


def cap_notes(
    network: torch.nn.Module, settings: Sequence[Setting], img_size: Optional[tuple[int, int]] = None
) -> list[str]:
    """For every setting whose r asks a block for more than it can merge (at most half
    of its mergeable tokens), a note saying what the blocks merge instead; every r
    is validated on the way (a per-block list of the wrong length is an error)."""
    adapter = find_adapter(network)
    num_tokens, num_protected = adapter.token_layout(network, img_size)
    depth = adapter.depth(network)
    notes, seen = [], set()
    for setting in settings:
        if setting.r is None:
            continue
        note = schedules.capped_note(setting.r, schedules.resolve(setting.r, depth), num_tokens, num_protected)
        if note is not None and note not in seen:
            seen.add(note)
            notes.append(note)
    return notes


