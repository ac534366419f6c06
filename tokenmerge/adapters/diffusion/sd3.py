"""Stable Diffusion 3 and 3.5 (``SD3Transformer2DModel``, MMDiT): ToMe for Stable
Diffusion in the joint transformer blocks.

Every ``JointTransformerBlock`` reads as its branches: the joint attention (image
queries, keys and values merged; the text tokens, which come in their own stream, as
they are), SD3.5's second image-only attention (``dual_attention_layers``, a second
``attn`` branch) and the image MLP (``merge_mlp``). The text stream is never merged:
its attention output comes from the joint attention over the merged image tokens, its
MLP runs on every text token. SD3 has no rotary positions: its positions are added to
the tokens before the first block, so every merged token carries them.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .base import Branch, DiffusionBlock, DiffusionState, Family, Place, feed_forward, record_patched_latent


class SD3Block(DiffusionBlock):
    """``JointTransformerBlock`` read as its image branches; the text stream alongside."""

    norm1: Any
    norm1_context: Any
    norm2: nn.Module
    norm2_context: Optional[nn.Module]
    attn: nn.Module
    attn2: Optional[nn.Module]
    ff: nn.Module
    ff_context: Optional[nn.Module]
    context_pre_only: bool
    use_dual_attention: bool

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
    ) -> tuple[Optional[Tensor], Tensor]:
        extra = joint_attention_kwargs or {}
        modulation = self.norm1(hidden_states, emb=temb)
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation[:5]
        if self.context_pre_only:
            context_normed, context_modulation = self.norm1_context(encoder_hidden_states, temb), None
        else:
            context_normed, *context_modulation = self.norm1_context(encoder_hidden_states, emb=temb)
        context_attention: list[Tensor] = []

        def joint_attention(x: Tensor) -> Tensor:
            image, text = self.attn(hidden_states=x, encoder_hidden_states=context_normed, **extra)
            context_attention.append(text)
            return gate_msa.unsqueeze(1) * image

        def image_attention(x: Tensor) -> Tensor:
            assert self.attn2 is not None
            return modulation[6].unsqueeze(1) * self.attn2(hidden_states=x, **extra)

        def mlp_input(x: Tensor) -> Tensor:
            return self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]

        branches = [Branch("attn", lambda x: normed, joint_attention)]
        if self.use_dual_attention:
            # SD3.5's second attention reads the block's input, normed with the first
            branches.append(Branch("attn", lambda x: modulation[5], image_attention))
        branches.append(Branch("mlp", mlp_input, lambda x: gate_mlp.unsqueeze(1) * feed_forward(self, self.ff, x)))
        hidden_states = self.tokenmerge_run(hidden_states, branches)
        if context_modulation is None:
            return None, hidden_states
        return self._text_stream(encoder_hidden_states, context_attention[0], context_modulation), hidden_states

    def _text_stream(self, text: Tensor, attention: Tensor, modulation: list[Tensor]) -> Tensor:
        """The text tokens after the block, as diffusers computes them: never merged."""
        assert self.norm2_context is not None and self.ff_context is not None
        gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        text = text + gate_msa.unsqueeze(1) * attention
        normed = self.norm2_context(text) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return text + gate_mlp.unsqueeze(1) * feed_forward(self, self.ff_context, normed)


class SD3Family(Family):
    name = "Stable Diffusion 3"
    classes = ("SD3Transformer2DModel",)

    def blocks(self, denoiser: nn.Module) -> list[tuple[nn.Module, Place]]:
        model: Any = denoiser
        place = Place(model.config.patch_size)
        return [(block, place) for block in model.transformer_blocks]

    def block_mixin(self) -> type[DiffusionBlock]:
        return SD3Block

    def record_latent(self, state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
        record_patched_latent(state, args, kwargs)


FAMILY = SD3Family()
