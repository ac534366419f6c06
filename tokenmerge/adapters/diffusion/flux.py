"""Flux.1 (``FluxTransformer2DModel``): ToMe for Stable Diffusion in the double-stream
and the single-stream blocks, every merged token at its rotary position.

A double-stream block (``FluxTransformerBlock``) reads as its image branches, the
joint attention (``attn``) and the image MLP (``mlp``), with the text stream alongside,
never merged. A single-stream block (``FluxSingleTransformerBlock``) runs attention and
MLP side by side on the joint sequence [text | image]: it is one branch, ``attn``, in
which the text tokens lead, protected. Flux rotates queries and keys by the 3-axis
positions of ``txt_ids`` and ``img_ids``: a branch run on merged tokens gets the rotary
table of the tokens it sees, every merged token at the position of the token it sits
at (a destination's, or a kept source's own). diffusers' tables have no batch axis, so
such a branch runs one batch row at a time; batch 1, Flux's usual, runs as one.

The token grid is read off ``img_ids`` (rows and columns, raster order, as Flux's
pipelines write them); a call whose image tokens are no single grid (reference-image
tokens appended, as in Kontext) is an error.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from .base import Branch, DiffusionBlock, DiffusionState, Family, Place, Plan, TextLeadingBlock

Rotary = tuple[Tensor, Tensor]


def rotary_rows(rotary: Rotary, text: int, positions: Tensor) -> Rotary:
    """The rotary table of [text | merged image] tokens: the text rows as they are,
    then the row of the image token every merged token sits at."""
    rows = torch.cat([torch.arange(text, device=positions.device), text + positions])
    return rotary[0][rows], rotary[1][rows]


def per_row(call: Callable[[slice, Any], Any], batch: int, rotary: Any, plan: Optional[Plan], merged: bool,
            at_positions: Callable[[Any, Tensor], Any]) -> list[Any]:
    """``call(rows, table)`` for the whole batch where its tokens are not merged (or no
    table rotates them), else for every row with that row's rotary table,
    ``at_positions(rotary, positions)`` of the image tokens its merged tokens sit at."""
    if not merged or rotary is None or plan is None:
        return [call(slice(None), rotary)]
    positions = plan.positions()
    return [call(slice(row, row + 1), at_positions(rotary, positions[row])) for row in range(batch)]


def text_first_rows(text: int) -> Callable[[Rotary, Tensor], Rotary]:
    """:func:`rotary_rows` of a table over [``text`` text tokens | image tokens]."""
    return lambda rotary, positions: rotary_rows(rotary, text, positions)


def joined(outputs: list[Any], index: int) -> Tensor:
    """Output ``index`` of every row's call, as one batch."""
    parts = [output[index] for output in outputs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class FluxDoubleBlock(DiffusionBlock):
    """``FluxTransformerBlock`` read as its image branches; the text stream alongside."""

    norm1: Any
    norm1_context: Any
    norm2: nn.Module
    norm2_context: nn.Module
    attn: nn.Module
    ff: nn.Module
    ff_context: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        image_rotary_emb: Optional[Rotary] = None,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
    ) -> tuple[Tensor, Tensor]:
        extra = joint_attention_kwargs or {}
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        context_normed, *context_modulation = self.norm1_context(encoder_hidden_states, emb=temb)
        plan = self.tokenmerge_plan(hidden_states)
        merged = plan is not None and self._tokenmerge_state.settings.merges("attn")
        context_attention: list[Tensor] = []

        def joint_attention(x: Tensor) -> Tensor:
            def call(rows: slice, rotary: Optional[Rotary]) -> Any:
                outputs = self.attn(hidden_states=x[rows], encoder_hidden_states=context_normed[rows],
                                    image_rotary_emb=rotary, **extra)
                if len(outputs) != 2:
                    raise TypeError("tokenmerge does not merge tokens under Flux's IP-Adapter attention; "
                                    "remove tokenmerge to use an IP-Adapter")
                return outputs

            outputs = per_row(call, x.shape[0], image_rotary_emb, plan, merged,
                              text_first_rows(encoder_hidden_states.shape[1]))
            context_attention.append(joined(outputs, 1))
            return gate_msa.unsqueeze(1) * joined(outputs, 0)

        def mlp_input(x: Tensor) -> Tensor:
            return self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]

        branches = [Branch("attn", lambda x: normed, joint_attention),
                    Branch("mlp", mlp_input, lambda x: gate_mlp.unsqueeze(1) * self.ff(x))]
        hidden_states = self.tokenmerge_run_planned(hidden_states, branches, plan)
        text = self._text_stream(encoder_hidden_states, context_attention[0], context_modulation)
        return text, hidden_states

    def _text_stream(self, text: Tensor, attention: Tensor, modulation: list[Tensor]) -> Tensor:
        """The text tokens after the block, as diffusers computes them: never merged."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        text = text + gate_msa.unsqueeze(1) * attention
        normed = self.norm2_context(text) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        text = text + gate_mlp.unsqueeze(1) * self.ff_context(normed)
        return text.clip(-65504, 65504) if text.dtype == torch.float16 else text


class FluxSingleBlock(TextLeadingBlock):
    """``FluxSingleTransformerBlock``: one branch over [text | image], text protected."""

    norm: Any
    proj_mlp: nn.Module
    act_mlp: nn.Module
    proj_out: nn.Module
    attn: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        image_rotary_emb: Optional[Rotary] = None,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
    ) -> tuple[Tensor, Tensor]:
        extra = joint_attention_kwargs or {}
        text = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        normed, gate = self.norm(tokens, emb=temb)
        plan = self.tokenmerge_plan(tokens)
        merged = plan is not None and self._tokenmerge_state.settings.merges("attn")

        def attention_and_mlp(x: Tensor) -> Tensor:
            def call(rows: slice, rotary: Optional[Rotary]) -> Tensor:
                return self.attn(hidden_states=x[rows], image_rotary_emb=rotary, **extra)

            rows = per_row(call, x.shape[0], image_rotary_emb, plan, merged, text_first_rows(text))
            attention = joined([(out,) for out in rows], 0)
            mlp = self.act_mlp(self.proj_mlp(x))
            return gate.unsqueeze(1) * self.proj_out(torch.cat([attention, mlp], dim=2))

        tokens = self.tokenmerge_run_planned(tokens, [Branch("attn", lambda x: normed, attention_and_mlp)], plan)
        if tokens.dtype == torch.float16:
            tokens = tokens.clip(-65504, 65504)
        return tokens[:, :text], tokens[:, text:]


class FluxFamily(Family):
    """Flux.1, and the shape FLUX.2 shares: double-stream blocks (``transformer_blocks``),
    then single-stream blocks (``single_transformer_blocks``), the grid read off ``img_ids``."""

    name = "Flux"
    classes = ("FluxTransformer2DModel",)
    #: The mixins of the double- and the single-stream blocks.
    double_block: ClassVar[type[DiffusionBlock]] = FluxDoubleBlock
    single_block: ClassVar[type[DiffusionBlock]] = FluxSingleBlock
    #: Where the transformer's forward takes ``img_ids`` among its positional arguments.
    img_ids_argument: ClassVar[int] = 4

    def blocks(self, denoiser: nn.Module) -> list[tuple[nn.Module, Place]]:
        model: Any = denoiser
        return [(block, Place()) for block in (*model.transformer_blocks, *model.single_transformer_blocks)]

    def block_mixin(self) -> type[DiffusionBlock]:
        return self.double_block

    def mixin_for(self, block: nn.Module) -> type[DiffusionBlock]:
        return self.single_block if type(block).__name__.endswith("SingleTransformerBlock") else self.double_block

    def record_latent(self, state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
        position = self.img_ids_argument
        state.latent = image_grid(kwargs["img_ids"] if "img_ids" in kwargs
                                  else args[position] if len(args) > position else None)


def image_grid(ids: Optional[Tensor]) -> tuple[int, int, int]:
    """(1, rows, columns) of the image tokens whose Flux positions ``ids`` (N, 3) or
    (1, N, 3) are; a ValueError where they hold more or fewer tokens than one grid."""
    if ids is None:
        raise ValueError("tokenmerge reads Flux's image grid from img_ids; pass img_ids to the transformer")
    ids = ids.reshape(-1, ids.shape[-1])
    rows, columns = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * columns != ids.shape[0]:
        raise ValueError(f"tokenmerge merges Flux's image tokens of one grid; img_ids holds {ids.shape[0]} tokens, "
                         f"not the {rows} x {columns} of one grid (reference images appended?)")
    return 1, rows, columns


FAMILY = FluxFamily()
