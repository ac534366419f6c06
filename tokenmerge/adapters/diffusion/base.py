"""What every diffusion family shares: the settings, the state a patched denoiser
carries, the merge plan of one block, the block template and patching.

The diffusion block template (:class:`DiffusionBlock`) is ToMe for Stable Diffusion's:
a block is a sequence of residual branches (self-attention, cross-attention, MLP), and
for every branch the settings name, the branch's normed input is merged before the
branch and its output unmerged (every token takes the output of the token it was merged
into) before the residual is added. The plan, which tokens merge, is made once per block
per pass from the block's input and serves every branch. This differs from the vision
transformer template of :mod:`tokenmerge.block`, which merges between the branches and
keeps the tokens merged; both use the merge functions of :mod:`tokenmerge.merge` and
:mod:`tokenmerge.kernels`.

A family (one module per family in this package) says:

* which blocks merge and where each one sits (:meth:`Family.blocks`, a :class:`Place`:
  its downsample level, for a UNet);
* what the tokens' grid is in a pass (:meth:`DiffusionBlock.tokenmerge_grid`, from the
  latent size that :meth:`Family.record_latent` reads off the denoiser's input);
* which tokens are never merged (:meth:`DiffusionBlock.tokenmerge_protected`: leading
  tokens of a joint sequence, such as text tokens, pass every branch unmerged);
* how its block's forward reads as branches: the block class's mixin builds the
  :class:`Branch` list from its own arguments and returns ``self.tokenmerge_run(x, branches)``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ... import kernels
from ...cache import shape_cache
from ...merge import GridMatching, grid_destinations
from ..base import is_swapped, restore_class, swap_class

#: The branches a block may merge, under the names of their settings (``merge_<name>``).
BRANCHES = ("attn", "crossattn", "mlp")


@dataclass(frozen=True)
class Settings:
    """ToMe for Stable Diffusion's options, under its names and with its defaults, plus
    the source of the random destinations.

    ``ratio``: the share of a block's tokens merged away (capped, as tomesd caps it, at
    the sources there are: ``1 - 1 / (sx * sy)``). ``max_downsample``: merge in blocks at
    most this many times downsampled from the latent (``None``: the family's default; for
    UNets the first level that has attention, 1 for SD 1.x/2.x, 2 for SDXL). ``sx, sy``:
    the cell of one destination. ``use_rand``: the destination drawn at random in every
    cell, per block and pass (off for odd batches, as in tomesd, so that the two halves of
    a guidance batch draw alike); else the cell's top-left token. ``merge_attn``,
    ``merge_crossattn``, ``merge_mlp``: the branches that run on merged tokens. ``seed``
    or ``generator``: where the random cells come from (default: torch's global generator).
    torch.compile traces a draw from the global generator into the graph, but not one
    from a generator object: with ``seed`` or ``generator`` and ``use_rand=True``, every
    merging block breaks the graph (``fullgraph=True`` refuses it).
    """

    ratio: float = 0.5
    max_downsample: Optional[int] = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = field(default=None, compare=False)

    def merges(self, branch: str) -> bool:
        """Whether ``branch`` (one of :data:`BRANCHES`) runs on merged tokens."""
        return bool(getattr(self, f"merge_{branch}"))

    def check(self) -> None:
        """One-line ValueError naming the first bad value; nothing else is checked here."""
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        for name in ("sx", "sy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        maximum = self.max_downsample
        if maximum is not None and (isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1):
            raise ValueError(f"max_downsample must be a positive int (1, 2, 4, 8), got {maximum!r}")
        for name in ("use_rand", *(f"merge_{branch}" for branch in BRANCHES)):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("give seed or generator, not both")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")


class DiffusionState:
    """What a patched denoiser carries: its settings, the generator of its random cells
    and the latent size of the call running (recorded by the denoiser's pre-hook).
    ``tokenmerge.get_state`` returns it; settings are changed by removing and applying
    again. The latent size is the denoiser's, as in tomesd: threads that call one
    patched denoiser at once must give it latents of one size."""

    def __init__(self, family: Family, settings: Settings):
        self.family, self.settings = family, settings
        self.generator = settings.generator
        if settings.seed is not None:
            self.generator = torch.Generator().manual_seed(settings.seed)
        self.latent: Optional[tuple[int, int, int]] = None  # (frames, height, width) of the call running

    def random_cells(self, cells_y: int, cells_x: int) -> Tensor:
        """(cells_y, cells_x) a random place in every cell, on the generator's device."""
        cell = self.settings.sx * self.settings.sy
        if self.generator is None:
            return torch.randint(cell, (cells_y, cells_x))
        return torch.randint(cell, (cells_y, cells_x), generator=self.generator, device=self.generator.device)

    def __repr__(self) -> str:
        return f"DiffusionState({self.family.name}, {self.settings})"


class Place(NamedTuple):
    """Where a block sits in its denoiser: ``downsample``, how many times smaller its
    token grid is than the latent's (rounded up per side, as strided convolutions do)."""

    downsample: int = 1


class Branch(NamedTuple):
    """One residual branch of a block: ``norm`` gives its input from the block's tokens
    as the previous branch left them (the merge averages what the branch reads);
    ``body`` runs the branch up to its residual, gates included; ``name`` is one of
    :data:`BRANCHES`."""

    name: str
    norm: Callable[[Tensor], Tensor]
    body: Callable[[Tensor], Tensor]


class Plan:
    """Which tokens one block merges in one pass, as row numbers (:class:`GridRows`), for
    every branch of it. ``protected`` leading tokens are never merged."""

    def __init__(self, matching: GridMatching, protected: int = 0):
        self.matching, self.protected = matching, protected
        self.rows = kernels.grid_rows(matching)

    def merge(self, x: Tensor) -> Tensor:
        """(B, P + N, C) to (B, P + N - r, C): protected tokens as they are, then
        ``[kept sources | destinations]``, destinations averaged with their sources."""
        head, tokens = self._split(x)
        merged = kernels.merge_mean_rows(tokens, self.rows)
        return merged if head is None else torch.cat([head, merged], dim=1)

    def unmerge(self, x: Tensor) -> Tensor:
        """The output of a branch run on merged tokens, one row per input token again."""
        head, tokens = self._split(x)
        spread = kernels.unmerge_rows(tokens, self.rows)
        return spread if head is None else torch.cat([head, spread], dim=1)

    def positions(self) -> Tensor:
        """(B, N - r) the mergeable token every merged token sits at, in the merged
        order: a kept source its own, a destination its own (where its sources joined
        it); what a merged token's rotary position is."""
        matching = self.matching
        batch = matching.kept.shape[0]
        return torch.cat([matching.sources[matching.kept], matching.destinations.expand(batch, -1)], dim=1)

    def _split(self, x: Tensor) -> tuple[Optional[Tensor], Tensor]:
        if not self.protected:
            return None, x
        return x[:, :self.protected], x[:, self.protected:]


class DiffusionBlock:
    """Mixin for a denoiser's block class: the template every family's blocks run.
    A family's mixin writes ``forward`` as its block's forward read as a list of
    :class:`Branch`, returning ``self.tokenmerge_run(hidden_states, branches)``."""

    # keep the block's class name: diffusers finds repeated blocks by name (compile_repeated_blocks)
    _tokenmerge_keeps_name: ClassVar[bool] = True
    _tokenmerge_state: DiffusionState
    _tokenmerge_place: Place

    def tokenmerge_grid(self, tokens: Tensor) -> Optional[tuple[int, int, int]]:
        """(frames, height, width) of this block's mergeable tokens in this pass, or
        ``None`` where it merges nothing. The default: the latent of the call,
        ``downsample`` times smaller per side (rounded up)."""
        latent = self._tokenmerge_state.latent
        if latent is None:
            return None
        frames, height, width = latent
        step = self._tokenmerge_place.downsample
        return frames, math.ceil(height / step), math.ceil(width / step)

    def tokenmerge_protected(self, tokens: Tensor) -> int:
        """Leading tokens of ``tokens`` never merged (text tokens of a joint sequence); 0 by default."""
        return 0

    def tokenmerge_plan(self, x: Tensor) -> Optional[Plan]:
        """The plan of this block for this pass, made from its (B, N, C) input, or
        ``None`` where nothing merges."""
        state = self._tokenmerge_state
        settings = state.settings
        grid = self.tokenmerge_grid(x)
        protected = self.tokenmerge_protected(x)
        if grid is None or not any(settings.merges(branch) for branch in BRANCHES):
            return None
        frames, height, width = grid
        num_tokens = x.shape[1] - protected
        if frames * height * width != num_tokens:
            raise RuntimeError(
                f"tokenmerge: a {type(self).__name__} got {num_tokens} image tokens where its grid "
                f"{frames} x {height} x {width} holds {frames * height * width}; the latent size was misread")
        use_rand = settings.use_rand and x.shape[0] % 2 == 0
        choice = state.random_cells(height // settings.sy, width // settings.sx) if use_rand else None
        destinations, sources = _grid_partition(frames, height, width, settings.sx, settings.sy, x.device, choice)
        r = min(int(num_tokens * settings.ratio), sources.shape[0])
        if r <= 0:
            return None
        tokens = x[:, protected:] if protected else x
        return Plan(kernels.grid_matching(tokens, destinations, sources, r), protected)

    def tokenmerge_run(self, x: Tensor, branches: Sequence[Branch]) -> Tensor:
        """The block over (B, N, C) ``x``: for every branch, its normed input merged where
        the settings say, the branch, its output unmerged, the residual added."""
        return self.tokenmerge_run_planned(x, branches, self.tokenmerge_plan(x))

    def tokenmerge_run_planned(self, x: Tensor, branches: Sequence[Branch], plan: Optional[Plan]) -> Tensor:
        """:meth:`tokenmerge_run` with the plan made by the caller from ``x``, for blocks
        whose branches read the plan too (rotary positions of the merged tokens)."""
        settings = self._tokenmerge_state.settings
        for branch in branches:
            normed = branch.norm(x)
            if plan is not None and settings.merges(branch.name):
                x = plan.unmerge(branch.body(plan.merge(normed))) + x
            else:
                x = branch.body(normed) + x
        return x


class TextLeadingBlock(DiffusionBlock):
    """A block over a joint sequence [text | image] (single-stream blocks): every token
    before the image grid's is text, protected."""

    def tokenmerge_protected(self, tokens: Tensor) -> int:
        grid = self.tokenmerge_grid(tokens)
        return tokens.shape[1] - (0 if grid is None else grid[0] * grid[1] * grid[2])


def _grid_partition(
    frames: int, height: int, width: int, sx: int, sy: int, device: torch.device, choice: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """:func:`grid_destinations` on ``device``; the fixed (top-left) partition made once per shape."""
    if choice is None:
        return _fixed_partition(frames, height, width, sx, sy, device)
    destinations, sources = grid_destinations(height, width, sx, sy, choice.cpu(), frames)
    return destinations.to(device), sources.to(device)


@shape_cache
def _fixed_partition(frames: int, height: int, width: int, sx: int, sy: int, device: torch.device
                     ) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False):
        destinations, sources = grid_destinations(height, width, sx, sy, frames=frames)
        return destinations.to(device), sources.to(device)


class Family(ABC):
    """One family of denoisers (a diffusers model class and its kin): what the shared
    patching needs to know of it."""

    #: The family's name, for messages.
    name: ClassVar[str]
    #: The diffusers class names of its denoisers.
    classes: ClassVar[tuple[str, ...]]

    @abstractmethod
    def blocks(self, denoiser: nn.Module) -> list[tuple[nn.Module, Place]]:
        """Every block that may merge, with its place."""

    @abstractmethod
    def block_mixin(self) -> type[DiffusionBlock]:
        """The :class:`DiffusionBlock` the blocks become."""

    def mixin_for(self, block: nn.Module) -> type[DiffusionBlock]:
        """The :class:`DiffusionBlock` ``block`` becomes: :meth:`block_mixin` unless the
        family has blocks of several classes."""
        return self.block_mixin()

    @abstractmethod
    def record_latent(self, state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
        """Set ``state.latent`` from the denoiser's call arguments (a forward pre-hook)."""

    def settings(self, denoiser: nn.Module, settings: Settings) -> Settings:
        """``settings`` with the family's defaults filled in; a ValueError if they would
        merge nothing in this denoiser."""
        return settings

    def check(self, denoiser: nn.Module) -> None:
        """A TypeError naming what this family cannot reproduce in ``denoiser``; by
        default every denoiser of its classes is supported."""
        return None

    def selected(self, denoiser: nn.Module, settings: Settings) -> list[tuple[nn.Module, Place]]:
        """The blocks that merge under ``settings``: by default, those at most
        ``max_downsample`` times downsampled."""
        maximum = settings.max_downsample
        return [(block, place) for block, place in self.blocks(denoiser)
                if maximum is None or place.downsample <= maximum]


def patch(family: Family, denoiser: nn.Module, settings: Settings) -> DiffusionState:
    """Patch ``denoiser`` in place; every check runs before anything changes."""
    settings.check()
    family.check(denoiser)
    settings = family.settings(denoiser, settings)
    selected = family.selected(denoiser, settings)
    if not selected:
        levels = sorted({place.downsample for _, place in family.blocks(denoiser)})
        raise ValueError(f"max_downsample={settings.max_downsample} merges in no block of this "
                         f"{type(denoiser).__name__}: its blocks are at downsample {', '.join(map(str, levels))}; "
                         f"give max_downsample >= {levels[0]}, or leave it out")
    check_class_forward([block for block, _ in selected])
    state = DiffusionState(family, settings)

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        family.record_latent(state, args, kwargs)

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    denoiser.__dict__["_tokenmerge_hooks"] = [handle]
    for block, place in selected:
        block.__dict__["_tokenmerge_state"], block.__dict__["_tokenmerge_place"] = state, place
        swap_class(block, family.mixin_for(block))
    denoiser.__dict__["_tokenmerge_state"] = state
    return state


def check_class_forward(blocks: Sequence[nn.Module]) -> None:
    """A TypeError if a block's ``forward`` is one of its own, set on the module (as
    accelerate's offload hooks set it): it would hide the patched class's forward and
    nothing would merge."""
    wrapped = next((block for block in blocks if "forward" in vars(block)), None)
    if wrapped is not None:
        raise TypeError(f"a {type(wrapped).__name__}'s forward is wrapped on the module (by CPU offload or another "
                        "library's hooks), which would hide token merging; apply tokenmerge first, then enable "
                        "offloading")


def unpatch(denoiser: nn.Module) -> None:
    """Undo :func:`patch`: the same classes, attributes and hooks as before."""
    for module in denoiser.modules():
        if is_swapped(module):
            restore_class(module)
        for handle in module.__dict__.pop("_tokenmerge_hooks", []):
            handle.remove()
        for name in ("_tokenmerge_state", "_tokenmerge_place"):
            module.__dict__.pop(name, None)


def attention_kwargs(cross_attention_kwargs: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What a ``BasicTransformerBlock`` passes its attention of ``cross_attention_kwargs``
    (its deprecated ``scale`` dropped, as diffusers drops it); GLIGEN refused by name."""
    extra = dict(cross_attention_kwargs or {})
    if "gligen" in extra:
        raise TypeError("tokenmerge does not merge GLIGEN's grounded blocks; remove tokenmerge for GLIGEN")
    extra.pop("scale", None)
    return extra


def feed_forward(block: Any, ff: nn.Module, x: Tensor) -> Tensor:
    """``ff`` over ``x``, in the chunks ``enable_forward_chunking`` set on ``block`` (its
    ``_chunk_size`` and ``_chunk_dim``, as diffusers' blocks keep them)."""
    if getattr(block, "_chunk_size", None) is None:
        return ff(x)
    from diffusers.models.attention import _chunked_feed_forward

    return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)


def record_patched_latent(state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
    """:meth:`Family.record_latent` of a transformer over patches of its latent (B, C, H, W)
    or (B, C, F, H, W), given as ``hidden_states`` by name or first. Its blocks sit at the
    patch size (``Place(patch)``), so that their grid is the latent's, that many times
    smaller per side; frames are not patched."""
    latent = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    frames = latent.shape[2] if latent.dim() == 5 else 1
    state.latent = (frames, latent.shape[-2], latent.shape[-1])


def with_defaults(settings: Settings, **defaults: Any) -> Settings:
    """``settings`` with every field that is ``None`` taken from ``defaults``."""
    return replace(settings, **{name: value for name, value in defaults.items() if getattr(settings, name) is None})
