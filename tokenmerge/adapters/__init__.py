"""One adapter per model library. An adapter knows where its library keeps a model's
blocks, keys, protected tokens and pooling; the algorithm itself is shared.

Every adapter module defines ``ADAPTER``, an instance of
:class:`tokenmerge.adapters.base.Adapter`, the interface that says what an adapter
implements.
"""
from __future__ import annotations

import importlib

import torch

from ..libraries import LIBRARIES, install_command
from .base import Adapter


def supported_summary() -> str:
    """What every adapter supports, from the adapters themselves; a library that is not
    installed is named with the extra that installs it. Imports the installed libraries,
    so it is for error messages only."""
    parts = []
    for library in LIBRARIES.values():
        try:
            parts.append(load_adapter(library.name).supported)
        except ImportError:
            parts.append(f"{library.name} models ({install_command(library.extra)})")
    return "; ".join(parts)


def load_adapter(library: str) -> Adapter:
    """The adapter of ``library``; a clear error naming the extra to install when the
    library is missing or of a version the adapter cannot use."""
    entry = LIBRARIES[library]
    try:
        return importlib.import_module(entry.adapter).ADAPTER
    except ImportError as error:
        raise ImportError(
            f"tokenmerge's {library} support could not be loaded ({error}); "
            f"install the supported versions with: {install_command(entry.extra)}"
        ) from error


def find_adapter(model: object) -> Adapter:
    """The adapter for ``model``, chosen by the library its class (or a base) comes from."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"tokenmerge patches torch.nn.Module models, got {type(model).__name__}")
    for cls in type(model).__mro__:
        library = cls.__module__.split(".")[0]
        if library in LIBRARIES:
            return load_adapter(library)
    raise TypeError(
        f"tokenmerge does not support {type(model).__module__}.{type(model).__name__}. "
        f"Supported: {supported_summary()}"
    )
