"""Tensors that depend only on shapes and a device (row grids, offsets, constant rows),
made once and kept (:func:`shape_cache`), except while a graph is traced (:func:`tracing`),
when tensors made are placeholders of that graph."""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, wraps
from typing import ParamSpec, Protocol, TypeVar, cast

import torch

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing, or fake tensors are in use: then
    tensors made now are placeholders of a graph and must not be kept for later calls."""
    if torch.compiler.is_compiling():
        return True
    modes = torch._C._TorchDispatchModeKey
    return torch._C._get_dispatch_mode(modes.FAKE) is not None or torch._C._get_dispatch_mode(modes.PROXY) is not None


class ShapeCached(Protocol[P, R_co]):
    """A function wrapped by :func:`shape_cache`: called like the function, with
    ``cache_clear()`` to empty its cache."""

    cache_clear: Callable[[], None]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


def shape_cache(function: Callable[P, R]) -> ShapeCached[P, R]:
    """``lru_cache`` for tensors that depend only on shapes and a device, used only in
    eager mode with plain int sizes: while a graph is traced (or a size is symbolic) the
    tensors are made afresh, so that no placeholder outlives its trace. Calls with
    keyword arguments are not cached either."""
    cached = lru_cache(maxsize=256)(function)

    @wraps(function)
    def lookup(*args: P.args, **kwargs: P.kwargs) -> R:
        if kwargs or tracing() or not all(type(arg) in (int, torch.device) for arg in args):
            return function(*args, **kwargs)
        return cached(*args)

    wrapper = cast("ShapeCached[P, R]", lookup)
    wrapper.cache_clear = cached.cache_clear
    return wrapper
