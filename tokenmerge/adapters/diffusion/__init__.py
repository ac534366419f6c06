"""Diffusion denoisers of diffusers, one module per family (see
:mod:`tokenmerge.adapters.diffusion.base` for the block template and what is shared).

A family module defines ``FAMILY``, a :class:`~tokenmerge.adapters.diffusion.base.Family`.
A pipeline is patched through its denoiser (``pipe.unet`` or ``pipe.transformer``).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional

from torch import nn

from .base import Family

#: The modules every family shares.
SHARED_MODULES = ("base",)
#: The family modules: every module of this package but those.
FAMILY_MODULES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in SHARED_MODULES))
#: Where a diffusers pipeline keeps its denoiser.
DENOISER_ATTRIBUTES = ("unet", "transformer")


def families() -> list[Family]:
    return [importlib.import_module(f"{__name__}.{name}").FAMILY for name in FAMILY_MODULES]


def is_diffusers(model: Any) -> bool:
    """Whether ``model``'s class (or a base) comes from diffusers."""
    return any(cls.__module__.split(".")[0] == "diffusers" for cls in type(model).__mro__)


def denoiser_of(model: Any) -> Any:
    """The denoiser of a diffusers pipeline (or of any object holding one as ``unet`` or
    ``transformer``); anything else as it is."""
    if isinstance(model, nn.Module):
        return model
    check_one_denoiser(model)
    for name in DENOISER_ATTRIBUTES:
        denoiser = getattr(model, name, None)
        if isinstance(denoiser, nn.Module):
            return denoiser
    return model


#: Where a pipeline keeps a second denoiser (Wan 2.2 A14B's low-noise expert), which
#: patching the pipeline would leave unmerged for the steps it runs.
SECOND_DENOISERS = ("transformer_2", "unet_2")


def check_one_denoiser(pipeline: Any) -> None:
    """Refuse a pipeline with a second denoiser: patched through ``pipe.transformer``
    alone, it would merge in only some of the steps, silently."""
    for name in SECOND_DENOISERS:
        if isinstance(getattr(pipeline, name, None), nn.Module):
            first = name.rsplit("_", 1)[0]  # transformer_2 beside transformer, unet_2 beside unet
            raise TypeError(f"tokenmerge: this {type(pipeline).__name__} has two denoisers (pipe.{first} and "
                            f"pipe.{name}), which run different steps; apply tokenmerge to each of them")


def find_family(denoiser: Any) -> Optional[Family]:
    """The family of ``denoiser``, or None for a model that is no diffusers model; a
    one-line TypeError naming the class for a diffusers model of no supported family."""
    if not is_diffusers(denoiser):
        return None
    name = _original_name(denoiser)
    for family in families():
        if name in family.classes:
            return family
    supported = ", ".join(f"{family.name} ({', '.join(family.classes)})" for family in families())
    raise TypeError(f"tokenmerge does not merge tokens in diffusers' {name}; supported denoisers: {supported}")


def _original_name(model: Any) -> str:
    from ..base import is_swapped, original_class

    if isinstance(model, nn.Module) and is_swapped(model):
        return original_class(model).__name__
    return type(model).__name__
