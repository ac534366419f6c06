"""One adapter per model library. An adapter knows where its library keeps a model's
blocks, keys, protected tokens and pooling; the algorithm itself is shared.

Every adapter module provides:

* ``SUPPORTED``: a line naming the classes it supports, for error messages;
* ``check(model)``: raise a clear error if the model, or any block in it, is not
  one it understands;
* ``depth(model)``: the number of blocks that merge;
* ``patch(model, state)`` / ``unpatch(model)``: patch in place and restore exactly;
* ``input_size(model)``: the (height, width) the model is configured for;
* ``token_layout(model, img_size)``: (tokens entering the first block, protected tokens);
* ``flop_shape(model, img_size)``: a :class:`tokenmerge.flops.FlopShape`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

# Top-level package of a model's class -> the adapter module that handles it.
ADAPTERS = {
    "timm": "tokenmerge.adapters.timm",
}


def supported_summary() -> str:
    return "; ".join(importlib.import_module(name).SUPPORTED for name in ADAPTERS.values())


def find_adapter(model: object) -> ModuleType:
    """The adapter for ``model``, chosen by the library its class (or a base) comes from."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"tokenmerge patches torch.nn.Module models, got {type(model).__name__}")
    for cls in type(model).__mro__:
        library = cls.__module__.split(".")[0]
        if library in ADAPTERS:
            return importlib.import_module(ADAPTERS[library])
    raise TypeError(
        f"tokenmerge does not support {type(model).__module__}.{type(model).__name__}. "
        f"Supported: {supported_summary()}"
    )
