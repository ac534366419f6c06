"""timm: ``VisionTransformer`` and ``VisionTransformerDistilled`` built from ``Block``
and ``Attention``, and ``Eva`` (EVA-02, DINOv3, the Perception Encoder, RoPE-ViT) built
from ``EvaBlock`` or ``EvaBlockPostNorm`` with ``EvaAttention`` or ``AttentionRope``,
with every feature those classes offer (LayerScale, q/k-norm, scale norms, drop path,
gated attention, grouped-query attention, SwiGLU and other MLPs, class, distillation
and register tokens, ``token``/``avg``/``avgmax``/``max``/``map`` pooling, dynamic
image size, patch dropout, gradient checkpointing).

Rotary embeddings (Eva's ``rope_type`` ``cat``, ``mixed``, ``dinov3`` and ``mrope``)
follow the merges as :mod:`tokenmerge.rope` describes: a merged token keeps the
position of the token it was merged into (``MergingEvaBlock.rope_rule``).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Union, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, AttentionRope, PatchEmbed, apply_rot_embed_cat
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingCat,
    RotaryEmbeddingDinoV3,
    RotaryEmbeddingMixed,
    RotaryEmbeddingMRope,
)
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from .. import rope
from ..attention import log_size_bias, proportional_attention
from ..block import MergingBlock, Projected
from ..flops import FlopShape, linear_flops_per_token
from ..merge import weighted_mean
from ..state import MergeState, Pass
from .base import Adapter

SUPPORTED = (
    "timm VisionTransformer and VisionTransformerDistilled with timm.models.vision_transformer.Block "
    "and timm.layers.Attention blocks, and timm Eva with EvaBlock or EvaBlockPostNorm blocks, EvaAttention or "
    "AttentionRope attention and rope_type cat, mixed, dinov3 or mrope; pooling token, avg, avgmax, max or map"
)
SUPPORTED_MODELS = (VisionTransformer, VisionTransformerDistilled, Eva)
SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "")
EVA_BLOCKS = (EvaBlock, EvaBlockPostNorm)
EVA_ATTENTIONS = (EvaAttention, AttentionRope)
EVA_ROPES = (RotaryEmbeddingCat, RotaryEmbeddingMixed, RotaryEmbeddingDinoV3, RotaryEmbeddingMRope)

Model = Union[VisionTransformer, Eva]


class TimmAdapter(Adapter):
    supported = SUPPORTED

    def check(self, model: torch.nn.Module) -> None:
        if type(model) not in SUPPORTED_MODELS:
            raise TypeError(f"tokenmerge does not support timm's {type(model).__name__}. Supported: {SUPPORTED}")
        if isinstance(model, Eva):
            _check_eva(model)
            _check_pooling(model.attn_pool, model.global_pool)
            return
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
        _check_pooling(vit.attn_pool, vit.global_pool)

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
            unseen = 0 if getattr(vit, "pool_include_prefix", True) else vit.num_prefix_tokens
            head += per_image - unseen * head_per_token
        blocks = cast(list[Block], list(vit.blocks))  # or Eva blocks, with the same attributes here
        attentions = [cast(Attention, block.attn) for block in blocks]
        return FlopShape(
            stem=num_patches * 2 * vit.patch_embed.proj.weight[0].numel() * vit.embed_dim,
            head=head,
            attention_linear=tuple(linear_flops_per_token(attention) for attention in attentions),
            mlp_linear=tuple(linear_flops_per_token(block.mlp) for block in blocks),
            attention_width=tuple(attention.head_dim * attention.num_heads for attention in attentions),
            key_size=tuple(attention.head_dim for attention in attentions),
            head_per_token=head_per_token,
        )

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(_vit(model).blocks)

    def block_mixin(self, model: torch.nn.Module) -> type[MergingBlock]:
        if not isinstance(model, Eva):
            return MergingTimmBlock
        return MergingEvaPostNormBlock if isinstance(model.blocks[0], EvaBlockPostNorm) else MergingEvaBlock

    def num_protected(self, model: torch.nn.Module) -> int:
        return _vit(model).num_prefix_tokens

    def mixins(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, type]]:
        return [(model, MergingEva if isinstance(model, Eva) else MergingVisionTransformer)]


def _vit(model: torch.nn.Module) -> VisionTransformer:
    """The model, a VisionTransformer (or VisionTransformerDistilled, or an Eva, which
    has the same attributes where the adapter reads them) once :meth:`TimmAdapter.check` passed."""
    return cast(VisionTransformer, model)


def _check_eva(model: Eva) -> None:
    """Refuse, by name, the parts of an Eva that the merging Eva block does not reproduce."""
    block_types = {type(block) for block in model.blocks}
    if len(block_types) != 1 or not block_types <= set(EVA_BLOCKS):
        names = ", ".join(sorted(cls.__name__ for cls in block_types))
        raise TypeError(f"tokenmerge does not support Eva blocks of class {names}. Supported: {SUPPORTED}")
    for index, block in enumerate(model.blocks):
        if type(block.attn) not in EVA_ATTENTIONS:
            raise TypeError(
                f"tokenmerge does not support attention class {type(block.attn).__name__} (blocks.{index}.attn). "
                f"Supported: {SUPPORTED}"
            )
    if model.rope is not None and type(model.rope) not in EVA_ROPES:
        raise TypeError(
            f"tokenmerge does not support Eva's rotary embedding {type(model.rope).__name__}. Supported: {SUPPORTED}"
        )


def _check_pooling(attn_pool: Optional[torch.nn.Module], global_pool: str) -> None:
    if attn_pool is not None:
        if type(attn_pool) is not AttentionPoolLatent:
            raise TypeError(
                f"tokenmerge does not support pooling module {type(attn_pool).__name__}. Supported: {SUPPORTED}"
            )
        if attn_pool.pos_embed is not None:
            raise TypeError(
                "tokenmerge does not support AttentionPoolLatent with its own position embedding "
                "(pos_embed='abs'): it needs an unmerged token grid"
            )
    elif global_pool not in SUPPORTED_POOLS:
        raise TypeError(f"tokenmerge does not support global_pool={global_pool!r}. Supported: {SUPPORTED}")


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


def timm_attend(attn: Union[Attention, EvaAttention, AttentionRope], projected: Projected,
                size: Optional[Tensor]) -> Tensor:
    """The rest of timm ``Attention.forward`` (and of ``EvaAttention`` and
    ``AttentionRope``) after the projections, with proportional attention: key j
    counts ``size[j]`` times."""
    q, k, v, gate = projected
    B, _, N, _ = q.shape
    out = proportional_attention(
        q, k, v, size, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.head_dim * attn.num_heads))
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


def eva_project(attn: Union[EvaAttention, AttentionRope], x: Tensor, table: Optional[Tensor]) -> Projected:
    """``EvaAttention.forward`` and ``AttentionRope.forward`` up to their queries, keys and
    values (B, heads, N, head_dim): projections (Eva's fused qkv with its zero key bias,
    or separate ones with grouped key/value heads), q/k norms, the rotary ``table`` on
    the patch tokens (see :func:`tokenmerge.rope.rope_for_tokens`), and key/value heads
    repeated for grouped-query attention; the gate, if any, rides along."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    head_dim = attn.head_dim if isinstance(attn, AttentionRope) else -1  # as each reshapes (-1 fails on no images)
    if attn.qkv is not None:
        if isinstance(attn, EvaAttention) and attn.q_bias is not None:
            bias = torch.cat((attn.q_bias, cast(Tensor, attn.k_bias), attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)
        else:
            qkv = attn.qkv(x)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = attn.num_kv_heads if isinstance(attn, AttentionRope) else attn.num_heads
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, kv_heads, head_dim).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if table is not None:
        npt, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], table, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], table, half=half)], dim=2).type_as(v)
    groups = attn.num_kv_groups if isinstance(attn, AttentionRope) else 1
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return Projected(q, k, v, gate)


class MergingEvaBlock(rope.RotaryBlock, MergingBlock):
    """timm ``EvaBlock`` that merges tokens between its attention and MLP branches; the
    rotary embeddings of its patch tokens follow the merges by ``rope_rule``
    (:class:`tokenmerge.rope.RotaryBlock`)."""

    # What the mixin reads of the timm ``EvaBlock`` it is mixed into.
    attn: Union[EvaAttention, AttentionRope]
    norm1: torch.nn.Module
    gamma_1: Optional[Tensor]
    drop_path1: torch.nn.Module
    norm2: torch.nn.Module
    mlp: torch.nn.Module
    gamma_2: Optional[Tensor]
    drop_path2: torch.nn.Module

    def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("tokenmerge does not support attn_mask or is_causal in timm Eva blocks")
        # the host class, timm's EvaBlock, defines forward
        return self.tokenmerge_forward(x, partial(super().forward, x, rope=rope), rope=rope)  # type: ignore[misc]

    def tokenmerge_rope(self, x: Tensor, run: Pass, table: Optional[Tensor]) -> Optional[Tensor]:
        """The rotary table for the (B, N, C) tokens ``x`` entering this block."""
        if table is None:
            return None
        return self.tokenmerge_rope_rows(run, table, x, self.attn.num_prefix_tokens)

    def tokenmerge_project(self, x: Tensor, run: Pass, rope: Optional[Tensor] = None) -> Projected:
        return eva_project(self.attn, self.norm1(x), self.tokenmerge_rope(x, run, rope))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], rope: Optional[Tensor] = None) -> Tensor:
        out = timm_attend(self.attn, projected, size)
        return self.drop_path1(out if self.gamma_1 is None else self.gamma_1 * out)

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        out = self.mlp(self.norm2(x))
        return self.drop_path2(out if self.gamma_2 is None else self.gamma_2 * out)


class MergingEvaPostNormBlock(MergingEvaBlock):
    """timm ``EvaBlockPostNorm`` (norms after each branch, no LayerScale) that merges
    tokens between its attention and MLP branches."""

    def tokenmerge_project(self, x: Tensor, run: Pass, rope: Optional[Tensor] = None) -> Projected:
        return eva_project(self.attn, x, self.tokenmerge_rope(x, run, rope))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], rope: Optional[Tensor] = None) -> Tensor:
        return self.drop_path1(self.norm1(timm_attend(self.attn, projected, size)))

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.norm2(self.mlp(x)))


class MergingVisionTransformer:
    """timm ``VisionTransformer`` (and ``Eva``) whose features are found by their pooling
    head, which weighs tokens by the patches they stand for, and spread back over the
    patch grid with the ``dense`` setting."""

    # What the mixin reads of the timm model it is mixed into.
    _tokenmerge_state: MergeState
    patch_embed: PatchEmbed
    num_prefix_tokens: int
    global_pool: str
    attn_pool: Optional[AttentionPoolLatent]

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        # the host class, timm's VisionTransformer or Eva, defines forward_features (and pool, below)
        out = super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        passes = self._tokenmerge_state.passes
        return passes.unmerged(passes.adopt(out))

    def forward_intermediates(self, *args, **kwargs):
        if self._tokenmerge_state.merges_anything():
            raise NotImplementedError(
                "forward_intermediates returns token grids, which merged tokens no longer form; "
                "use forward_features (with tokenmerge.apply(..., dense=True) for one token per patch), or set r=0"
            )
        return super().forward_intermediates(*args, **kwargs)

    def tokenmerge_pool_include_prefix(self, attention: bool) -> bool:
        """Whether attention pooling (or else average pooling) sees the prefix tokens."""
        return cast(VisionTransformer, self).pool_include_prefix

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        weights = self._tokenmerge_state.passes.pool_weights(x, self.patch_embed.num_patches + self.num_prefix_tokens)
        pool_type = self.global_pool if pool_type is None else pool_type
        size = weights.attention if self.attn_pool is not None else weights.mean
        if size is None or (self.attn_pool is None and pool_type in ("", "token", "max")):
            return super().pool(x, pool_type)  # type: ignore[misc]
        if not self.tokenmerge_pool_include_prefix(self.attn_pool is not None):
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        if self.attn_pool is not None:
            return self.attn_pool(x, attn_mask=log_size_bias(size, x.dtype))
        mean = weighted_mean(x, size)
        if pool_type == "avg":
            return mean
        if pool_type == "avgmax":
            return 0.5 * (x.amax(dim=1) + mean)
        raise NotImplementedError(f"tokenmerge does not support global_pool={pool_type!r}")


class MergingEva(MergingVisionTransformer):
    """timm ``Eva``: as :class:`MergingVisionTransformer`; its attention pooling sees the
    prefix tokens and its average pooling does not."""

    def tokenmerge_pool_include_prefix(self, attention: bool) -> bool:
        return attention


ADAPTER = TimmAdapter()
