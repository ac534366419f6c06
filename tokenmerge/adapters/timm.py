"""timm: ``VisionTransformer`` and ``VisionTransformerDistilled`` built from ``Block``
and ``Attention``, with every feature those classes offer (LayerScale, q/k-norm,
scale norms, drop path, gated attention, class/distillation/register tokens,
``token``/``avg``/``avgmax``/``max``/``map`` pooling, dynamic image size,
gradient checkpointing)."""
from __future__ import annotations

from functools import partial
from typing import Optional, cast

import torch
from timm.layers import Attention, AttentionPoolLatent, PatchEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from ..attention import log_size_bias, proportional_attention
from ..block import MergingBlock, Projected
from ..flops import FlopShape, linear_flops_per_token
from ..merge import weighted_mean
from ..state import MergeState, Pass
from .base import Adapter

SUPPORTED = (
    "timm VisionTransformer and VisionTransformerDistilled with timm.models.vision_transformer.Block "
    "and timm.layers.Attention blocks, pooling token, avg, avgmax, max or map"
)
SUPPORTED_MODELS = (VisionTransformer, VisionTransformerDistilled)
SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "")


class TimmAdapter(Adapter):
    supported = SUPPORTED

    def check(self, model: torch.nn.Module) -> None:
        if type(model) not in SUPPORTED_MODELS:
            raise TypeError(f"tokenmerge does not support timm's {type(model).__name__}. Supported: {SUPPORTED}")
        vit = _vit(model)
        for index, block in enumerate(vit.blocks):
            if type(block) is not Block:
                raise TypeError(
                    f"tokenmerge does not support block class {type(block).__name__} (blocks.{index}). "
                    f"Supported: {SUPPORTED}"
                )
            if type(block.attn) is not Attention:
                raise TypeError(
                    f"tokenmerge does not support attention class {type(block.attn).__name__} "
                    f"(blocks.{index}.attn). Supported: {SUPPORTED}"
                )
        if vit.attn_pool is not None:
            if type(vit.attn_pool) is not AttentionPoolLatent:
                raise TypeError(
                    f"tokenmerge does not support pooling module {type(vit.attn_pool).__name__}. "
                    f"Supported: {SUPPORTED}"
                )
            if vit.attn_pool.pos_embed is not None:
                raise TypeError(
                    "tokenmerge does not support AttentionPoolLatent with its own position embedding "
                    "(pos_embed='abs'): it needs an unmerged token grid"
                )
        elif vit.global_pool not in SUPPORTED_POOLS:
            raise TypeError(f"tokenmerge does not support global_pool={vit.global_pool!r}. Supported: {SUPPORTED}")

    def input_size(self, model: torch.nn.Module) -> tuple[int, int]:
        return tuple(_vit(model).patch_embed.img_size)

    def token_layout(self, model: torch.nn.Module, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        vit = _vit(model)
        embed: PatchEmbed = vit.patch_embed
        if img_size is None:
            num_patches = embed.num_patches
        else:
            height, width = embed.dynamic_feat_size(img_size)
            num_patches = height * width
        return num_patches + vit.num_prefix_tokens, vit.num_prefix_tokens

    def flop_shape(self, model: torch.nn.Module, img_size: Optional[tuple[int, int]] = None) -> FlopShape:
        vit = _vit(model)
        num_patches = self.token_layout(model, img_size)[0] - vit.num_prefix_tokens
        heads: list[torch.nn.Module] = [vit.head]
        if hasattr(vit, "head_dist"):
            heads.append(cast(VisionTransformerDistilled, vit).head_dist)
        head = sum(linear_flops_per_token(head) for head in heads)
        head_per_token = 0
        if vit.attn_pool is not None:
            per_image, head_per_token = _attention_pool_flops(vit.attn_pool)
            unseen = 0 if vit.pool_include_prefix else vit.num_prefix_tokens
            head += per_image - unseen * head_per_token
        blocks = _blocks(vit)
        attentions = [_attention(block) for block in blocks]
        return FlopShape(
            stem=num_patches * 2 * vit.patch_embed.proj.weight[0].numel() * vit.embed_dim,
            head=head,
            attention_linear=tuple(linear_flops_per_token(attention) for attention in attentions),
            mlp_linear=tuple(linear_flops_per_token(block.mlp) for block in blocks),
            attention_width=tuple(attention.attn_dim for attention in attentions),
            key_size=tuple(attention.head_dim for attention in attentions),
            head_per_token=head_per_token,
        )

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(_vit(model).blocks)

    def block_mixin(self, model: torch.nn.Module) -> type[MergingBlock]:
        return MergingTimmBlock

    def num_protected(self, model: torch.nn.Module) -> int:
        return _vit(model).num_prefix_tokens

    def mixins(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, type]]:
        return [(model, MergingVisionTransformer)]


def _vit(model: torch.nn.Module) -> VisionTransformer:
    """The model, a VisionTransformer (or VisionTransformerDistilled) once :meth:`TimmAdapter.check` passed."""
    return cast(VisionTransformer, model)


def _blocks(vit: VisionTransformer) -> list[Block]:
    """The model's blocks, each a ``Block`` once :meth:`TimmAdapter.check` passed."""
    return cast(list[Block], list(vit.blocks))


def _attention(block: Block) -> Attention:
    """The block's attention, an ``Attention`` once :meth:`TimmAdapter.check` passed."""
    return cast(Attention, block.attn)


def _attention_pool_flops(pool: AttentionPoolLatent) -> tuple[int, int]:
    """FLOPs of attention pooling: per image (its latent queries, output projection and
    MLP) and per token pooled (its keys and values, and the latents' attention over it)."""
    latent_len, width = pool.latent_len, cast(torch.nn.Linear, pool.q).out_features
    per_image = latent_len * (linear_flops_per_token(pool.q) + linear_flops_per_token(pool.proj)
                              + (linear_flops_per_token(pool.mlp) if pool.mlp is not None else 0))
    return per_image, linear_flops_per_token(pool.kv) + 4 * latent_len * width


def timm_project(attn: Attention, x: Tensor) -> Projected:
    """timm ``Attention.forward`` up to its (normed) queries, keys and values
    (B, heads, N, head_dim); the gate, if the attention has one, rides along."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return Projected(attn.q_norm(q), attn.k_norm(k), v, gate)


def timm_attend(attn: Attention, projected: Projected, size: Optional[Tensor]) -> Tensor:
    """The rest of timm ``Attention.forward`` after :func:`timm_project`, with
    proportional attention: key j counts ``size[j]`` times."""
    q, k, v, gate = projected
    B, _, N, _ = q.shape
    out = proportional_attention(
        q, k, v, size, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class MergingTimmBlock(MergingBlock):
    """timm ``Block`` that merges tokens between its attention and MLP branches."""

    # What the mixin reads of the timm ``Block`` it is mixed into.
    attn: Attention
    norm1: torch.nn.Module
    ls1: torch.nn.Module
    drop_path1: torch.nn.Module
    norm2: torch.nn.Module
    mlp: torch.nn.Module
    ls2: torch.nn.Module
    drop_path2: torch.nn.Module

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("tokenmerge does not support attn_mask or is_causal in timm blocks")
        # the host class, timm's Block, defines forward
        return self.tokenmerge_forward(x, partial(super().forward, x))  # type: ignore[misc]

    def tokenmerge_project(self, x: Tensor, run: Pass) -> Projected:
        return timm_project(self.attn, self.norm1(x))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor]) -> Tensor:
        return self.drop_path1(self.ls1(timm_attend(self.attn, projected, size)))

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MergingVisionTransformer:
    """timm ``VisionTransformer`` whose pooling weighs tokens by the patches they stand for."""

    # What the mixin reads of the timm ``VisionTransformer`` it is mixed into.
    _tokenmerge_state: MergeState
    patch_embed: PatchEmbed
    num_prefix_tokens: int
    global_pool: str
    pool_include_prefix: bool
    attn_pool: Optional[AttentionPoolLatent]

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        # the host class, timm's VisionTransformer, defines forward_features (and pool, below)
        out = super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        return self._tokenmerge_state.passes.adopt(out)

    def forward_intermediates(self, *args, **kwargs):
        if self._tokenmerge_state.merges_anything():
            raise NotImplementedError(
                "forward_intermediates returns token grids, which merged tokens no longer form; "
                "use forward_features, or set r=0"
            )
        return super().forward_intermediates(*args, **kwargs)

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        run = self._tokenmerge_state.passes.pass_of(x, self.patch_embed.num_patches + self.num_prefix_tokens)
        size = None if run is None else run.size
        pool_type = self.global_pool if pool_type is None else pool_type
        if run is None or size is None or (self.attn_pool is None and pool_type in ("", "token", "max")):
            return super().pool(x, pool_type)  # type: ignore[misc]
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        if self.attn_pool is not None:
            return self.attn_pool(x, attn_mask=log_size_bias(size, x.dtype) if run.settings.prop_attn else None)
        mean = weighted_mean(x, size)
        if pool_type == "avg":
            return mean
        if pool_type == "avgmax":
            return 0.5 * (x.amax(dim=1) + mean)
        raise NotImplementedError(f"tokenmerge does not support global_pool={pool_type!r}")


ADAPTER = TimmAdapter()
