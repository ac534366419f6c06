"""Vision-language models of transformers, one module per family (see
:mod:`tokenmerge.adapters.vlm.base` for what is shared).

A family module defines ``FAMILY``, a :class:`~tokenmerge.adapters.vlm.base.Family`, or
``FAMILIES``, several families that share its code.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from torch import nn

from .base import Family

#: The modules every family shares.
SHARED_MODULES = ("base", "key_bias")
#: The family modules: every module of this package but those.
FAMILY_MODULES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in SHARED_MODULES))

#: What marks a transformers model as a vision-language model: a method that gives the
#: visual tokens, and a config naming the token they take the place of.
IMAGE_FEATURES = "get_image_features"
IMAGE_TOKEN_IDS = ("image_token_id", "image_token_index")


def families() -> list[Family]:
    found: list[Family] = []
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        found.extend(getattr(module, "FAMILIES", None) or [module.FAMILY])
    return found


def find_family(model: nn.Module) -> Optional[Family]:
    """The family of ``model`` (its inner model or the class around it), or None for
    a model that is no vision-language model of transformers; an error naming the
    class for one that is, of a family tokenmerge does not reduce."""
    module = type(model).__module__
    config = getattr(model, "config", None)
    if not module.startswith("transformers.") or not hasattr(model, IMAGE_FEATURES) or not any(
            getattr(config, name, None) is not None for name in IMAGE_TOKEN_IDS):
        return None
    name = _original_name(model)
    for family in families():
        if name in family.model_classes + family.outer_classes:
            return family
    supported = ", ".join(f"{family.name} ({', '.join(family.outer_classes)})" for family in families())
    raise TypeError(f"tokenmerge does not reduce the visual tokens of {name} yet; supported vision-language "
                    f"models: {supported}")


def _original_name(model: nn.Module) -> str:
    from ..base import is_swapped, original_class

    return (original_class(model) if is_swapped(model) else type(model)).__name__
