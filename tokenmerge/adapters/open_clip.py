"""open_clip: ``CLIP`` and ``CustomTextCLIP`` whose visual tower is open_clip's own
``VisionTransformer``, or that ``VisionTransformer`` alone, built of
``ResidualAttentionBlock`` with ``nn.MultiheadAttention``; and those whose visual tower
is a timm model (``TimmModel``: EVA-CLIP, the Perception Encoder, timm ViTs), whose
trunk merges as :mod:`tokenmerge.adapters.timm` has it.

Only the visual tower merges; the text tower keeps its classes and computes exactly
what it computed before. Image embeddings (``encode_image``) and the image half of
zero-shot logits therefore come from merged tokens.

Supported options of the visual tower: LayerScale (``ls_init_value``), batch-first or
sequence-first transformers, gradient checkpointing, ``tok``, ``avg`` (weighted by
token size) and ``none`` pooling with the LayerNorm before or after pooling
(``final_ln_after_pool``), and ``AttentionalPooler`` pooling (``attentional_pool``
True, ``'parallel'`` or ``'cascade'``), whose keys get the log-size bias under
proportional attention. The class token, always present, is the only protected
token. CoCa is refused: its text decoder attends to the image tokens without their
sizes.

Merging changes what token outputs mean:

* with ``output_tokens=True`` or ``pool_type='none'`` the tower returns the merged
  tokens (fewer than the patches); ``tokenmerge.get_state(model).size`` gives how
  many patches each stands for, and ``source`` (with ``trace_source``) which ones;
  with the ``dense`` setting it returns one token per patch instead, each with the
  features of the token it ended in, and pools as without it;
* ``forward_intermediates`` returns patch grids, which merged tokens no longer form:
  it is refused while anything merges.

Patch dropout in training keeps a random subset of the patches; blocks then merge
among the kept tokens, so counts are lower than :func:`tokenmerge.token_counts`
reports (which, like the FLOP estimates, describe evaluation) and sizes sum to the
number of kept patches. It is refused only when it may drop the class token.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import (
    AttentionalPooler,
    PatchDropout,
    ResidualAttentionBlock,
    Transformer,
    VisionTransformer,
)
from torch import Tensor, nn

from ..block import MergingBlock, Projected
from ..flops import FlopShape, linear_flops_per_token
from ..merge import weighted_mean
from ..state import MergeState, Pass
from .base import Adapter
from .multihead import check_multihead, multihead_attend, multihead_linear_flops, multihead_project, multihead_size_mask

SUPPORTED = (
    "open_clip CLIP and CustomTextCLIP whose visual tower is open_clip.transformer.VisionTransformer, "
    "or that VisionTransformer alone, with a Transformer of ResidualAttentionBlock blocks "
    "(nn.MultiheadAttention, LayerNorm, optional LayerScale), pooling tok, avg, none or AttentionalPooler; "
    "or whose visual tower is a TimmModel with a trunk tokenmerge supports in timm (VisionTransformer, Eva) "
    "and no abs_attn or rot_attn pooling"
)
SUPPORTED_MODELS = (CLIP, CustomTextCLIP, VisionTransformer, TimmModel)
SUPPORTED_POOLS = ("tok", "avg", "none")
SUPPORTED_ATTENTION_POOLS = ("", "parallel", "cascade")
BLOCK_CHILDREN = {"ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"}
NUM_PROTECTED = 1  # the class token


class OpenClipAdapter(Adapter):
    supported = SUPPORTED

    def check(self, model: nn.Module) -> None:
        if type(model) not in SUPPORTED_MODELS:
            raise TypeError(f"tokenmerge does not support open_clip's {type(model).__name__}. Supported: {SUPPORTED}")
        tower = _timm_tower(model)
        if tower is not None:
            pool = getattr(tower.head, "pool", None)
            if pool is not None:
                raise TypeError(
                    f"tokenmerge does not support TimmModel pooling {type(pool).__name__}: it pools a "
                    f"2D grid of patch tokens, which merged tokens no longer form. Supported: {SUPPORTED}"
                )
            _timm_adapter().check(tower.trunk)
            return
        visual = _vision_tower(model)
        prefix = "" if visual is model else "visual."
        if type(visual) is not VisionTransformer:
            raise TypeError(
                f"tokenmerge does not support visual tower class {type(visual).__name__} (visual). "
                f"Supported: {SUPPORTED}"
            )
        transformer = visual.transformer
        if type(transformer) is not Transformer:
            raise TypeError(
                f"tokenmerge does not support transformer class {type(transformer).__name__} "
                f"({prefix}transformer). Supported: {SUPPORTED}"
            )
        for index, block in enumerate(transformer.resblocks):
            _check_block(block, transformer.batch_first, f"{prefix}transformer.resblocks.{index}")
        _check_pooling(visual, prefix)
        _check_patch_dropout(visual.patch_dropout, f"{prefix}patch_dropout")

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return tuple(_vision_tower(model).image_size)

    def token_layout(self, model: nn.Module, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        tower = _timm_tower(model)
        if tower is not None:
            return _timm_adapter().token_layout(tower.trunk, img_size)
        _check_img_size(model, img_size)
        grid_height, grid_width = _vision_tower(model).grid_size
        return grid_height * grid_width + NUM_PROTECTED, NUM_PROTECTED

    def flop_shape(self, model: nn.Module, img_size: Optional[tuple[int, int]] = None) -> FlopShape:
        tower = _timm_tower(model)
        if tower is not None:
            shape = _timm_adapter().flop_shape(tower.trunk, img_size)
            return dataclasses.replace(shape, head=shape.head + linear_flops_per_token(tower.head))
        num_tokens = self.token_layout(model, img_size)[0]
        visual = _vision_tower(model)
        blocks = list(visual.transformer.resblocks)
        # The head's cost is affine in the number of tokens reaching it: a fixed part, and
        # a part per token (an attention pooler's keys and values, projections under 'none').
        head_per_token = _head_flops(visual, num_tokens) - _head_flops(visual, num_tokens - 1)
        return FlopShape(
            stem=(num_tokens - NUM_PROTECTED) * 2 * visual.conv1.weight.numel(),
            head=_head_flops(visual, num_tokens) - num_tokens * head_per_token,
            head_per_token=head_per_token,
            attention_linear=tuple(multihead_linear_flops(block.attn) for block in blocks),
            mlp_linear=tuple(linear_flops_per_token(block.mlp) for block in blocks),
            attention_width=tuple(block.attn.embed_dim for block in blocks),
            key_size=tuple(block.attn.head_dim for block in blocks),
        )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        tower = _timm_tower(model)
        if tower is not None:
            return list(_timm_adapter().blocks(tower.trunk))
        return list(_vision_tower(model).transformer.resblocks)

    def block_mixin(self, model: nn.Module) -> type[MergingBlock]:
        tower = _timm_tower(model)
        return MergingResidualAttentionBlock if tower is None else _timm_adapter().block_mixin(tower.trunk)

    def num_protected(self, model: nn.Module) -> int:
        tower = _timm_tower(model)
        return NUM_PROTECTED if tower is None else _timm_adapter().num_protected(tower.trunk)

    def mixins(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        tower = _timm_tower(model)
        if tower is not None:
            return _timm_adapter().mixins(tower.trunk)
        visual = _vision_tower(model)
        return [(visual.transformer, MergingTransformer), (visual, MergingVisionTransformer)]


def _timm_tower(model: nn.Module) -> Optional[TimmModel]:
    """The model's visual tower if it is a timm model (or the model itself, one)."""
    tower = model if isinstance(model, TimmModel) else getattr(model, "visual", None)
    return tower if isinstance(tower, TimmModel) else None


def _timm_adapter() -> Adapter:
    """The timm adapter, for timm-backed towers (imported when one is met: a TimmModel
    exists only where timm is installed)."""
    from .timm import ADAPTER

    return ADAPTER


def _check_block(block: ResidualAttentionBlock, batch_first: bool, where: str) -> None:
    if type(block) is not ResidualAttentionBlock:
        raise TypeError(
            f"tokenmerge does not support block class {type(block).__name__} ({where}). Supported: {SUPPORTED}"
        )
    extra = {name for name, _ in block.named_children()} - BLOCK_CHILDREN
    if extra:
        # ln_1_kv: a cross-attention block
        raise TypeError(
            f"tokenmerge does not support ResidualAttentionBlock with {', '.join(sorted(extra))} ({where}). "
            f"Supported: {SUPPORTED}"
        )
    check_multihead(block.attn, f"{where}.attn")
    if block.attn.batch_first != batch_first:
        raise TypeError(
            f"tokenmerge does not support nn.MultiheadAttention with batch_first={block.attn.batch_first} "
            f"in a Transformer with batch_first={batch_first} ({where}.attn): it attends across the batch"
        )
    for name in ("ln_1", "ln_2"):
        _check_norm(getattr(block, name), f"{where}.{name}")


def _check_norm(norm: nn.Module, where: str) -> None:
    """Refuse norms that may mix tokens: merged tokens are only exact for norms of one token."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(
            f"tokenmerge does not support norm layer {type(norm).__name__} ({where}); "
            "expected a LayerNorm over the hidden dimension"
        )


def _check_pooling(visual: VisionTransformer, prefix: str) -> None:
    if visual.pool_type not in SUPPORTED_POOLS:
        raise TypeError(f"tokenmerge does not support pool_type={visual.pool_type!r}. Supported: {SUPPORTED}")
    if visual.attn_pool is None:
        return
    if visual.attn_pool_type not in SUPPORTED_ATTENTION_POOLS:
        raise TypeError(
            f"tokenmerge does not support attentional_pool={visual.attn_pool_type!r}. Supported: {SUPPORTED}"
        )
    for name in ("attn_pool", "attn_pool_contrastive"):
        pooler = getattr(visual, name)
        if pooler is None:
            continue
        if type(pooler) is not AttentionalPooler:
            raise TypeError(
                f"tokenmerge does not support pooling module {type(pooler).__name__} ({prefix}{name}). "
                f"Supported: {SUPPORTED}"
            )
        if not isinstance(pooler.attn, nn.MultiheadAttention) or not pooler.attn.batch_first:
            raise TypeError(
                f"tokenmerge does not support AttentionalPooler attention {type(pooler.attn).__name__} "
                f"({prefix}{name}.attn); expected a batch-first nn.MultiheadAttention"
            )


def _check_patch_dropout(dropout: nn.Module, where: str) -> None:
    if type(dropout) is nn.Identity:
        return
    if type(dropout) is not PatchDropout:
        raise TypeError(
            f"tokenmerge does not support patch dropout module {type(dropout).__name__} ({where}); "
            "expected open_clip's PatchDropout"
        )
    if not dropout.exclude_first_token:
        raise TypeError(
            f"tokenmerge does not support PatchDropout with exclude_first_token=False ({where}): "
            "it may drop or move the class token, which must stay first"
        )


def _vision_tower(model: nn.Module) -> VisionTransformer:
    """The model's visual tower (or the model itself); for a TimmModel, whose
    ``image_size`` is all the adapter reads of it this way, the tower."""
    return model if isinstance(model, (VisionTransformer, TimmModel)) else model.visual


def _check_img_size(model: nn.Module, img_size: Optional[tuple[int, int]]) -> None:
    if img_size is not None and tuple(img_size) != tuple(_vision_tower(model).image_size):
        height, width = _vision_tower(model).image_size
        raise ValueError(
            f"open_clip's VisionTransformer takes only {height}x{width} inputs (its position embedding is "
            f"fixed), got {img_size[0]}x{img_size[1]}; resize the images to its image_size"
        )


def _head_flops(visual: VisionTransformer, num_tokens: int) -> int:
    """Pooling and projection when ``num_tokens`` tokens reach them."""
    if visual.attn_pool is None:
        total, num_pooled = 0, num_tokens if visual.pool_type == "none" else 1
    else:
        num_queries = visual.attn_pool.query.shape[0]
        total = _attention_pool_flops(visual.attn_pool, num_tokens)
        if visual.attn_pool_contrastive is None:
            num_pooled = num_queries if visual.pool_type == "none" else 1
        else:
            num_keys = num_tokens if visual.attn_pool_type == "parallel" else num_queries
            total += _attention_pool_flops(visual.attn_pool_contrastive, num_keys)
            num_pooled = 1
    if visual.proj is not None:
        total += num_pooled * 2 * visual.proj.numel()
    return total


def _attention_pool_flops(pooler: AttentionalPooler, num_keys: int) -> int:
    """An ``AttentionalPooler`` over ``num_keys`` tokens: projections of its queries and
    of the keys and values, the attention products, and the output projection."""
    attention = pooler.attn
    num_queries, width = pooler.query.shape
    queries = 2 * num_queries * width * width
    keys_values = 2 * num_keys * width * (attention.kdim + attention.vdim)
    products = 4 * num_queries * num_keys * width
    return queries + keys_values + products + num_queries * linear_flops_per_token(attention.out_proj)


def _switch_layout(block: ResidualAttentionBlock, x: Tensor) -> Tensor:
    """For a block whose transformer runs sequence-first: its tokens (N, B, C) as
    batch-first (B, N, C), and back. For a batch-first block: the tokens unchanged."""
    return x if block.attn.batch_first else x.transpose(0, 1)


class MergingResidualAttentionBlock(MergingBlock):
    """open_clip ``ResidualAttentionBlock`` that merges tokens between its attention
    and MLP branches."""

    # What the mixin reads of the open_clip ``ResidualAttentionBlock`` it is mixed into.
    ln_1: nn.Module
    attn: nn.MultiheadAttention
    ls_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module

    def forward(
        self,
        q_x: Tensor,
        k_x: Optional[Tensor] = None,
        v_x: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        if k_x is not None or v_x is not None:
            raise NotImplementedError("tokenmerge does not support cross attention (k_x, v_x) in open_clip blocks")
        if attn_mask is not None and self._tokenmerge_state.merges_anything():
            raise NotImplementedError(
                "tokenmerge does not support attn_mask in open_clip's visual blocks while merging: "
                "the mask no longer fits the merged tokens; set r=0 or pass no mask"
            )
        # the host class, open_clip's ResidualAttentionBlock, defines forward
        return self.tokenmerge_forward(q_x, partial(super().forward, q_x, attn_mask=attn_mask))  # type: ignore[misc]

    def tokenmerge_project(self, x: Tensor, run: Pass) -> Projected:
        return multihead_project(self.attn, self.ln_1(x))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor]) -> Tensor:
        return self.ls_1(multihead_attend(self.attn, projected, size))

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        return self.ls_2(self.mlp(self.ln_2(x)))

    def tokenmerge_tokens(self, x: Tensor) -> Tensor:
        return _switch_layout(self, x)

    def tokenmerge_layout(self, x: Tensor) -> Tensor:
        return _switch_layout(self, x)


class MergingTransformer:
    """open_clip ``Transformer`` of the visual tower, whose output (batch first again
    where its blocks ran sequence first) keeps the sizes of its last block's tokens and,
    with the ``dense`` setting, is spread back over the tokens that entered its first
    block, so that ``output_tokens`` returns one token per patch."""

    _tokenmerge_state: MergeState

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        passes = self._tokenmerge_state.passes
        # the host class, open_clip's Transformer, defines forward
        return passes.unmerged(passes.adopt(super().forward(x, attn_mask=attn_mask)))  # type: ignore[misc]


class MergingVisionTransformer:
    """open_clip ``VisionTransformer`` that pools merged tokens by the patches they stand for."""

    # What the mixin reads of the open_clip ``VisionTransformer`` it is mixed into.
    _tokenmerge_state: MergeState
    grid_size: tuple[int, int]
    attn_pool: Optional[AttentionalPooler]
    final_ln_after_pool: bool
    ln_post: nn.Module

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        if self._tokenmerge_state.merges_anything():
            raise NotImplementedError(
                "forward_intermediates returns patch grids, which merged tokens no longer form; "
                "use forward or encode_image, or set r=0"
            )
        # the host class, open_clip's VisionTransformer, defines forward_intermediates (and _pool, below)
        return super().forward_intermediates(x, *args, **kwargs)  # type: ignore[misc]

    def _pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weights = self._tokenmerge_state.passes.pool_weights(x, self.grid_size[0] * self.grid_size[1] + NUM_PROTECTED)
        size = weights.attention if self.attn_pool is not None else weights.mean
        if size is None:
            return super()._pool(x)  # type: ignore[misc]
        if self.attn_pool is not None:
            return _attention_pool_by_size(self, x, size)
        if self.final_ln_after_pool:
            pooled, tokens = _global_pool_by_size(self, x, size)
            return self.ln_post(pooled), tokens
        return _global_pool_by_size(self, self.ln_post(x), size)


def _global_pool_by_size(visual: VisionTransformer, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """``VisionTransformer._global_pool`` with the patch tokens' average weighted by size."""
    if visual.pool_type == "avg":
        patches = x[:, NUM_PROTECTED:]
        return weighted_mean(patches, size[:, NUM_PROTECTED:]), patches
    return visual._global_pool(x)


def _attention_pool_by_size(visual: VisionTransformer, x: Tensor, size: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``VisionTransformer._pool`` with attention pooling, in which the poolers that
    attend to the tokens weigh every token by its ``size`` (B, N, 1; None for no weighting)."""
    if visual.attn_pool_contrastive is None:
        # open_clip's CoCa layout: attention pooling, then the norm and pooling over the queries
        return visual._global_pool(visual.ln_post(_attention_pool(visual.attn_pool, x, size)))
    x = visual.ln_post(x)
    tokens = _attention_pool(visual.attn_pool, x, size)
    if visual.attn_pool_type == "parallel":
        return _attention_pool(visual.attn_pool_contrastive, x, size), tokens
    return visual.attn_pool_contrastive(tokens), tokens


def _attention_pool(pooler: AttentionalPooler, x: Tensor, size: Optional[Tensor]) -> Tensor:
    """``AttentionalPooler.forward`` with the log-size bias of ``size`` (B, N, 1) added
    to its attention logits, or the pooler itself without sizes."""
    if size is None:
        return pooler(x)
    keys = pooler.ln_k(x)
    queries = pooler.ln_q(pooler.query).unsqueeze(0).expand(x.shape[0], -1, -1)
    mask = multihead_size_mask(size, pooler.attn.num_heads, queries.shape[1], queries.dtype)
    return pooler.attn(queries, keys, keys, need_weights=False, attn_mask=mask)[0]



ADAPTER = OpenClipAdapter()
