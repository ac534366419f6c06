"""FLUX.2 (``Flux2Transformer2DModel``): ToMe for Stable Diffusion in the double-stream
and the single-stream blocks, every merged token at its rotary position, as for
Flux.1 (see :mod:`tokenmerge.adapters.diffusion.flux`, whose row-by-row rotary tables
and grid reading it shares).

A double-stream block (``Flux2TransformerBlock``) reads as the joint attention
(``attn``) and the image MLP (``mlp``), the text stream alongside, never merged; a
single-stream block (``Flux2SingleTransformerBlock``, whose fused attention and MLP
are one branch, ``attn``) gets the joint sequence [text | image], the text leading,
protected. Reference images and their key-value cache (``kv_cache_mode``) are refused
while merging.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .base import Branch, DiffusionBlock, TextLeadingBlock
from .flux import FluxFamily, Rotary, joined, per_row, text_first_rows


def check_no_reference_cache(extra: dict[str, Any]) -> None:
    if extra.get("kv_cache_mode") is not None:
        raise TypeError("tokenmerge does not merge tokens under FLUX.2's reference-image key-value cache "
                        "(kv_cache_mode); remove tokenmerge to use reference images")


def modulations(mod: Tensor, sets: int) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
    """FLUX.2's (shift, scale, gate) sets of one modulation tensor."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    return Flux2Modulation.split(mod, sets)


class Flux2DoubleBlock(DiffusionBlock):
    """``Flux2TransformerBlock`` read as its image branches; the text stream alongside."""

    norm1: nn.Module
    norm1_context: nn.Module
    norm2: nn.Module
    norm2_context: nn.Module
    attn: nn.Module
    ff: nn.Module
    ff_context: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb_mod_img: Tensor,
        temb_mod_txt: Tensor,
        image_rotary_emb: Optional[Rotary] = None,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
    ) -> tuple[Tensor, Tensor]:
        extra = joint_attention_kwargs or {}
        check_no_reference_cache(extra)
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = modulations(temb_mod_img, 2)
        text_modulation = modulations(temb_mod_txt, 2)
        c_shift_msa, c_scale_msa, _ = text_modulation[0]
        normed = (1 + scale_msa) * self.norm1(hidden_states) + shift_msa
        context_normed = (1 + c_scale_msa) * self.norm1_context(encoder_hidden_states) + c_shift_msa
        plan = self.tokenmerge_plan(hidden_states)
        merged = plan is not None and self._tokenmerge_state.settings.merges("attn")
        context_attention: list[Tensor] = []

        def joint_attention(x: Tensor) -> Tensor:
            def call(rows: slice, rotary: Optional[Rotary]) -> Any:
                return self.attn(hidden_states=x[rows], encoder_hidden_states=context_normed[rows],
                                 image_rotary_emb=rotary, **extra)

            outputs = per_row(call, x.shape[0], image_rotary_emb, plan, merged,
                              text_first_rows(encoder_hidden_states.shape[1]))
            context_attention.append(joined(outputs, 1))
            return gate_msa * joined(outputs, 0)

        branches = [Branch("attn", lambda x: normed, joint_attention),
                    Branch("mlp", lambda x: self.norm2(x) * (1 + scale_mlp) + shift_mlp,
                           lambda x: gate_mlp * self.ff(x))]
        hidden_states = self.tokenmerge_run_planned(hidden_states, branches, plan)
        return self._text_stream(encoder_hidden_states, context_attention[0], text_modulation), hidden_states

    def _text_stream(self, text: Tensor, attention: Tensor, modulation: tuple[tuple[Tensor, ...], ...]) -> Tensor:
        """The text tokens after the block, as diffusers computes them: never merged."""
        (_, _, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = modulation
        text = text + gate_msa * attention
        normed = self.norm2_context(text) * (1 + scale_mlp) + shift_mlp
        text = text + gate_mlp * self.ff_context(normed)
        return text.clip(-65504, 65504) if text.dtype == torch.float16 else text


class Flux2SingleBlock(TextLeadingBlock):
    """``Flux2SingleTransformerBlock``: one branch over [text | image], text protected."""

    norm: nn.Module
    attn: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor],
        temb_mod: Tensor,
        image_rotary_emb: Optional[Rotary] = None,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
        split_hidden_states: bool = False,
        text_seq_len: Optional[int] = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        extra = joint_attention_kwargs or {}
        check_no_reference_cache(extra)
        if encoder_hidden_states is not None:
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = modulations(temb_mod, 1)[0]
        normed = (1 + scale) * self.norm(hidden_states) + shift
        plan = self.tokenmerge_plan(hidden_states)
        merged = plan is not None and self._tokenmerge_state.settings.merges("attn")
        text = self.tokenmerge_protected(hidden_states)

        def fused_attention_and_mlp(x: Tensor) -> Tensor:
            def call(rows: slice, rotary: Optional[Rotary]) -> tuple[Tensor]:
                return (self.attn(hidden_states=x[rows], image_rotary_emb=rotary, **extra),)

            return gate * joined(per_row(call, x.shape[0], image_rotary_emb, plan, merged, text_first_rows(text)), 0)

        branches = [Branch("attn", lambda x: normed, fused_attention_and_mlp)]
        hidden_states = self.tokenmerge_run_planned(hidden_states, branches, plan)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        if split_hidden_states:
            return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        return hidden_states


class Flux2Family(FluxFamily):
    name = "FLUX.2"
    classes = ("Flux2Transformer2DModel",)
    double_block = Flux2DoubleBlock
    single_block = Flux2SingleBlock
    img_ids_argument = 3


FAMILY = Flux2Family()
