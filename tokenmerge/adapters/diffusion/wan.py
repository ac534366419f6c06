"""Wan 2.1 and 2.2 (``WanTransformer3DModel``, text-to-video and image-to-video): ToMe
for Stable Diffusion over the video tokens, every merged token at its 3D rotary
position.

A ``WanTransformerBlock`` reads as three branches: self-attention over the video tokens
(``attn``, rotated by the 3D RoPE of frame, row and column), cross-attention to the
text (and image) tokens (``crossattn``: video queries merged, keys and values as they
are) and the MLP (``mlp``). Destinations are one per ``sx`` x ``sy`` cell of every
latent frame; a source joins its most similar destination in any frame, so that what
stays still over time merges too. A branch run on merged tokens gets the
rotary table of the tokens it sees, every merged token at the position of the token it
sits at; Wan's table broadcasts over the batch, so every row takes its own in one call.
Text tokens are never merged: they only enter as keys and values.

Wan 2.2's per-token timestep (TI2V, ``expand_timesteps``) modulates every token on its
own and is refused while merging.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .base import Branch, DiffusionBlock, DiffusionState, Family, Place, Plan, record_patched_latent

Rotary = tuple[Tensor, Tensor]


def merged_rotary(rotary: Rotary, plan: Plan) -> Rotary:
    """Wan's (1, N, 1, D) rotary tables at the token every merged token sits at:
    (B, N - r, 1, D), one table per batch row."""
    positions = plan.positions()
    return rotary[0][0][positions], rotary[1][0][positions]


class WanBlock(DiffusionBlock):
    """``WanTransformerBlock`` read as its branches."""

    norm1: nn.Module
    norm2: nn.Module
    norm3: nn.Module
    attn1: nn.Module
    attn2: nn.Module
    ffn: nn.Module
    scale_shift_table: Tensor

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                rotary_emb: Optional[Rotary]) -> Tensor:
        if temb.ndim == 4:
            raise TypeError("tokenmerge does not merge tokens under Wan 2.2's per-token timesteps "
                            "(expand_timesteps); remove tokenmerge for this pipeline")
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()).chunk(6, dim=1)
        plan = self.tokenmerge_plan(hidden_states)
        full = hidden_states.shape[1]

        def self_attention(x: Tensor) -> Tensor:
            rotary = rotary_emb
            if plan is not None and rotary is not None and x.shape[1] != full:
                rotary = merged_rotary(rotary, plan)
            return (self.attn1(x, None, None, rotary) * gate_msa).type_as(x)

        def mlp_input(x: Tensor) -> Tensor:
            return (self.norm3(x.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(x)

        branches = [
            Branch("attn", lambda x: (self.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x),
                   self_attention),
            Branch("crossattn", lambda x: self.norm2(x.float()).type_as(x),
                   lambda x: self.attn2(x, encoder_hidden_states, None, None)),
            Branch("mlp", mlp_input, lambda x: (self.ffn(x).float() * c_gate_msa).type_as(x)),
        ]
        return self.tokenmerge_run_planned(hidden_states, branches, plan)


class WanFamily(Family):
    name = "Wan"
    classes = ("WanTransformer3DModel",)

    def blocks(self, denoiser: nn.Module) -> list[tuple[nn.Module, Place]]:
        model: Any = denoiser
        place = Place(model.config.patch_size[1])
        return [(block, place) for block in model.blocks]

    def block_mixin(self) -> type[DiffusionBlock]:
        return WanBlock

    def check(self, denoiser: nn.Module) -> None:
        patch_size = tuple(denoiser.config.patch_size)  # type: ignore[union-attr,arg-type]
        if patch_size[0] != 1 or patch_size[1] != patch_size[2]:
            raise TypeError(f"tokenmerge merges Wan transformers with patches of (1, p, p), as Wan 2.x has; "
                            f"this WanTransformer3DModel has patch_size={patch_size}")

    def record_latent(self, state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
        record_patched_latent(state, args, kwargs)


FAMILY = WanFamily()
