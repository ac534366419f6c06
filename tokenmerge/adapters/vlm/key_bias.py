"""Size-aware attention in the language model (``prop_attn=True`` for a vision-language model).

A visual token the reduction built from s of the model's visual tokens is attended to as
if it appeared s times: proportional attention's ``log s`` bias, added to the language
model's attention logits on that token's key, in the prefill and in every cached decoding
step after it (the key stays in the cache, so its bias must stay with it).

How: every call of the patched inner model builds the bias of its own positions (``log s``
at the visual placeholders, 0 elsewhere, :meth:`KeyBias.note`) and appends it to the bias
of the keys its cache already holds (kept per cache object); every attention layer of the
language model (:class:`KeyBiasedAttention`) adds the bias of the keys it attends to to the
mask it is given. That works for the implementations that add their mask to the logits,
transformers' ``eager`` and ``sdpa``; others are refused by name.
"""
from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...attention import mask_with_key_bias
from ..base import original_class

#: The attention implementations whose mask is added to the logits, so that a bias in it reaches them.
ADDITIVE_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class _Call:
    """One call of the inner model: the bias of the positions it adds (None: no visual
    tokens among them), and once the first attention layer asked, that of every key."""

    own: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    #: The biased masks built in this call, by the mask given (its id: the decoder hands
    #: every layer the same mask tensor) and the number of keys: built once, not per layer.
    masks: dict[tuple[Optional[int], int], Tensor] = field(default_factory=dict)


class KeyBias:
    """The log-size bias of the language model's keys, per thread for the call it is in,
    and per cache object for the keys the cache holds."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._by_cache: weakref.WeakKeyDictionary[Any, Tensor] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def begin(self) -> None:
        """A call of the inner model starts on this thread."""
        self._local.call = _Call()

    def end(self) -> None:
        self._local.call = None

    def note(self, placeholders: Tensor, sizes: Tensor) -> None:
        """The call's (B, Q) ``placeholders`` mask of one modality take ``log sizes``, in
        order (row by row, as the model scatters the visual tokens into them)."""
        call: Optional[_Call] = getattr(self._local, "call", None)
        if call is None:
            return
        if call.own is None:
            call.own = torch.zeros(placeholders.shape, dtype=torch.float32, device=placeholders.device)
        call.own[placeholders] = sizes.to(call.own.device, torch.float32).log()

    def of_keys(self, cache: Any, layer: int, batch: int, queries: int, device: torch.device) -> Optional[Tensor]:
        """The (B, T) bias of every key a layer attends to in this call (T: the keys the
        cache held before it, and the call's own), or None outside a call of the inner model."""
        call: Optional[_Call] = getattr(self._local, "call", None)
        if call is None:
            return None
        if call.keys is None:
            held = 0 if cache is None else int(cache.get_seq_length(layer))
            with self._lock:
                before = self._by_cache.get(cache) if cache is not None else None
            before = fitted(before, batch, held, device)
            own = call.own if call.own is not None else torch.zeros(batch, queries, device=device)
            call.keys = torch.cat([before, own.to(device)], dim=1)
            if cache is not None:
                with self._lock:
                    self._by_cache[cache] = call.keys
        return call.keys

    def biased_mask(self, mask: Optional[Tensor], bias: Tensor, queries: int, dtype: torch.dtype) -> Tensor:
        """``mask`` with the bias of the keys it covers (:func:`mask_with_key_bias`), built
        once per call and mask: every layer given the same mask gets the same result."""
        keys = mask.shape[-1] if mask is not None else bias.shape[1]
        call: _Call = self._local.call
        key = (None if mask is None else id(mask), keys)
        if key not in call.masks:
            call.masks[key] = mask_with_key_bias(mask, aligned(bias, keys), queries, dtype)
        return call.masks[key]


def fitted(bias: Optional[Tensor], batch: int, length: int, device: torch.device) -> Tensor:
    """``bias`` (B, T) of the keys a cache held, as long as the cache holds now: cut where
    the cache was cropped (assisted decoding), zeros where it holds keys tokenmerge did not see."""
    if bias is None:
        return torch.zeros(batch, length, device=device)
    if bias.shape[0] != batch:
        raise RuntimeError(f"tokenmerge's size-aware attention kept the bias of {bias.shape[0]} cached rows, but the "
                           f"language model now runs {batch}; give each request a cache of its own")
    bias = bias[:, :length].to(device)
    return torch.cat([bias, bias.new_zeros(batch, length - bias.shape[1])], dim=1)


def aligned(bias: Tensor, keys: int) -> Tensor:
    """The (B, T) bias of the keys seen so far, for a layer that attends to ``keys`` keys:
    padded with zeros for the empty slots of a static cache, or the last ``keys`` for a
    sliding-window cache that dropped the first."""
    if keys >= bias.shape[1]:
        return torch.cat([bias, bias.new_zeros(bias.shape[0], keys - bias.shape[1])], dim=1)
    return bias[:, bias.shape[1] - keys:]


class KeyBiasedAttention:
    """Mixin for the language model's attention layers: the mask they are given, plus the
    log-size bias of the keys they attend to."""

    _tokenmerge_key_bias: KeyBias
    config: Any
    layer_idx: int

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        arguments = forward_signature(original_class(self)).bind(self, *args, **kwargs).arguments
        hidden = arguments["hidden_states"]
        cache = arguments.get("cache", arguments.get("past_key_values"))
        bias = self._tokenmerge_key_bias.of_keys(cache, self.layer_idx, hidden.shape[0], hidden.shape[1],
                                                 hidden.device)
        if bias is not None:
            check_implementation(self.config)
            arguments["attention_mask"] = self._tokenmerge_key_bias.biased_mask(
                arguments.get("attention_mask"), bias, hidden.shape[1], hidden.dtype)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        # the host class, a transformers attention layer, defines forward
        return super().forward(**arguments, **extra)  # type: ignore[misc]


@functools.cache
def forward_signature(host: type[nn.Module]) -> inspect.Signature:
    """The signature of ``host.forward``, read once per class."""
    return inspect.signature(host.forward)


def check_implementation(config: Any) -> None:
    """Refuse an attention implementation that a bias in the mask would not reach."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ADDITIVE_MASK_IMPLEMENTATIONS:
        raise TypeError(f"tokenmerge's size-aware attention (prop_attn=True) adds to the language model's attention "
                        f"mask, which attn_implementation={implementation!r} does not take; load the model with "
                        f"attn_implementation='sdpa' or 'eager', or apply without prop_attn")


def attention_layers(language_model: nn.Module) -> list[nn.Module]:
    """The self-attention layers of a transformers decoder: ``layers[i].self_attn``."""
    layers = getattr(language_model, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(f"tokenmerge's size-aware attention (prop_attn=True) found no decoder layers with self_attn "
                        f"in {type(language_model).__name__}; apply without prop_attn")
    return [layer.self_attn for layer in layers]
