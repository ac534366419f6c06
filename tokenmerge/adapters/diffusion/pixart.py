"""PixArt-Sigma and PixArt-Alpha (``PixArtTransformer2DModel``): ToMe for Stable
Diffusion in its ``BasicTransformerBlock``s with ``norm_type="ada_norm_single"``.

Such a block reads as three branches: self-attention (``attn``), cross-attention to
the T5 text tokens (``crossattn``: image queries merged, the text keys and values as
they are; PixArt reads the residual stream unnormed there) and the MLP (``mlp``), each
modulated by the timestep's shift, scale and gate. PixArt's positions are added to the
tokens before the first block, so every merged token carries them. Text tokens are
never merged: they only enter as keys and values of the cross-attention.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .base import (
    Branch,
    DiffusionBlock,
    DiffusionState,
    Family,
    Place,
    attention_kwargs,
    feed_forward,
    record_patched_latent,
)


class PixArtBlock(DiffusionBlock):
    """``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``, read as its branches."""

    norm1: nn.Module
    norm2: nn.Module
    attn1: nn.Module
    attn2: Optional[nn.Module]
    ff: nn.Module
    scale_shift_table: Tensor
    only_cross_attention: bool

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        timestep: Optional[Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        class_labels: Optional[Tensor] = None,
        added_cond_kwargs: Optional[dict[str, Tensor]] = None,
    ) -> Tensor:
        extra = attention_kwargs(cross_attention_kwargs)
        assert timestep is not None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)

        def self_attention(x: Tensor) -> Tensor:
            if attention_mask is not None and x.shape[1] != hidden_states.shape[1]:
                raise TypeError("tokenmerge merges PixArt's image tokens only without a self-attention mask")
            context = encoder_hidden_states if self.only_cross_attention else None
            return gate_msa * self.attn1(x, encoder_hidden_states=context, attention_mask=attention_mask, **extra)

        def cross_attention(x: Tensor) -> Tensor:
            assert self.attn2 is not None
            return self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                              **extra)

        branches = [Branch("attn", lambda x: self.norm1(x) * (1 + scale_msa) + shift_msa, self_attention)]
        if self.attn2 is not None:
            branches.append(Branch("crossattn", lambda x: x, cross_attention))
        branches.append(Branch("mlp", lambda x: self.norm2(x) * (1 + scale_mlp) + shift_mlp,
                               lambda x: gate_mlp * feed_forward(self, self.ff, x)))
        return self.tokenmerge_run(hidden_states, branches)


class PixArtFamily(Family):
    name = "PixArt"
    classes = ("PixArtTransformer2DModel",)

    def blocks(self, denoiser: nn.Module) -> list[tuple[nn.Module, Place]]:
        model: Any = denoiser
        place = Place(model.config.patch_size)
        return [(block, place) for block in model.transformer_blocks]

    def block_mixin(self) -> type[DiffusionBlock]:
        return PixArtBlock

    def check(self, denoiser: nn.Module) -> None:
        for block, _ in self.blocks(denoiser):
            if block.norm_type != "ada_norm_single" or block.pos_embed is not None:
                raise TypeError(f"tokenmerge merges PixArt blocks with norm_type='ada_norm_single' and no "
                                f"positional embedding; this PixArtTransformer2DModel has "
                                f"norm_type={block.norm_type!r}")

    def record_latent(self, state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
        record_patched_latent(state, args, kwargs)


FAMILY = PixArtFamily()
