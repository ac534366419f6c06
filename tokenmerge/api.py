"""The functions of ``tokenmerge``'s namespace: apply merging to a model, read its
state, count its tokens and FLOPs, compile it, and remove merging again."""
from __future__ import annotations

from typing import Any, Optional, TypeVar, cast

import torch

from . import schedule
from .adapters import find_adapter
from .adapters.base import Adapter, already_patched, model_class
from .adapters.diffusion import denoiser_of
from .adapters.diffusion import find_family as find_diffusion_family
from .adapters.diffusion.base import DiffusionState
from .adapters.vlm import Family, find_family
from .adapters.vlm.base import VisionLanguageState
from .fixed_count import check_count
from .schedule import Schedule, Tuned
from .state import MergeState

ModelT = TypeVar("ModelT")



def apply(
    model: ModelT,
    r: Optional[Schedule] = None,
    *,
    prop_attn: Optional[bool] = None,
    trace_source: Optional[bool] = None,
    method: Optional[str] = None,
    dense: Optional[bool] = None,
    visual_tokens: Optional[int | float] = None,
    processor: Any = None,
    ratio: Optional[float] = None,
    max_downsample: Optional[int] = None,
    sx: Optional[int] = None,
    sy: Optional[int] = None,
    use_rand: Optional[bool] = None,
    merge_attn: Optional[bool] = None,
    merge_crossattn: Optional[bool] = None,
    merge_mlp: Optional[bool] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> ModelT:
    """Patch ``model`` in place to merge tokens, and return it.

    It works in training too (keep ``prop_attn=True`` there, to train with the
    attention the model is evaluated with; see :mod:`tokenmerge.tools.train`).
    Applying to a patched model changes only what it is given, like assigning to
    :func:`get_state`'s attributes: ``apply(model, r=8)`` keeps the method, attention
    and source tracing set before.

    Args:
        model: a supported model, or a ``torch.compile`` wrapper, ``DataParallel`` or
            ``DistributedDataParallel`` around one (the model inside is patched), or a
            diffusers pipeline (its ``unet`` or ``transformer`` is patched, the pipeline
            returned).
        r: the number of tokens each block merges: an int, one int per block, a
            :class:`tokenmerge.Linear` schedule, or a schedule ``tokenmerge tune`` wrote,
            read by :func:`load_schedule` (with the method and attention it was tuned
            with, unless given).
        prop_attn: proportional attention, keys weighted by the number of patches they
            stand for (default: on). For a vision-language model, the language model's
            attention to every visual token weighted by the number of the unpatched
            model's visual tokens it stands for (default: off, as long as it is not
            measured on real weights; ``eager`` and ``sdpa`` attention).
        trace_source: record which input patches each output token covers (see
            :func:`get_state`; default: off).
        method: what blocks do to reduce tokens: ``"tome"`` merges (the default); the
            ablations ``"tome-random-split"``, ``"tome-unweighted"`` and
            ``"tome-features"`` and the pruning methods ``"random"``, ``"evit"`` and
            ``"evit-fuse"`` remove the same number of tokens for comparisons (see
            :mod:`tokenmerge.methods`); ``"cut"`` drops the last r tokens unseen, as a
            zero-overhead speed reference.
        dense: return one token per input token from the model's features (timm's
            ``forward_features``, transformers' ``last_hidden_state``): every patch
            takes the features of the token it ended in, for dense tasks
            (segmentation, depth, patch retrieval); default: off. Pooled outputs are
            the same either way, up to rounding.
        visual_tokens: for a vision-language model, the visual tokens every image
            (crop, video) hands to the language model: a whole number, or a fraction
            of the full count (see :mod:`tokenmerge.adapters.vlm`); reduced after the
            projector with ``method``. ``r`` given too merges in the vision tower first.
        processor: the vision-language model's processor, patched to emit as many
            image placeholders as the model then gives tokens; without it, prompts
            must be built for the reduced counts by hand.
        ratio: for a diffusion model of diffusers (a pipeline, patched through its
            denoiser, or the denoiser itself), the share of a block's tokens merged away.
            This and the seven options after it are ToMe for Stable Diffusion's, under
            tomesd's names, meanings and defaults (see
            :class:`tokenmerge.adapters.diffusion.base.Settings`).
        max_downsample: the most downsampled UNet level that merges (default: the
            first level that has attention: 1 for SD 1.x and 2.x, 2 for SDXL).
        sx: the width of the cell that holds one destination, in tokens.
        sy: the height of that cell.
        use_rand: draw the destination of every cell at random.
        merge_attn: merge before self-attention.
        merge_crossattn: merge before cross-attention.
        merge_mlp: merge before the MLP.
        seed: seeds the random destinations of ``use_rand`` (default: torch's global
            generator).
        generator: a ``torch.Generator`` for them instead of ``seed``.

    Returns:
        ``model`` itself, patched.

    Raises:
        TypeError: the model, or a part of it, is not one tokenmerge reproduces exactly
            (the message names the class or feature).
        ValueError: a bad ``r`` or ``method``, before anything changes.
    """
    options = dict(ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand, merge_attn=merge_attn,
                   merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, seed=seed, generator=generator)
    diffusion = {name: value for name, value in options.items() if value is not None}
    denoiser = unwrap(denoiser_of(model))
    diffusion_family = find_diffusion_family(denoiser)
    if diffusion_family is not None:
        given = [name for name, value in (("r", r), ("prop_attn", prop_attn), ("trace_source", trace_source),
                                          ("method", method), ("dense", dense), ("visual_tokens", visual_tokens),
                                          ("processor", processor)) if value is not None]
        if given:
            raise TypeError(f"{', '.join(given)} are not options of diffusion models ({diffusion_family.name}); "
                            f"give ratio and tomesd's options: {', '.join(options)}")
        apply_diffusion(diffusion_family, denoiser, diffusion)
        return model
    if diffusion:
        raise TypeError(f"{', '.join(diffusion)} are options of diffusion models of diffusers; "
                        f"{type(denoiser).__name__} is none")
    inner = cast(torch.nn.Module, denoiser)
    family = find_family(inner)
    if family is not None:
        if trace_source or dense:
            raise TypeError(f"trace_source and dense are for vision transformers; {family.name} models give the "
                            "language model visual tokens, whose sizes get_state(model).sizes reports")
        apply_vision_language(family, inner, r, visual_tokens, processor, method, bool(prop_attn))
        return model
    if visual_tokens is not None or processor is not None:
        raise TypeError(f"visual_tokens and processor are for vision-language models; {type(inner).__name__} is "
                        "none: give r alone")
    if r is None:
        raise TypeError(f"tokenmerge.apply needs r for {type(inner).__name__}: the tokens each block merges")
    if isinstance(r, Tuned):
        method = r.method if method is None else method
        prop_attn = r.prop_attn if prop_attn is None else prop_attn
    adapter = find_adapter(inner)
    if is_applied(inner):
        _state_of(inner).update(r, method=method, prop_attn=prop_attn, trace_source=trace_source, dense=dense)
        return model
    patched = already_patched(inner)
    if patched is not None:
        raise TypeError(
            f"tokenmerge is already applied to part of this {type(inner).__name__} ({patched}); remove it there first"
        )
    adapter.check(inner)
    state = MergeState(adapter.depth(inner), r, num_protected=adapter.num_protected(inner))
    # settings not given keep MergeState's defaults; a bad one patches nothing
    state.update(method=method, prop_attn=prop_attn, trace_source=trace_source, dense=dense)
    adapter.patch(inner, state)
    return model


def apply_diffusion(family: Any, denoiser: torch.nn.Module, options: dict[str, Any]) -> None:
    """:func:`apply` for a diffusion denoiser, every setting checked before anything changes."""
    from .adapters.diffusion import base as diffusion

    if is_applied(denoiser):
        raise TypeError(f"tokenmerge is already applied to this {model_class(denoiser).__name__}; call "
                        "tokenmerge.remove first")
    diffusion.patch(family, denoiser, diffusion.Settings(**options))


def apply_vision_language(
    family: Family, model: torch.nn.Module, r: Optional[Schedule], visual_tokens: Optional[int | float],
    processor: Any, method: Optional[str], prop_attn: bool = False,
) -> None:
    """:func:`apply` for a vision-language model, every setting checked before anything changes."""
    from .adapters.vlm import base as vlm
    from .adapters.vlm.key_bias import attention_layers, check_implementation
    from .methods import resolve

    if is_applied(model):
        raise TypeError(f"tokenmerge is already applied to this {type(model).__name__}; call tokenmerge.remove first")
    if r is None and visual_tokens is None:
        raise TypeError(f"tokenmerge.apply needs visual_tokens=K (tokens per image for the language model) or r "
                        f"(merging in the vision tower) for {family.name} models")
    method = method or "tome"
    if resolve(method).needs_class_token:
        raise ValueError(f"method {method!r} plans with a class token's attention, which the visual tokens of "
                         f"{family.name} carry none of; use tome, tome-features, random or cut")
    if visual_tokens is not None:
        check_count(visual_tokens)
    if processor is not None:
        vlm.check_processor(family, processor)
    if prop_attn:
        language_model = family.language_model(vlm.inner_model(family, model))
        attention_layers(language_model)
        check_implementation(language_model.config)
    if r is not None:
        inner = vlm.inner_model(family, model)
        family.feature_layers(inner)  # a family whose tower cannot merge says so first
        checked_adapter(family.tower(inner))
        vlm.tower_schedule(family, inner, r)
    vlm.patch(family, model, vlm.Settings(visual_tokens, method, r, prop_attn), processor)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``torch.compile`` wrapper, ``DataParallel`` or
    ``DistributedDataParallel`` (any nesting of them); other models as they are."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        else:
            return model


def compile(
    model: torch.nn.Module, *, mode: Optional[str] = None, dynamic: Optional[bool] = None, **kwargs: Any
) -> torch.nn.Module:
    """``torch.compile(model, fullgraph=True)``, with CUDA graphs on a GPU: the fastest
    way to run a patched model (or an unpatched one, for comparison).

    Patch first, then compile; compile after moving the model to its device, which
    chooses the mode. On CUDA the default mode is ``"reduce-overhead"``: CUDA graphs
    replay a pass's kernels without launching them one by one, which is what the many
    small kernels of a merge step cost at small batches; each new input shape is
    recorded once (keep shapes fixed, or pad batches to a few sizes). CUDA graphs
    reuse their memory: an output, or what :func:`get_state` holds of a pass, may be
    overwritten by the next pass, so clone what must outlive it. On the CPU the
    default mode is torch's own. ``fullgraph=True`` makes a graph break an error
    instead of a silent slowdown.

    :func:`apply`, :func:`get_state` and :func:`remove` see through the compiled
    wrapper. A new r recompiles once. Every r, dtype and input shape is one more graph
    of the model's forward, counted together for all compiled copies of its class:
    past ``torch._dynamo.config.recompile_limit`` (8) graphs, ``fullgraph=True``
    raises; raise the limit to compile more.

    Args:
        model: the model to compile, patched or not.
        mode: ``torch.compile``'s mode (default: ``"reduce-overhead"`` when the model's
            parameters are on a CUDA device and the backend is inductor, else torch's
            default).
        dynamic: ``torch.compile``'s ``dynamic`` (default: torch's, which compiles
            for the first shape and makes the batch dynamic after a second one).
        **kwargs: more ``torch.compile`` arguments, such as ``backend``, ``options``
            or ``fullgraph=False``.

    Returns:
        What ``torch.compile`` returns: a wrapper module that compiles on its first call.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"tokenmerge.compile takes a torch.nn.Module, not {type(model).__name__}")
    if mode is None and kwargs.get("options") is None and kwargs.get("backend") in (None, "inductor"):
        mode = _default_compile_mode(model)
    kwargs.setdefault("fullgraph", True)
    return cast(torch.nn.Module, torch.compile(model, mode=mode, dynamic=dynamic, **kwargs))


def _default_compile_mode(model: torch.nn.Module) -> Optional[str]:
    """The mode :func:`compile` gives inductor: ``"reduce-overhead"`` (CUDA graphs) for a
    model whose first parameter (or buffer) is on a CUDA device, else ``None``."""
    first: Optional[torch.Tensor] = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return "reduce-overhead" if first is not None and first.device.type == "cuda" else None


def checked_adapter(model: torch.nn.Module) -> Adapter:
    """The adapter of ``model``, which it has patched or would patch: a model it cannot
    patch raises the error :func:`apply` would raise, naming what is not supported."""
    adapter = find_adapter(model)
    if not is_applied(model):
        adapter.check(model)
    return adapter


def remove(model: ModelT) -> ModelT:
    """Undo :func:`apply`: same classes, same forward, same state dict as before.

    Calls of the model that other threads are running finish first, with merging;
    calls that start meanwhile wait and then run unpatched.

    Args:
        model: a patched model, or a wrapper around one, or a diffusion pipeline
            whose denoiser is patched.

    Returns:
        ``model`` itself, unpatched.

    Raises:
        ValueError: nothing is applied to ``model``.
        RuntimeError: called from inside a call of the model (a hook, say), whose
            blocks would lose their state mid-pass; or other threads' calls did not
            finish within a minute.
    """
    inner = unwrap(denoiser_of(model))
    if not is_applied(inner):
        raise ValueError(f"{type(inner).__name__} has no token merging applied; nothing to remove")
    if isinstance(inner._tokenmerge_state, DiffusionState):
        from .adapters.diffusion.base import unpatch as unpatch_diffusion

        unpatch_diffusion(inner)
        return model
    family = find_family(inner)
    if family is not None:
        from .adapters.vlm.base import unpatch

        unpatch(family, inner)
        return model
    passes = _state_of(inner).passes
    if passes.in_call():
        raise RuntimeError(
            f"tokenmerge.remove was called during a forward pass of this {model_class(inner).__name__} (from a hook, "
            "say), which would leave the pass half patched; remove it after the call returns"
        )
    with passes.closing():
        find_adapter(inner).unpatch(inner)
    return model


def is_applied(model: Any) -> bool:
    """Whether :func:`apply` has patched ``model`` (or the model a wrapper holds, or a
    diffusion pipeline's denoiser)."""
    state = getattr(unwrap(denoiser_of(model)), "_tokenmerge_state", None)
    return isinstance(state, (MergeState, VisionLanguageState, DiffusionState))


def get_state(model: Any) -> MergeState | VisionLanguageState | DiffusionState:
    """The settings of a patched model and what the calling thread's last pass computed.

    Args:
        model: a patched model, or a wrapper around one.

    Returns:
        Its :class:`MergeState`: assign ``r``, ``method``, ``prop_attn`` or
        ``trace_source`` to change a setting from the next pass; read ``size``,
        ``source``, ``sizes`` and ``sources`` for the calling thread's last pass. For
        a vision-language model, its
        :class:`~tokenmerge.adapters.vlm.base.VisionLanguageState`: ``counts`` and
        ``sizes`` of every image of the last pass. For a diffusion model (or pipeline),
        its :class:`~tokenmerge.adapters.diffusion.base.DiffusionState`: ``settings``.

    Raises:
        ValueError: nothing is applied to ``model``.
    """
    model = unwrap(denoiser_of(model))
    if not is_applied(model):
        raise ValueError(f"{type(model).__name__} has no token merging applied; call tokenmerge.apply first")
    return _state_of(model)


def _state_of(model: torch.nn.Module) -> MergeState:
    """The :class:`MergeState` that :func:`apply` stored on a patched ``model``, typed as
    such (``nn.Module`` attributes read as tensors or modules)."""
    return cast(MergeState, model._tokenmerge_state)


def token_counts(
    model: torch.nn.Module, r: Optional[Schedule] = None, img_size: Optional[tuple[int, int]] = None
) -> list[int]:
    """Tokens left after every block of ``model``, protected tokens included.

    Args:
        model: a supported model, patched or not, or a wrapper around one.
        r: a schedule, as :func:`apply` takes it (default: the patched model's own).
        img_size: (height, width) of the input (default: the model's own).

    Returns:
        One count per block.

    Raises:
        TypeError: tokenmerge cannot patch ``model`` (the message names why).
    """
    model = unwrap(model)
    adapter = checked_adapter(model)
    if r is None:
        r = _state_of(model).r
    num_tokens, num_protected = adapter.token_layout(model, img_size)
    return schedule.token_counts(num_tokens, schedule.resolve(r, adapter.depth(model)), num_protected)


def flops_per_image(
    model: torch.nn.Module,
    r: Optional[Schedule] = None,
    img_size: Optional[tuple[int, int]] = None,
    method: Optional[str] = None,
) -> int:
    """FLOPs per image of ``model``, computed from its token counts.

    Args:
        model: a supported model, patched or not, or a wrapper around one.
        r: a schedule, as :func:`apply` takes it (default: the patched model's own, 0
            if unpatched).
        img_size: (height, width) of the input (default: the model's own).
        method: the reduction method (default: the patched model's own, or ``"tome"``).

    Returns:
        FLOPs per image, a multiply-add counting two, as in ``torch.utils.flop_counter``.

    Raises:
        TypeError: tokenmerge cannot patch ``model`` (the message names why).
    """
    from .flops import analytic_flops

    model = unwrap(model)
    adapter = checked_adapter(model)
    state = _state_of(model) if is_applied(model) else None
    if r is None:
        r = state.r if state else 0
    if method is None:
        method = state.method if state else "tome"
    num_tokens, num_protected = adapter.token_layout(model, img_size)
    r_per_block = schedule.resolve(r, adapter.depth(model))
    return analytic_flops(adapter.flop_shape(model, img_size), num_tokens, r_per_block, num_protected, method)
