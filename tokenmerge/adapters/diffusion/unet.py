"""Stable Diffusion UNets (``UNet2DConditionModel``: SD 1.x, 2.x, SDXL and their
fine-tunes): ToMe for Stable Diffusion, the same merges as tomesd's.

Every ``BasicTransformerBlock`` of the UNet sits at a downsample level: the levels of
its down blocks, doubling after every block with a downsampler, the mid block at the
deepest, and the up blocks halving after every upsampler. The blocks at most
``max_downsample`` times downsampled merge; by default that is the first level that
has attention (1 for SD 1.x and 2.x, 2 for SDXL, whose first level has none), and a
setting that would merge in no block is an error naming the levels that have attention.
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
    Settings,
    attention_kwargs,
    feed_forward,
    with_defaults,
)


class UNetBlock(DiffusionBlock):
    """``BasicTransformerBlock`` with ``norm_type="layer_norm"``, read as its three branches."""

    # the attributes of diffusers' BasicTransformerBlock that the branches use
    norm1: nn.Module
    norm2: nn.Module
    norm3: nn.Module
    attn1: nn.Module
    attn2: Optional[nn.Module]
    ff: nn.Module
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

        def self_attention(x: Tensor) -> Tensor:
            context = encoder_hidden_states if self.only_cross_attention else None
            return self.attn1(x, encoder_hidden_states=context, attention_mask=attention_mask, **extra)

        def cross_attention(x: Tensor) -> Tensor:
            assert self.attn2 is not None
            return self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                              **extra)

        branches = [Branch("attn", self.norm1, self_attention)]
        if self.attn2 is not None:
            branches.append(Branch("crossattn", self.norm2, cross_attention))
        branches.append(Branch("mlp", self.norm3, lambda x: feed_forward(self, self.ff, x)))
        return self.tokenmerge_run(hidden_states, branches)


class UNetFamily(Family):
    name = "Stable Diffusion UNet"
    classes = ("UNet2DConditionModel",)

    def blocks(self, denoiser: nn.Module) -> list[tuple[nn.Module, Place]]:
        """Every BasicTransformerBlock with its downsample level, in the order tokens meet them."""
        unet: Any = denoiser
        found: list[tuple[nn.Module, Place]] = []
        step = 1
        for stage in unet.down_blocks:
            found += [(block, Place(step)) for block in _transformer_blocks(stage)]
            step *= 2 if getattr(stage, "downsamplers", None) else 1
        if unet.mid_block is not None:
            found += [(block, Place(step)) for block in _transformer_blocks(unet.mid_block)]
        for stage in unet.up_blocks:
            found += [(block, Place(step)) for block in _transformer_blocks(stage)]
            step //= 2 if getattr(stage, "upsamplers", None) else 1
        return found

    def block_mixin(self) -> type[DiffusionBlock]:
        return UNetBlock

    def check(self, denoiser: nn.Module) -> None:
        for block, _ in self.blocks(denoiser):
            if block.norm_type != "layer_norm" or block.pos_embed is not None:
                raise TypeError(f"tokenmerge merges UNet blocks with norm_type='layer_norm' and no positional "
                                f"embedding, as Stable Diffusion's are; this UNet2DConditionModel has "
                                f"norm_type={block.norm_type!r}")

    def settings(self, denoiser: nn.Module, settings: Settings) -> Settings:
        levels = sorted({place.downsample for _, place in self.blocks(denoiser)})
        if not levels:
            raise ValueError("this UNet2DConditionModel has no attention blocks: token merging has nothing to merge")
        settings = with_defaults(settings, max_downsample=levels[0])
        assert settings.max_downsample is not None
        if settings.max_downsample < levels[0]:
            raise ValueError(
                f"max_downsample={settings.max_downsample} merges in no block of this UNet2DConditionModel: its "
                f"attention is at downsample {', '.join(map(str, levels))}; give max_downsample >= {levels[0]}")
        return settings

    def record_latent(self, state: DiffusionState, args: tuple, kwargs: dict[str, Any]) -> None:
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        state.latent = (1, sample.shape[-2], sample.shape[-1])


def _transformer_blocks(stage: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return [module for module in stage.modules() if isinstance(module, BasicTransformerBlock)]


FAMILY = UNetFamily()
