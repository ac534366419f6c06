"""Qwen-Image (``QwenImageTransformer2DModel``): ToMe for Stable Diffusion in its
dual-stream blocks, every merged token at its rotary position.

A ``QwenImageTransformerBlock`` reads as the joint attention (``attn``) and the image
MLP (``mlp``), each modulated by the timestep; the text stream runs alongside, never
merged (its padding mask is the processor's, which sizes the image part by the tokens
it is given). Qwen-Image rotates image and text tokens by tables of their own: a branch
run on merged tokens gets the image table's rows of the tokens every merged token sits
at, one batch row at a time (the table has no batch axis), as for Flux. The token grid
is the one image of ``img_shapes``; several images per sample (Qwen-Image-Edit's
references) and the edit models' per-token timestep (``zero_cond_t``) are refused.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .base import Branch, DiffusionBlock, DiffusionState, Family, Place
from .flux import joined, per_row

#: Qwen-Image's rotary tables: (image, text), complex, one row per token.
Rotary = tuple[Tensor, Tensor]


def image_rows(rotary: Rotary, positions: Tensor) -> Rotary:
    """The image table's rows of the tokens the merged tokens sit at; the text table whole."""
    return rotary[0][positions], rotary[1]


class QwenImageBlock(DiffusionBlock):
    """``QwenImageTransformerBlock`` read as its image branches; the text stream alongside."""

    img_mod: nn.Module
    txt_mod: nn.Module
    img_norm1: nn.Module
    img_norm2: nn.Module
    txt_norm1: nn.Module
    txt_norm2: nn.Module
    img_mlp: nn.Module
    txt_mlp: nn.Module
    attn: nn.Module
    zero_cond_t: bool

    _modulate: Any  # diffusers' own (shift, scale and gate of a modulation)
    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_mask: Optional[Tensor],
        temb: Tensor,
        image_rotary_emb: Optional[Rotary] = None,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
        modulate_index: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        if modulate_index is not None or self.zero_cond_t:
            raise TypeError("tokenmerge does not merge tokens under Qwen-Image-Edit's per-token timesteps "
                            "(zero_cond_t); remove tokenmerge for this model")
        extra = joint_attention_kwargs or {}
        image_mod1, image_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        text_mod1, text_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        normed, gate1 = self._modulate(self.img_norm1(hidden_states), image_mod1)
        text_normed, text_gate1 = self._modulate(self.txt_norm1(encoder_hidden_states), text_mod1)
        mlp_gate: list[Tensor] = []
        plan = self.tokenmerge_plan(hidden_states)
        merged = plan is not None and self._tokenmerge_state.settings.merges("attn")
        text_attention: list[Tensor] = []

        def joint_attention(x: Tensor) -> Tensor:
            def call(rows: slice, rotary: Optional[Rotary]) -> Any:
                mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask[rows]
                return self.attn(hidden_states=x[rows], encoder_hidden_states=text_normed[rows],
                                 encoder_hidden_states_mask=mask, image_rotary_emb=rotary, **extra)

            outputs = per_row(call, x.shape[0], image_rotary_emb, plan, merged, image_rows)
            text_attention.append(joined(outputs, 1))
            return gate1 * joined(outputs, 0)

        def mlp_input(x: Tensor) -> Tensor:
            modulated, gate = self._modulate(self.img_norm2(x), image_mod2)
            mlp_gate.append(gate)
            return modulated

        branches = [Branch("attn", lambda x: normed, joint_attention),
                    Branch("mlp", mlp_input, lambda x: mlp_gate[0] * self.img_mlp(x))]
        hidden_states = self.tokenmerge_run_planned(hidden_states, branches, plan)
        text = encoder_hidden_states + text_gate1 * text_attention[0]
        text_modulated, text_gate2 = self._modulate(self.txt_norm2(text), text_mod2)
        text = text + text_gate2 * self.txt_mlp(text_modulated)
        if text.dtype == torch.float16:
            text = text.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return text, hidden_states


class QwenImageFamily(Family):
    name = "Qwen-Image"
    classes = ("QwenImageTransformer2DModel",)

    def blocks(self, denoiser: nn.Module) -> list[tuple[nn.Module, Place]]:
        model: Any = denoiser
        return [(block, Place()) for block in model.transformer_blocks]

    def block_mixin(self) -> type[DiffusionBlock]:
        return QwenImageBlock

    def record_latent(self, state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
        state.latent = single_image_grid(kwargs.get("img_shapes"))


def single_image_grid(shapes: Any) -> tuple[int, int, int]:
    """(frames, rows, columns) of the one image every sample of ``img_shapes`` has (a list
    per sample of (frames, rows, columns) tuples, or one list for every sample); a
    ValueError for several images or samples of different grids."""
    if not shapes:
        raise ValueError("tokenmerge reads Qwen-Image's image grid from img_shapes; pass img_shapes to the transformer")
    per_sample = [shapes] if isinstance(shapes[0], tuple) else shapes
    grids = {tuple(grid) for sample in per_sample for grid in (sample if isinstance(sample, list) else [sample])}
    if len(grids) != 1 or any(isinstance(sample, list) and len(sample) != 1 for sample in per_sample):
        raise ValueError(f"tokenmerge merges Qwen-Image's tokens of one image grid per sample; img_shapes is {shapes}")
    frames, rows, columns = grids.pop()
    return int(frames), int(rows), int(columns)


FAMILY = QwenImageFamily()
