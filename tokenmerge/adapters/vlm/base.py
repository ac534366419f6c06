"""Vision-language models: fewer visual tokens where the language model receives them.

A vision-language model (VLM) runs its vision tower over an image, projects the tokens
of one tower layer into the language model's width, and scatters them into the prompt
in place of the image's placeholder tokens, one placeholder per token. What costs most
is what follows: the language model's prefill over every visual token, and their keys
and values in its cache for every later step. tokenmerge reduces those tokens in two
places, both behind :func:`tokenmerge.apply`:

* ``visual_tokens=K``: every image's projected tokens are reduced to exactly ``K`` (or
  that fraction of them), after the projector, so that projectors that need the whole
  patch grid (pooling, pixel shuffle) run as they are (:func:`tokenmerge.fixed_count.reduce_to`);
* ``r=...``: the tower merges as a ViT does, up to the layer the model reads, where the
  tower hands a list of tokens to a projector of single tokens (LLaVA-1.5, PaliGemma).

The processor then emits as many placeholders per image as the model gives tokens
(:class:`ReducingProcessor`), on every path through it (``processor(...)``,
``apply_chat_template``, batches, several images per prompt); a prompt built for the
full count is refused before the language model runs.

One :class:`Family` per model family says where its tower, feature layer and keys
are; the reduction step (:meth:`ReducingModel.get_image_features`) is written once.
"""
from __future__ import annotations

import inspect
import re
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from ... import fixed_count
from ...schedule import Schedule, resolve, token_counts
from ...state import MergeState
from ..base import is_swapped, restore_class, swap_class
from . import key_bias
from .key_bias import KeyBias


class Family:
    """What tokenmerge needs to know of one VLM family in transformers.

    A family names its classes and says where the tokens the projector reads come
    from (:meth:`tower_features`) and what to match them on (:meth:`keys`); the rest
    is shared.
    """

    #: The family's name in messages and docs, such as ``"LLaVA-1.5"``.
    name: ClassVar[str]
    #: The class names of the family's inner model (``LlavaModel``) and the classes
    #: around it (``LlavaForConditionalGeneration``), which hold it as ``model``.
    model_classes: ClassVar[tuple[str, ...]]
    outer_classes: ClassVar[tuple[str, ...]]
    #: The class names of its processors.
    processor_classes: ClassVar[tuple[str, ...]]

    # The inner model is typed Any: a family reads its parts by name, as transformers defines them.
    def tower(self, inner: Any) -> Any:
        """The vision tower."""
        return inner.vision_tower

    def layers(self, inner: Any) -> Sequence[Any]:
        """The tower's layers, in order: the blocks tokenmerge's adapter for it merges in."""
        from .. import find_adapter

        tower = self.tower(inner)
        return find_adapter(tower).blocks(tower)

    def tower_features(self, inner: Any, outputs: Any) -> tuple[Tensor, int]:
        """The (images, N, C) tower tokens the projector reads, from the tower's outputs
        that ``get_image_features`` returns, and the number of tower layers that made them:
        the tower's last hidden state, unless the family reads another layer."""
        return outputs.last_hidden_state, len(self.layers(inner))

    def keys_per_image(self, inner: Any, outputs: Any) -> Sequence[Tensor]:
        """What the reduction matches every image's projected tokens on, one (N, D)
        tensor per image, from the outputs ``get_image_features`` returns."""
        features, layers_run = self.tower_features(inner, outputs)
        return self.keys(inner, features, layers_run).unbind(0)

    def keys(self, inner: Any, features: Tensor, layers_run: int) -> Tensor:
        """What the reduction matches on, one (images, M, D) row per projected token:
        ToMe's attention keys averaged over heads, those the tower's next layer computes
        from the features (or, after its last layer, those the last layer would)."""
        layers = self.layers(inner)
        return self.layer_keys(layers[min(layers_run, len(layers) - 1)], features)

    def layer_keys(self, layer: Any, features: Tensor) -> Tensor:
        """The (images, N, D) keys ``layer`` computes from its input ``features``, averaged
        over heads: a CLIP or SigLIP layer's, unless the family's tower names its parts otherwise."""
        attention = layer.self_attn
        return head_mean(attention.k_proj(layer.layer_norm1(features)), attention.num_heads)

    def feature_layers(self, inner: Any) -> int:
        """How many tower layers make the tokens the model reads (the rest of the tower
        runs but reaches nothing): the layers tower merging may merge in."""
        return len(self.layers(inner))

    def dropped_prefix(self, inner: Any) -> int:
        """Tokens of the tower's output the model drops before the projector (a class token)."""
        return 0

    def language_model(self, inner: Any) -> Any:
        """The language model the visual tokens reach."""
        return inner.language_model

    def model_mixin(self) -> type:
        """The mixin the inner model's class takes: :class:`ReducingModel`, or one built
        on it for what the family does more with the tokens (positions, videos)."""
        return ReducingModel

    def processor_mixin(self) -> type:
        """The mixin the processor's class takes: :class:`ReducingProcessor`, or one built
        on it where the processor writes placeholders differently."""
        return ReducingProcessor


@dataclass(frozen=True)
class Settings:
    """What a patched VLM reduces: ``visual_tokens`` per image after the projector (None:
    all), with ``method``; the tower's own ``r`` (None: the tower does not merge); and
    whether the language model attends to every visual token in proportion to its size
    (``prop_attn``, :mod:`~tokenmerge.adapters.vlm.key_bias`)."""

    visual_tokens: Optional[int | float]
    method: str
    r: Optional[Schedule]
    prop_attn: bool = False


@dataclass(frozen=True)
class ImageTokens:
    """One image (or crop, or video) of a pass: the tokens the projector gave (``full``),
    those the language model received (``kept``), how many projected tokens each
    received token stands for (``size``, (kept,)), and the index among the projected
    tokens of the one each was built on (``cells``, (kept,)): its place in the grid. Sizes
    count the tokens the unpatched model gives (with merging in the tower, its patches)."""

    full: int
    kept: int
    size: Tensor
    cells: Tensor


class VisionLanguageState:
    """The settings of a VLM tokenmerge reduces, and what the calling thread's last pass gave.

    Attributes:
        family: the model family's name.
        settings: the :class:`Settings`.
        tower_tokens: tokens per image leaving the tower's feature layer, after tower
            merging (None where the tower does not merge).
    """

    def __init__(self, family: Family, settings: Settings, tower_tokens: Optional[int]):
        self.family, self.settings, self.tower_tokens = family, settings, tower_tokens
        self._local = threading.local()
        #: Per thread, what a family's position step needs while it runs (Qwen's grid cells).
        self.placing = threading.local()
        #: The log-size bias of the language model's keys, with ``prop_attn``.
        self.key_bias = KeyBias()

    @property
    def visual_tokens(self) -> Optional[int | float]:
        return self.settings.visual_tokens

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def r(self) -> Optional[Schedule]:
        return self.settings.r

    @property
    def prop_attn(self) -> bool:
        return self.settings.prop_attn

    @property
    def images(self) -> list[ImageTokens]:
        """Every image of the calling thread's last pass, in the order the model read them."""
        return self.images_of("image")

    @property
    def videos(self) -> list[ImageTokens]:
        """Every video of the calling thread's last pass, in the order the model read them."""
        return self.images_of("video")

    def images_of(self, modality: str) -> list[ImageTokens]:
        return getattr(self._local, modality, [])

    @property
    def counts(self) -> list[tuple[int, int]]:
        """(tokens from the projector, tokens the language model received) per image of the last pass."""
        return [(image.full, image.kept) for image in self.images]

    @property
    def sizes(self) -> list[Tensor]:
        """For every image of the last pass, how many of the unpatched model's visual tokens
        each received token stands for (:class:`ImageTokens`)."""
        return [image.size for image in self.images]

    def kept(self, full: int) -> int:
        """The tokens the language model receives of an image the projector gives ``full`` tokens of."""
        if self.settings.visual_tokens is None:
            return full
        return fixed_count.target_count(full, self.settings.visual_tokens)

    def record(self, modality: str, images: list[ImageTokens]) -> None:
        """Note what the images (or videos) of a pass kept, for the calling thread."""
        setattr(self._local, modality, images)

    def __getstate__(self) -> dict[str, Any]:
        return {"family": self.family, "settings": self.settings, "tower_tokens": self.tower_tokens}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["family"], state["settings"], state["tower_tokens"])  # type: ignore[misc]

    def __repr__(self) -> str:
        settings = self.settings
        return (f"VisionLanguageState(family={self.family.name!r}, visual_tokens={settings.visual_tokens!r}, "
                f"method={settings.method!r}, r={settings.r!r}, prop_attn={settings.prop_attn!r})")


# --- the model -------------------------------------------------------------------------


class ReducingModel:
    """Mixin for a family's inner model (``LlavaModel``, ...): the visual tokens of every
    image reduced where ``get_image_features`` hands them on, and prompts whose
    placeholders do not match refused before the language model runs."""

    _tokenmerge_state: VisionLanguageState
    _tokenmerge_family: Family
    _tokenmerge_original: type
    config: Any

    #: Methods whose callers read the parameters they may pass from the signature
    #: (``generate`` does), so the patched class shows the host's.
    SIGNED = ("get_image_features", "get_video_features")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give the patched class (mixin, host) this mixin's methods under the host's signatures."""
        super().__init_subclass__(**kwargs)
        host = cls.__dict__.get("_tokenmerge_original")
        for name in cls.SIGNED if host is not None else ():
            mine, theirs = getattr(cls, name, None), getattr(host, name, None)
            if mine is not None and theirs is not None:
                setattr(cls, name, with_signature(mine, theirs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key_bias = self._tokenmerge_state.key_bias
        if not self._tokenmerge_state.prop_attn:
            # the host class, the family's inner model, defines forward
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        key_bias.begin()
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            key_bias.end()

    def get_image_features(self, pixel_values: Tensor, *args: Any, **kwargs: Any) -> Any:
        # the host class, the family's inner model, defines get_image_features
        outputs = super().get_image_features(pixel_values, *args, **kwargs)  # type: ignore[misc]
        return self._tokenmerge_reduce_outputs(outputs, "image")

    def _tokenmerge_reduce_outputs(self, outputs: Any, modality: str) -> Any:
        """The tower's ``outputs`` with the visual tokens in ``pooler_output`` reduced,
        and what each image kept recorded in the state."""
        state, family = self._tokenmerge_state, self._tokenmerge_family
        sizes = self._tokenmerge_tower_sizes(len(per_image(outputs.pooler_output)))
        if state.settings.visual_tokens is None:
            state.record(modality, [unreduced(len(tokens), size)
                                    for tokens, size in zip(per_image(outputs.pooler_output), sizes)])
            return outputs
        keys = family.keys_per_image(self, outputs)
        outputs.pooler_output = self._tokenmerge_reduce(outputs.pooler_output, keys, modality, sizes=sizes)
        return outputs

    def _tokenmerge_tower_sizes(self, images: int) -> list[Optional[Tensor]]:
        """Per image, the patches each token leaving a merging tower stands for (None
        for every image where the tower does not merge)."""
        from ... import api

        family, state = self._tokenmerge_family, self._tokenmerge_state
        if state.tower_tokens is None:
            return [None] * images
        tower_state = api.get_state(family.tower(self))
        assert isinstance(tower_state, MergeState)  # the tower is a ViT tokenmerge merges in
        size = tower_state.sizes.get(family.feature_layers(self))
        if size is None:
            return [None] * images
        return list(size[:, family.dropped_prefix(self):, 0].unbind(0))

    def _tokenmerge_reduce(self, projected: Tensor | Sequence[Tensor], keys: Sequence[Tensor], modality: str,
                           counts: Optional[Sequence[int]] = None,
                           sizes: Optional[Sequence[Optional[Tensor]]] = None) -> Any:
        """``projected`` (a (images, N, C) tensor, or one (N, C) tensor per image, as the
        family gives them) with every image reduced to its kept count (or to its entry of
        ``counts``, where the family decides), in the same form; ``sizes`` (one (N,) tensor
        per image, or None) are the patches the tokens already stand for (a merging tower).
        Images of one size and count are reduced together (each row on its own, so the
        same alone and in a batch)."""
        state = self._tokenmerge_state
        rows = list(per_image(projected))
        sizes = list(sizes) if sizes is not None else [None] * len(rows)
        if [len(key) for key in keys] != [len(row) for row in rows]:
            raise RuntimeError(f"tokenmerge found keys for {[len(key) for key in keys]} tokens for images of "
                               f"{[len(row) for row in rows]} in {state.family.name}; the family's description does "
                               "not fit this model")
        targets = list(counts) if counts is not None else [state.kept(len(row)) for row in rows]
        images: list[Optional[ImageTokens]] = [None] * len(rows)
        for full, kept in sorted({(len(row), target) for row, target in zip(rows, targets)}):
            group = [index for index, row in enumerate(rows) if (len(row), targets[index]) == (full, kept)]
            if kept == full:
                for index in group:
                    images[index] = unreduced(full, sizes[index])
                continue
            stacked = torch.stack([rows[index] for index in group])
            grouped_keys = torch.stack([keys[index] for index in group]).to(stacked.dtype)
            cells = torch.arange(full, device=stacked.device).expand(len(group), full).unsqueeze(-1)
            size = torch.stack([ones_or(sizes[index], full, stacked.device) for index in group]).unsqueeze(-1)
            reduced = fixed_count.reduce_to(stacked, grouped_keys, kept, state.settings.method, size=size,
                                            sides={"cell": cells})
            tokens, size, kept_cells = in_grid_order(reduced.tokens, reduced.size[..., 0],
                                                     reduced.sides["cell"][..., 0])
            for row, index in enumerate(group):
                rows[index] = tokens[row]
                images[index] = ImageTokens(full, kept, size[row], kept_cells[row])
        state.record(modality, [image for image in images if image is not None])
        if isinstance(projected, Tensor):
            return torch.stack(rows) if rows else projected
        return tuple(rows) if isinstance(projected, tuple) else rows

    def get_placeholder_mask(self, input_ids: Optional[Tensor], *args: Any, **kwargs: Any) -> Any:
        if input_ids is not None:
            features = dict(zip(("inputs_embeds", "image_features", "video_features"), (None, *args[1:])))
            features.update((key, value) for key, value in kwargs.items() if key.endswith("_features"))
            for modality in ("image", "video"):
                if features.get(f"{modality}_features") is not None:
                    self._tokenmerge_check_placeholders(input_ids, modality, features[f"{modality}_features"])
        # the host class, the family's inner model, defines get_placeholder_mask
        return super().get_placeholder_mask(input_ids, *args, **kwargs)  # type: ignore[misc]

    def _tokenmerge_check_placeholders(self, input_ids: Tensor, modality: str, features: Tensor) -> None:
        """Refuse prompts whose placeholders of ``modality`` are not the visual tokens given."""
        given = features.shape[0] if features.dim() == 2 else features.shape[0] * features.shape[1]
        mask = input_ids == placeholder_id(self.config, modality)
        placeholders = int(mask.sum())
        if placeholders == given:
            if self._tokenmerge_state.prop_attn:
                images = self._tokenmerge_state.images_of(modality)
                self._tokenmerge_state.key_bias.note(mask, torch.cat([image.size for image in images]))
            return
        kept = sorted({image.kept for image in self._tokenmerge_state.images_of(modality)})
        raise ValueError(
            f"tokenmerge reduced the {modality}s of this call to {given} visual tokens "
            f"({' or '.join(map(str, kept))} each), but the prompts hold {placeholders} {modality} placeholders, as "
            "the unreduced model expects; pass the processor to tokenmerge.apply(model, ..., processor=processor) "
            "and build the prompts with it"
        )


def with_signature(function: Callable, model: Callable) -> Callable:
    """A copy of ``function`` (its closure too, so ``super()`` works) that ``inspect``
    sees with the signature of ``model``."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = function.__kwdefaults__, function.__qualname__
    copy.__signature__ = inspect.signature(model)  # type: ignore[attr-defined]
    return copy


def in_grid_order(tokens: Tensor, size: Tensor, cells: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (images, K, C) reduced ``tokens``, their (images, K) ``size`` and ``cells``,
    reordered by cell: the language model reads the kept tokens in the order of the
    grid it was trained on (merging leaves them in its own order: unmerged, then merged)."""
    order = cells.argsort(dim=1)
    return tokens.gather(1, order.unsqueeze(-1).expand_as(tokens)), size.gather(1, order), cells.gather(1, order)


def unreduced(full: int, size: Optional[Tensor] = None) -> ImageTokens:
    """An image whose tokens all reach the language model, each standing for itself
    (or for ``size`` patches, where the tower merged)."""
    return ImageTokens(full, full, ones_or(size, full, torch.device("cpu")), torch.arange(full))


def ones_or(size: Optional[Tensor], count: int, device: torch.device) -> Tensor:
    """``size`` as float32, or ``count`` ones on ``device`` for tokens that stand for themselves."""
    return torch.ones(count, device=device) if size is None else size.float()


def head_mean(keys: Tensor, num_heads: int) -> Tensor:
    """(images, N, heads * d) attention keys averaged over their heads, as ToMe matches on them."""
    return keys.view(*keys.shape[:2], num_heads, -1).mean(dim=2)


def cell_means(shuffled: Tensor, cells: int) -> Tensor:
    """Keys pixel-shuffled as a projector shuffles its tokens, (..., M, cells * D), every
    projected token's ``cells`` grid cells side by side on channels, as (..., M, D): the
    mean over the cells each projected token is made of."""
    return shuffled.unflatten(-1, (cells, -1)).mean(dim=-2)


def per_image(projected: Tensor | Sequence[Tensor]) -> Sequence[Tensor]:
    """The (N, C) tokens of every image in what ``get_image_features`` returned."""
    return projected.unbind(0) if isinstance(projected, Tensor) else projected


def placeholder_id(config: Any, modality: str = "image") -> int:
    """The id of the placeholder token the model scatters visual tokens of ``modality`` into."""
    for name in (f"{modality}_token_id", f"{modality}_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise TypeError(f"tokenmerge found no {modality} token id in {type(config).__name__}")


# --- the processor ---------------------------------------------------------------------


class ReducingProcessor:
    """Mixin for a family's processor: every image's placeholders are as many as the
    tokens the patched model gives it. The class keeps its name, so that a processor
    saved while patched saves as the family's own."""

    _tokenmerge_keeps_name = True
    _tokenmerge_state: VisionLanguageState
    _tokenmerge_placeholders: dict[str, str]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        # the host class, the family's processor, defines replace_image_token
        text = super().replace_image_token(image_inputs, image_idx, **kwargs)  # type: ignore[misc]
        return self._tokenmerge_rewrite(text, "image")

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        # the host class, the family's processor, defines replace_video_token
        text = super().replace_video_token(video_inputs, video_idx, **kwargs)  # type: ignore[misc]
        return self._tokenmerge_rewrite(text, "video")

    def _tokenmerge_rewrite(self, text: str, modality: str) -> str:
        """``text`` with every run of placeholders of ``modality`` as long as the model's tokens
        of it (a model with no video token of its own reads a video's frames as images)."""
        placeholder = self._tokenmerge_placeholders.get(modality, self._tokenmerge_placeholders["image"])

        def shortened(run: re.Match) -> str:
            return placeholder * self._tokenmerge_count(len(run.group(0)) // len(placeholder))

        return re.sub(f"(?:{re.escape(placeholder)})+", shortened, text)

    def _tokenmerge_count(self, placeholders: int) -> int:
        """The placeholders a run of ``placeholders`` unreduced ones becomes: one image's."""
        return processor_count(self._tokenmerge_state, placeholders)


def processor_count(state: VisionLanguageState, full: int) -> int:
    """Placeholders for an image the unpatched processor gives ``full`` placeholders:
    the tower's merged count where the tower merges, then the kept share of that."""
    if state.tower_tokens is not None:
        full = state.tower_tokens
    return state.kept(full)


def placeholder_texts(model_config: Any, processor: Any) -> dict[str, str]:
    """The placeholder tokens, as the processor's tokenizer writes them, of every
    modality the model has one for."""
    texts = {"image": processor.tokenizer.convert_ids_to_tokens(placeholder_id(model_config))}
    if getattr(model_config, "video_token_id", None) is not None:
        texts["video"] = processor.tokenizer.convert_ids_to_tokens(placeholder_id(model_config, "video"))
    return texts


# --- patching --------------------------------------------------------------------------


def inner_model(family: Family, model: nn.Module) -> Any:
    """The family's inner model: ``model`` itself, or the one it holds as ``model``."""
    return model if type(model).__name__ in family.model_classes else model.model


def check_processor(family: Family, processor: Any) -> None:
    name = type(processor).__name__
    if name not in family.processor_classes:
        raise TypeError(f"tokenmerge: processor={name} is not a processor of {family.name} models "
                        f"({', '.join(family.processor_classes)}); pass the model's own processor")
    if is_swapped(processor):
        raise TypeError(f"tokenmerge is already applied to this {name}; pass a processor of its own to each model, "
                        "or remove tokenmerge from the model it was given to first")


def tower_schedule(family: Family, inner: Any, r: Schedule) -> tuple[list[int], int]:
    """The per-block r of the tower (0 after the layers the model reads: their merges
    would reach nothing) and the tokens per image that then reach the projector."""
    from .. import find_adapter

    tower = family.tower(inner)
    adapter = find_adapter(tower)
    depth = adapter.depth(tower)
    used = family.feature_layers(inner)
    per_block = [value if block < used else 0 for block, value in enumerate(resolve(r, depth))]
    num_tokens, num_protected = adapter.token_layout(tower)
    counts = token_counts(num_tokens, per_block, num_protected)
    return per_block, counts[used - 1] - family.dropped_prefix(inner)


def patch(family: Family, model: nn.Module, settings: Settings, processor: Any) -> VisionLanguageState:
    """Patch ``model`` (and ``processor``) as ``settings`` say; returns the state."""
    from ... import api

    inner = inner_model(family, model)
    tower_tokens = None
    if settings.r is not None:
        per_block, tower_tokens = tower_schedule(family, inner, settings.r)
        api.apply(family.tower(inner), r=per_block, method=settings.method)
    state = VisionLanguageState(family, settings, tower_tokens)
    inner.__dict__["_tokenmerge_family"] = family
    inner.__dict__["_tokenmerge_state"] = state
    swap_class(inner, family.model_mixin())
    if settings.prop_attn:
        for attention in key_bias.attention_layers(family.language_model(inner)):
            attention.__dict__["_tokenmerge_key_bias"] = state.key_bias
            swap_class(attention, key_bias.KeyBiasedAttention)
    model.__dict__["_tokenmerge_state"] = state
    if processor is not None:
        processor.__dict__["_tokenmerge_state"] = state
        processor.__dict__["_tokenmerge_placeholders"] = placeholder_texts(inner.config, processor)
        swap_class(processor, family.processor_mixin())
        model.__dict__["_tokenmerge_processor"] = processor
    return state


def unpatch(family: Family, model: nn.Module) -> None:
    """Undo :func:`patch`: the model, its tower and the processor given as they were."""
    from ... import api

    inner = inner_model(family, model)
    tower = family.tower(inner)
    if api.is_applied(tower):
        api.remove(tower)
    for attention in family.language_model(inner).modules():
        if is_swapped(attention):
            restore_class(attention)
            attention.__dict__.pop("_tokenmerge_key_bias", None)
    restore_class(inner)
    for name in ("_tokenmerge_family", "_tokenmerge_state"):
        inner.__dict__.pop(name, None)
    model.__dict__.pop("_tokenmerge_state", None)
    processor = model.__dict__.pop("_tokenmerge_processor", None)
    if processor is not None:
        restore_class(processor)
        for name in ("_tokenmerge_state", "_tokenmerge_placeholders"):
            processor.__dict__.pop(name, None)
