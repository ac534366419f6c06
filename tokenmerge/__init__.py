"""Token Merging (ToMe) for pretrained Vision Transformers, without retraining.

    import timm, tokenmerge
    model = timm.create_model("vit_small_patch16_224", pretrained=True).eval()
    tokenmerge.apply(model, r=13)   # merge 13 tokens in every block
    tokenmerge.remove(model)        # back to the original model, exactly

Every name here is imported on first use (from :mod:`tokenmerge.api`,
:mod:`tokenmerge.schedule` and :mod:`tokenmerge.state`): ``import tokenmerge`` alone
imports neither torch nor any model library, so that the command line answers
``--help`` and ``--version`` at once. ``tokenmerge.tools`` and ``tokenmerge.visualize``
(the module :mod:`tokenmerge.tools.visualize`, for notebooks) are named here on the
same terms: the tools are imported only when a user asks for them, and no module of
the core imports them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import schedule
    from .api import apply, compile, flops_per_image, get_state, is_applied, remove, token_counts
    from .schedule import Linear
    from .schedule import load as load_schedule
    from .state import CappedRWarning, MergeState

__all__ = [
    "apply", "remove", "is_applied", "get_state", "token_counts", "flops_per_image", "Linear", "MergeState",
    "CappedRWarning", "schedule", "load_schedule", "compile",
]
__version__ = "0.1.0"

#: Where every lazily imported name lives: (module, attribute), or (module, None) for the module itself.
_LAZY = {
    **{name: ("tokenmerge.api", name) for name in (
        "apply", "remove", "is_applied", "get_state", "token_counts", "flops_per_image", "compile")},
    "Linear": ("tokenmerge.schedule", "Linear"),
    "load_schedule": ("tokenmerge.schedule", "load"),
    "MergeState": ("tokenmerge.state", "MergeState"),
    "CappedRWarning": ("tokenmerge.state", "CappedRWarning"),
    "schedule": ("tokenmerge.schedule", None),
    "visualize": ("tokenmerge.tools.visualize", None),
    "tools": ("tokenmerge.tools", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
