"""What an adapter implements, and what is written once for all of them.

An adapter tells tokenmerge where one model library keeps a model's blocks, protected
tokens and pooling (:class:`Adapter`). Its block mixin fills in the branches of
:class:`tokenmerge.block.MergingBlock`; patching, unpatching and the class swap are
here, the same for every library.

Patching swaps a module's class for a subclass that puts a mixin first
(:func:`swap_class`). Those subclasses are made on demand, and they pickle as the
recipe (mixin, original class), so a patched model saved with ``torch.save`` or sent
to another process loads there as soon as tokenmerge can be imported.
"""
from __future__ import annotations

import copyreg
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Optional, cast

import torch
from torch import nn

from ..block import MergingBlock
from ..flops import FlopShape
from ..state import MergeState


class Adapter(ABC):
    """The interface of one model library's adapter.

    A new library implements the abstract methods and a :class:`MergingBlock` mixin
    for its block class; :meth:`patch` and :meth:`unpatch` need nothing more. The
    contract suite in the tests runs every adapter through the same checks.
    """

    #: One line naming the supported classes, for error messages.
    supported: ClassVar[str]

    @abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise a clear error naming the feature if the model, or a part of it, is
        not one this adapter reproduces exactly."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The blocks that merge, in the order tokens pass through them."""

    @abstractmethod
    def block_mixin(self, model: nn.Module) -> type[MergingBlock]:
        """The :class:`MergingBlock` subclass that the blocks become."""

    @abstractmethod
    def num_protected(self, model: nn.Module) -> int:
        """Leading tokens never merged: class, distillation and register tokens."""

    def mixins(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        """Other modules to patch, with their mixins: attention modules, pooling heads,
        the model class itself. Each gets the model's state as ``_tokenmerge_state``."""
        return []

    def pre_hooks(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        """Forward pre-hooks, called with the module, its positional and its keyword
        arguments, for what a module's arguments tell that its own forward keeps to
        itself (whether the caller passed a mask, say)."""
        return []

    @abstractmethod
    def input_size(self, model: nn.Module) -> tuple[int, int]:
        """The (height, width) of the images the model is configured for."""

    @abstractmethod
    def token_layout(self, model: nn.Module, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """(tokens entering the first block, protected tokens) at ``img_size``."""

    @abstractmethod
    def flop_shape(self, model: nn.Module, img_size: Optional[tuple[int, int]] = None) -> FlopShape:
        """What the FLOP count of :mod:`tokenmerge.flops` needs of the model."""

    def depth(self, model: nn.Module) -> int:
        """The number of blocks that merge."""
        return len(self.blocks(model))

    def patch(self, model: nn.Module, state: MergeState) -> None:
        """Patch ``model`` in place to merge tokens with ``state``. The blocks are
        patched last and from the last one back, so that a call another thread is
        running meanwhile meets every other part already patched (they behave as
        unpatched until a block merges) and starts merging at one block, if at all."""
        # Plain attributes go straight into the modules' __dict__, as unpatch takes them out
        # (nn.Module.__setattr__ is typed for tensors and modules).
        for module, module_mixin in self.mixins(model):
            module.__dict__["_tokenmerge_state"] = state
            swap_class(module, module_mixin)
        for module, hook in self.pre_hooks(model):
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            module.__dict__.setdefault("_tokenmerge_hooks", []).append(handle)
        for module in enclosing_modules(model, self.blocks(model)):
            handles = [module.register_forward_pre_hook(state.passes.enter_call),
                       module.register_forward_hook(state.passes.leave_call, always_call=True)]
            module.__dict__.setdefault("_tokenmerge_hooks", []).extend(handles)
        mixin = self.block_mixin(model)
        for index, block in reversed(list(enumerate(self.blocks(model)))):
            block.__dict__["_tokenmerge_state"], block.__dict__["_tokenmerge_index"] = state, index
            swap_class(block, mixin)
        model.__dict__["_tokenmerge_state"] = state

    def unpatch(self, model: nn.Module) -> None:
        """Undo :meth:`patch`: the same classes, attributes and hooks as before."""
        for module in model.modules():
            if is_swapped(module):
                restore_class(module)
            for handle in module.__dict__.pop("_tokenmerge_hooks", []):
                handle.remove()
            for name in ("_tokenmerge_state", "_tokenmerge_index"):
                module.__dict__.pop(name, None)


def enclosing_modules(model: nn.Module, blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """``model`` and every module between it and its blocks: a call of any of them runs
    blocks, and :func:`tokenmerge.remove` lets such calls in other threads finish."""
    if not blocks:
        return [model]
    first = next(name for name, module in model.named_modules() if module is blocks[0])
    parts = first.split(".")[:-1]
    return [model] + [model.get_submodule(".".join(parts[:depth])) for depth in range(1, len(parts) + 1)]


def already_patched(model: nn.Module) -> Optional[str]:
    """The name of a part of ``model`` that tokenmerge has patched ("" for the model itself), or None."""
    return next((name for name, module in model.named_modules() if is_swapped(module)), None)


# --- the class swap ---------------------------------------------------------------------


class PatchedClass(type):
    """Metaclass of the classes :func:`swap_class` makes: they pickle as the recipe
    ``patched_class(mixin, original)`` instead of by a name that exists only in the
    process that patched."""

    _tokenmerge_original: type  # the class swapped out, set by :func:`patched_class`


_PATCHED: dict[tuple[type, type], type] = {}


def patched_class(mixin: type, original: type) -> type:
    """The subclass of ``original`` that puts ``mixin`` first, made once per pair."""
    key = (mixin, original)
    if key not in _PATCHED:
        metaclass = PatchedClass if type(original) is type else _metaclass_for(type(original))
        # a mixin that must not rename what it patches (a processor saves its class name) says so
        keeps_name = getattr(mixin, "_tokenmerge_keeps_name", False)
        name = original.__name__ if keeps_name else f"TokenMerge{original.__name__}"
        _PATCHED[key] = metaclass(
            name,
            (mixin, original),
            {
                "_tokenmerge_original": original,
                "__module__": mixin.__module__,
                "__qualname__": name,
                "__prepare_scriptable__": _refuse_script,
            },
        )
    return _PATCHED[key]


def _metaclass_for(original_metaclass: type) -> type:
    """A :class:`PatchedClass` for classes whose own metaclass is not ``type``."""
    metaclass = type(f"PatchedClass{original_metaclass.__name__}", (PatchedClass, original_metaclass), {})
    copyreg.pickle(metaclass, _reduce_patched_class)
    return metaclass


def _reduce_patched_class(cls: type) -> tuple:
    mixin, original = cls.__bases__
    return patched_class, (mixin, original)


copyreg.pickle(PatchedClass, _reduce_patched_class)


def _refuse_script(self: nn.Module) -> nn.Module:
    raise TypeError(
        "torch.jit.script cannot compile a model patched by tokenmerge: its blocks find their tokens' sizes in "
        "Python. Use torch.compile, torch.export or torch.jit.trace instead"
    )


def swap_class(module: torch.nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of :func:`patched_class` (mixin, its class)."""
    module.__class__ = patched_class(mixin, type(module))


def restore_class(module: torch.nn.Module) -> None:
    """Undo :func:`swap_class`."""
    module.__class__ = original_class(module)


def original_class(module: object) -> type:
    """The class of a swapped module before :func:`swap_class` (see :func:`is_swapped`)."""
    return cast(PatchedClass, type(module))._tokenmerge_original


def model_class(module: torch.nn.Module) -> type:
    """The class ``module`` had before patching: what messages call it."""
    return original_class(module) if is_swapped(module) else type(module)


def is_swapped(module: torch.nn.Module) -> bool:
    return "_tokenmerge_original" in type(module).__dict__
