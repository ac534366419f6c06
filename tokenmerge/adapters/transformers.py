"""transformers 5: ViT, DeiT, CLIP (vision tower), DINOv2 (with or without registers),
DINOv3, SigLIP (vision), VideoMAE and the Audio Spectrogram Transformer (AST) built
from their own layer and attention classes, under the ``eager`` and ``sdpa``
attention implementations.

The layers, their attention modules and the modules that pool tokens are patched; the
``PreTrainedModel`` classes whose forward records hidden states and attentions are
not, because transformers looks up what a model records by its exact class. Attention
goes through the library's own attention function for the configured implementation,
with the log-size bias as its additive attention mask. With ``output_hidden_states`` or
``output_attentions`` (eager), every layer reports the tokens it received and left, so
later layers report fewer tokens.

DINOv3's rotary embeddings follow the merges as :mod:`tokenmerge.rope` describes. A
VideoMAE token is a tubelet (frames by patch), an AST token a patch of the
spectrogram; their sizes count those. With the ``dense`` setting, ``last_hidden_state``
holds one token per input token.
"""
from __future__ import annotations

import inspect
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Optional, Protocol, TypedDict, cast

import torch
import transformers
from torch import Tensor
from transformers.configuration_utils import PretrainedConfig
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.audio_spectrogram_transformer import modeling_audio_spectrogram_transformer as ast
from transformers.models.clip import modeling_clip as clip
from transformers.models.deit import modeling_deit as deit
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as dinov2_registers
from transformers.models.dinov3_vit import modeling_dinov3_vit as dinov3
from transformers.models.siglip import modeling_siglip as siglip
from transformers.models.videomae import modeling_videomae as videomae
from transformers.models.vit import modeling_vit as vit
from transformers.utils.generic import can_return_tuple

from .. import attention as proportional
from .. import rope
from ..block import MergingBlock, Projected
from ..flops import FlopShape, linear_flops_per_token
from ..merge import weighted_mean
from ..state import MergeState, Pass
from .base import Adapter, is_swapped, original_class
from .multihead import check_multihead, multihead_size_mask

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"tokenmerge supports transformers 5, found transformers {transformers.__version__}")

SUPPORTED = (
    "transformers ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification, "
    "DeiTForImageClassificationWithTeacher, CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel "
    "(its vision tower), Dinov2Model, Dinov2ForImageClassification, Dinov2WithRegistersModel, "
    "Dinov2WithRegistersForImageClassification, DINOv3ViTModel, SiglipVisionModel, VideoMAEModel, "
    "VideoMAEForVideoClassification, ASTModel and ASTForAudioClassification, built from their own layer and "
    "attention classes, with attn_implementation eager or sdpa"
)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def _split_mask(args: tuple, kwargs: dict) -> tuple[Optional[Tensor], dict]:
    """The attention mask a forward was given after its hidden states (positionally, by
    name, or not at all: VideoMAE's forwards take none), and its other keyword arguments."""
    rest = dict(kwargs)
    mask = args[0] if args else rest.pop("attention_mask", None)
    return mask, rest


class MergingLayer(MergingBlock):
    """A transformer layer that merges tokens between its attention and MLP branches.
    Subclasses build the two residual branches the way their layer class does."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        # the host class, the library's layer class, defines forward; it gets its arguments as given
        unpatched = partial(super().forward, hidden_states, *args, **kwargs)  # type: ignore[misc]
        mask, layer_kwargs = _split_mask(args, kwargs)
        return self.tokenmerge_forward(hidden_states, unpatched, mask=mask, layer_kwargs=layer_kwargs)


class MergingViTLayer(MergingLayer):
    """ViT, DeiT and AST layers: pre-norm branches, each followed by dropout."""

    # What the mixin reads of the ViT, DeiT or AST layer it is mixed into.
    layernorm_before: torch.nn.Module
    attention: vit.ViTAttention | deit.DeiTAttention | ast.ASTAttention
    dropout: torch.nn.Module
    layernorm_after: torch.nn.Module
    mlp: torch.nn.Module

    def tokenmerge_project(self, x: Tensor, run: Pass, *, mask, layer_kwargs) -> Projected:
        return project(self.attention, self.layernorm_before(x))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], *, mask, layer_kwargs) -> Tensor:
        return self.dropout(attend(self.attention, projected, size, mask, layer_kwargs))

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        return self.dropout(self.mlp(self.layernorm_after(x)))


class MergingCLIPLayer(MergingLayer):
    """CLIP and SigLIP encoder layers: plain pre-norm branches."""

    # What the mixin reads of the CLIP or SigLIP layer it is mixed into.
    layer_norm1: torch.nn.Module
    self_attn: clip.CLIPAttention | siglip.SiglipAttention
    layer_norm2: torch.nn.Module
    mlp: torch.nn.Module

    def tokenmerge_project(self, x: Tensor, run: Pass, *, mask, layer_kwargs) -> Projected:
        return project(self.self_attn, self.layer_norm1(x))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], *, mask, layer_kwargs) -> Tensor:
        return attend(self.self_attn, projected, size, mask, layer_kwargs)

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        return self.mlp(self.layer_norm2(x))


class MergingDinov2Layer(MergingLayer):
    """DINOv2 and DINOv3 layers: pre-norm branches scaled by LayerScale, with drop path."""

    # What the mixin reads of the DINOv2 (with or without registers) or DINOv3 layer it is mixed into.
    norm1: torch.nn.Module
    attention: dinov2.Dinov2Attention | dinov2_registers.Dinov2WithRegistersAttention | dinov3.DINOv3ViTAttention
    layer_scale1: torch.nn.Module
    drop_path: torch.nn.Module
    norm2: torch.nn.Module
    mlp: torch.nn.Module
    layer_scale2: torch.nn.Module

    def tokenmerge_project(self, x: Tensor, run: Pass, *, mask, layer_kwargs) -> Projected:
        return project(self.attention, self.norm1(x))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], *, mask, layer_kwargs) -> Tensor:
        return self.drop_path(self.layer_scale1(attend(self.attention, projected, size, mask, layer_kwargs)))

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class MergingDINOv3Layer(rope.RotaryBlock, MergingDinov2Layer):
    """DINOv3 layers: DINOv2's, with rotary embeddings on the patch tokens (the layer's
    ``position_embeddings``, cosines and sines) that follow the merges by ``rope_rule``
    (:class:`tokenmerge.rope.RotaryBlock`)."""

    def tokenmerge_rope(self, x: Tensor, run: Pass, position_embeddings: tuple[Tensor, Tensor]) -> list[Tensor]:
        """The rotary cosines and sines for the (B, N, C) tokens ``x`` entering this layer,
        picked as one table so that both follow the same positions."""
        table = torch.cat(position_embeddings, dim=-1)
        return list(self.tokenmerge_rope_rows(run, table, x, run.num_protected).chunk(2, dim=-1))

    def tokenmerge_project(self, x: Tensor, run: Pass, *, mask, layer_kwargs) -> Projected:
        cos, sin = self.tokenmerge_rope(x, run, layer_kwargs["position_embeddings"])
        query, key, value, normed = project(self.attention, self.norm1(x))
        query, key = dinov3.apply_rotary_pos_emb(query, key, cos, sin)
        return Projected(query, key, value, normed)

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], *, mask, layer_kwargs) -> Tensor:
        # the queries and keys are rotated already: the attention takes no rotary table
        kwargs = {name: value for name, value in layer_kwargs.items() if name != "position_embeddings"}
        return super().tokenmerge_attend(projected, size, mask=mask, layer_kwargs=kwargs)


class MergingVideoMAELayer(MergingLayer):
    """VideoMAE layers: pre-norm branches; the attention's output projection sits in
    the attention wrapper, the MLP is split over two modules."""

    # What the mixin reads of the VideoMAE layer it is mixed into.
    layernorm_before: torch.nn.Module
    attention: videomae.VideoMAEAttention
    layernorm_after: torch.nn.Module
    intermediate: torch.nn.Module
    output: videomae.VideoMAEOutput

    def tokenmerge_project(self, x: Tensor, run: Pass, *, mask, layer_kwargs) -> Projected:
        attention = self.attention.attention
        return project_heads(self.layernorm_before(x), attention.attention_head_size,
                             attention.query, attention.key, attention.value)

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor], *, mask, layer_kwargs) -> Tensor:
        attended = attend(self.attention.attention, projected, size, mask, layer_kwargs)
        return self.attention.output(attended, projected.extra)

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        # VideoMAEOutput adds the residual itself; the block template adds it
        return self.output.dropout(self.output.dense(self.intermediate(self.layernorm_after(x))))


class AttentionProjections(Protocol):
    """What :func:`project` reads of a transformers attention module."""

    head_dim: int
    q_proj: torch.nn.Linear
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear


def project(attention: AttentionProjections, hidden_states: Tensor) -> Projected:
    """The queries, keys and values of a transformers attention module with ``q_proj``,
    ``k_proj`` and ``v_proj`` (:func:`project_heads`)."""
    return project_heads(hidden_states, attention.head_dim, attention.q_proj, attention.k_proj, attention.v_proj)


def project_heads(hidden_states: Tensor, head_dim: int, *projections: torch.nn.Module) -> Projected:
    """The queries, keys and values (B, heads, N, head_dim) that the query, key and value
    ``projections`` of an attention module make of (B, N, C) ``hidden_states``, as its
    forward computes them; the hidden states ride along for :func:`attend`."""
    shape = (*hidden_states.shape[:-1], -1, head_dim)
    query, key, value = (projection(hidden_states).view(shape).transpose(1, 2) for projection in projections)
    return Projected(query, key, value, hidden_states)


def attend(
    attention: torch.nn.Module, projected: Projected, size: Optional[Tensor], mask: Optional[Tensor], kwargs: dict
) -> Tensor:
    """The attention module's output for :func:`project`'s queries, keys and values,
    with key j counted ``size[j]`` times. The module itself is called, so that what
    transformers records of it (``output_attentions``) is recorded."""
    return attention(projected.extra, mask, tokenmerge_projected=projected, tokenmerge_size=size, **kwargs)[0]


@dataclass(frozen=True)
class AttentionParts:
    """The names one family's attention class gives the parts :class:`MergingAttention`
    and the FLOP count read: the families compute attention alike and name its parts
    differently."""

    scaling: str = "scaling"  # the factor of the attention logits
    dropout: str = "attention_dropout"  # the dropout probability of the attention weights
    output: str = "o_proj"  # the output projection; "" where the layer applies it
    query: str = "q_proj"  # the query projection
    head_dim: str = "head_dim"  # the size of one head


VIT_PARTS = AttentionParts()  # ViT, DeiT, DINOv2 (with or without registers) and AST
CLIP_PARTS = AttentionParts(scaling="scale", dropout="dropout", output="out_proj")  # CLIP and SigLIP
DINOV3_PARTS = AttentionParts(dropout="dropout")
# VideoMAE's self-attention, whose output projection its layer applies (in VideoMAESelfOutput)
VIDEOMAE_PARTS = AttentionParts(dropout="dropout_prob", output="", query="query", head_dim="attention_head_size")


class MergingAttention:
    """Attention that, in a layer that merges, attends with the queries, keys and
    values the layer projected and planned from (``tokenmerge_projected``) and weighs
    every key by the patches it stands for (``tokenmerge_size``, (B, N, 1) or None);
    without them this is the unpatched attention. A mask of the caller's own would
    mask the token grid that merging changes, so it is refused; the one transformers
    builds while torch.export traces hides nothing, so it is left out.

    The layer hands these to the module's own forward, rather than calling the
    attention function itself, because transformers records attention weights with
    hooks on the attention module. One mixin serves every family: the parts it reads
    are found by the names of the family's :class:`AttentionParts`."""

    # What the mixin reads of the attention class it is mixed into.
    config: PretrainedConfig
    training: bool

    def forward(
        self,
        hidden_states: Tensor,
        *args,
        tokenmerge_projected: Optional[Projected] = None,
        tokenmerge_size: Optional[Tensor] = None,
        **kwargs,
    ):
        if tokenmerge_projected is None:
            # the host class, the library's attention class, defines forward
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        attention_mask, kwargs = _split_mask(args, kwargs)
        _check_implementation(self.config._attn_implementation)
        _refuse_callers_mask(attention_mask)
        parts = _attention_parts(self)
        scaling = getattr(self, parts.scaling)
        query, key, value, mask = _weighted_by_size(tokenmerge_projected, tokenmerge_size, scaling)
        dropout = getattr(self, parts.dropout) if self.training else 0.0
        out, weights = _attention_function(self)(
            self, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
        # the size channel, if any, widened the values: their first channels are the attended ones
        head_dim = tokenmerge_projected.v.shape[-1]
        out = out[..., :head_dim].reshape(*hidden_states.shape[:-1], -1).contiguous()
        return (getattr(self, parts.output)(out) if parts.output else out), weights


def _attention_parts(attention: MergingAttention) -> AttentionParts:
    """The :class:`AttentionParts` of a patched attention module's family."""
    return ATTENTION_PARTS[original_class(attention)]


def _refuse_callers_mask(attention_mask: Optional[Tensor]) -> None:
    """Refuse an attention mask of the caller's own while merging (:class:`MergingAttention`)."""
    if attention_mask is not None and not _mask_is_transformers_own():
        raise NotImplementedError(
            "tokenmerge does not support an attention_mask while merging: it masks the token grid that "
            "merging changes; pass no attention_mask, or set r=0"
        )


def _weighted_by_size(
    projected: Projected, size: Optional[Tensor], scaling: float
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The queries, keys, values and additive mask with which attention counts key j
    ``size[j]`` times: a size channel or a log-size bias, the formulation
    :mod:`tokenmerge.attention` picks for the device; as projected, unmasked, for None."""
    query, key, value, _ = projected
    if size is None:
        return query, key, value, None
    if proportional.default_formulation(query.device) == "channel":
        query, key, value = proportional.with_size_channel(query, key, value, size, scale=scaling)
        return query, key, value, None
    return query, key, value, proportional.log_size_bias(size, query.dtype)


# Whether the caller of the tower being exported passed an attention mask, noted by
# the tower's pre-hook: under torch.export transformers builds a mask even when none
# was passed, one that hides no token.
_CALLER = threading.local()


def _note_callers_mask(position: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a tower whose forward takes ``attention_mask`` (as its
    ``position``-th positional argument or by name)."""
    if torch.compiler.is_exporting():
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[position:] or (None,))[0]
        _CALLER.passed_mask = mask is not None


def _mask_is_transformers_own() -> bool:
    """Whether the attention mask a layer got is the one transformers builds while
    exporting, and not the caller's."""
    return torch.compiler.is_exporting() and getattr(_CALLER, "passed_mask", True) is False


def _check_implementation(implementation: Optional[str]) -> None:
    """Refuse attention implementations that take no additive float mask."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"tokenmerge merges tokens only with attn_implementation {' or '.join(ATTENTION_IMPLEMENTATIONS)}, "
            f"got {implementation!r}; call model.set_attn_implementation('sdpa'), or set r=0"
        )


def _attention_function(attention: MergingAttention) -> Callable:
    """The library's attention function for the implementation the module's config
    names (its own module's eager function for ``eager``); both add the mask to the
    attention logits, which is how the log-size bias reaches the keys."""
    eager = sys.modules[original_class(attention).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)


class FinalTokens:
    """The module whose output is a tower's ``last_hidden_state``: its final norm, or its
    encoder where no norm follows it (CLIP; VideoMAE with mean pooling). The tokens keep
    their sizes for the heads given them and, with the ``dense`` setting, are spread
    back over the tokens that entered the first layer."""

    _tokenmerge_state: MergeState

    def forward(self, *args, **kwargs):
        # the host class, a norm or an encoder, defines forward
        out = super().forward(*args, **kwargs)
        if isinstance(out, Tensor):
            return self._tokenmerge_final(out)
        out.last_hidden_state = self._tokenmerge_final(out.last_hidden_state)
        return out

    def _tokenmerge_final(self, tokens: Tensor) -> Tensor:
        passes = self._tokenmerge_state.passes
        return passes.unmerged(passes.adopt(tokens))


class MergingAttentionPoolingHead:
    """SigLIP's attention-pooling head, whose probe attends to every token as to the
    patches it holds when proportional attention is on."""

    # What the mixin reads of the SigLIP pooling head it is mixed into.
    _tokenmerge_state: MergeState
    probe: torch.nn.Parameter
    attention: torch.nn.MultiheadAttention
    layernorm: torch.nn.Module
    mlp: torch.nn.Module

    def forward(self, hidden_state: Tensor) -> Tensor:
        size = self._tokenmerge_state.passes.pool_weights(hidden_state).attention
        if size is None:
            # the host class, SiglipMultiheadAttentionPoolingHead, defines forward
            return super().forward(hidden_state)  # type: ignore[misc]
        probe = self.probe.repeat(size.shape[0], 1, 1)
        mask = multihead_size_mask(size, self.attention.num_heads, probe.shape[1], hidden_state.dtype)
        pooled = self.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class MergingDinov2Classifier:
    """DINOv2 classifier whose mean over patch tokens counts every token as many
    times as the patches it holds."""

    # What the mixin reads of the DINOv2 classifier class it is mixed into.
    _tokenmerge_state: MergeState
    base_model_prefix: str
    config: PretrainedConfig
    classifier: torch.nn.Module
    loss_function: Callable[..., Tensor]

    @can_return_tuple
    def forward(
        self,
        pixel_values: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = getattr(self, self.base_model_prefix)(pixel_values, attention_mask=attention_mask, **kwargs)
        tokens = outputs.last_hidden_state
        state: MergeState = self._tokenmerge_state
        size = _sizes_of(state, tokens)
        prefix = state.num_protected
        patch_mean = _mean_over_patches(tokens[:, prefix:], None if size is None else size[:, prefix:])
        logits = self.classifier(torch.cat([tokens[:, 0], patch_mean], dim=1))
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class MergingVideoMAEClassifier:
    """VideoMAE video classifier whose mean over tokens (``use_mean_pooling``) counts
    every token as many times as the tubelets it holds; without mean pooling it reads
    the first token, which is then protected."""

    # What the mixin reads of the VideoMAE classifier it is mixed into.
    _tokenmerge_state: MergeState
    videomae: torch.nn.Module
    fc_norm: Optional[torch.nn.Module]
    config: PretrainedConfig
    classifier: torch.nn.Module
    loss_function: Callable[..., Tensor]

    @can_return_tuple
    def forward(
        self, pixel_values: Optional[Tensor] = None, labels: Optional[Tensor] = None, **kwargs
    ) -> ImageClassifierOutput:
        outputs = self.videomae(pixel_values, **kwargs)
        tokens = outputs.last_hidden_state
        if self.fc_norm is None:
            pooled = tokens[:, 0]
        else:
            pooled = self.fc_norm(_mean_over_patches(tokens, _sizes_of(self._tokenmerge_state, tokens)))
        logits = self.classifier(pooled)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class MergingVideoMAEEmbeddings:
    """VideoMAE embeddings, which refuse ``bool_masked_pos`` (masked pretraining) while
    the model merges: the tokens entering the first layer are then the visible tubelets
    alone, which the model's token counts do not describe, and whose decoder needs one
    token per visible tubelet."""

    _tokenmerge_state: MergeState

    def forward(self, pixel_values: Tensor, bool_masked_pos: Optional[Tensor] = None) -> Tensor:
        if bool_masked_pos is not None and self._tokenmerge_state.merges_anything():
            raise NotImplementedError(
                "tokenmerge does not merge the visible tubelets of masked pretraining (bool_masked_pos): pass no "
                "bool_masked_pos, or set r=0"
            )
        # the host class, VideoMAEEmbeddings, defines forward
        return super().forward(pixel_values, bool_masked_pos)  # type: ignore[misc]


def _sizes_of(state: MergeState, tokens: Tensor) -> Optional[Tensor]:
    """The weights (B, N, 1) of a mean over the (B, N, C) ``tokens`` a pass of the model
    left: their sizes, or None while each counts once (unmerged, or one per patch)."""
    return state.passes.pool_weights(tokens).mean


def _mean_over_patches(x: Tensor, size: Optional[Tensor]) -> Tensor:
    """Mean over tokens in which each token counts as many times as the patches it
    holds; the plain mean while nothing is merged."""
    return x.mean(dim=1) if size is None else weighted_mean(x, size)


@dataclass(frozen=True)
class Tower:
    """Where one tower class (an image, video or audio transformer) keeps its parts, and how they are patched."""

    layers: str  # attribute path of the layer list
    layer: type
    layer_mixin: type[MergingLayer]
    attention: str  # attribute path, from the layer, of its attention module
    attention_class: type
    attention_parts: AttentionParts  # what the attention class calls the parts its mixin reads
    patch_projection: str  # attribute path, from the embeddings, of the patch convolution
    class_tokens: int  # class and distillation tokens; register tokens are counted from the embeddings
    heads: tuple[str, ...] = ()  # linear heads of the tower itself (may be None)
    attention_pooling_head: bool = False  # a probe that attends to the tokens (SigLIP's ``head``, if used)
    final: tuple[str, ...] = ("layernorm",)  # attributes of which the first not None makes last_hidden_state
    mlp: tuple[str, ...] = ("mlp",)  # the layer's modules of the MLP branch; the rest is the attention branch
    embeddings_mixin: Optional[type] = None  # for the embeddings, which refuse what they cannot merge
    mean_pooling: str = ""  # config flag for pooling by mean; without it the first token is pooled, and protected
    spectrogram: bool = False  # inputs are (time, frequency) spectrograms, which the patch convolution transposes


@dataclass(frozen=True)
class Model:
    """A supported model class: where its tower is and what reads the tokens."""

    tower: str = ""  # attribute holding its tower, "" for the tower itself
    heads: tuple[str, ...] = ()  # its linear heads on top of the tower
    pooling: Optional[type] = None  # mixin for the model class itself, whose forward averages tokens


class AttentionFields(TypedDict, total=False):
    """The fields of :class:`Tower` that follow from its attention class."""

    attention: str
    attention_parts: AttentionParts
    patch_projection: str


VIT_ATTENTION = AttentionFields(attention="attention", attention_parts=VIT_PARTS,
                                patch_projection="patch_embeddings.projection")
CLIP_ATTENTION = AttentionFields(attention="self_attn", attention_parts=CLIP_PARTS,
                                 patch_projection="patch_embedding")

TOWERS = {
    vit.ViTModel: Tower(layers="layers", layer=vit.ViTLayer, layer_mixin=MergingViTLayer,
                        attention_class=vit.ViTAttention, class_tokens=1, heads=("pooler",), **VIT_ATTENTION),
    deit.DeiTModel: Tower(layers="layers", layer=deit.DeiTLayer, layer_mixin=MergingViTLayer,
                          attention_class=deit.DeiTAttention, class_tokens=2, heads=("pooler",), **VIT_ATTENTION),
    clip.CLIPVisionModel: Tower(layers="encoder.layers", layer=clip.CLIPEncoderLayer, layer_mixin=MergingCLIPLayer,
                                attention_class=clip.CLIPAttention, class_tokens=1, final=("encoder",),
                                **CLIP_ATTENTION),
    siglip.SiglipVisionModel: Tower(layers="encoder.layers", layer=siglip.SiglipEncoderLayer,
                                    layer_mixin=MergingCLIPLayer, attention_class=siglip.SiglipAttention,
                                    class_tokens=0, attention_pooling_head=True, final=("post_layernorm",),
                                    **CLIP_ATTENTION),
    dinov2.Dinov2Model: Tower(layers="encoder.layer", layer=dinov2.Dinov2Layer, layer_mixin=MergingDinov2Layer,
                              attention_class=dinov2.Dinov2Attention, class_tokens=1, **VIT_ATTENTION),
    dinov2_registers.Dinov2WithRegistersModel: Tower(
        layers="encoder.layer", layer=dinov2_registers.Dinov2WithRegistersLayer, layer_mixin=MergingDinov2Layer,
        attention_class=dinov2_registers.Dinov2WithRegistersAttention, class_tokens=1, **VIT_ATTENTION),
    dinov3.DINOv3ViTModel: Tower(
        layers="model.layer", layer=dinov3.DINOv3ViTLayer, layer_mixin=MergingDINOv3Layer, attention="attention",
        attention_class=dinov3.DINOv3ViTAttention, attention_parts=DINOV3_PARTS,
        patch_projection="patch_embeddings", class_tokens=1, final=("norm",)),
    videomae.VideoMAEModel: Tower(
        layers="encoder.layer", layer=videomae.VideoMAELayer, layer_mixin=MergingVideoMAELayer,
        attention="attention.attention", attention_class=videomae.VideoMAESelfAttention,
        attention_parts=VIDEOMAE_PARTS, patch_projection="patch_embeddings.projection", class_tokens=0,
        final=("layernorm", "encoder"), mlp=("intermediate", "output"), embeddings_mixin=MergingVideoMAEEmbeddings,
        mean_pooling="use_mean_pooling"),
    ast.ASTModel: Tower(layers="layers", layer=ast.ASTLayer, layer_mixin=MergingViTLayer,
                        attention_class=ast.ASTAttention, class_tokens=2, spectrogram=True, **VIT_ATTENTION),
}

#: The parts of every supported attention class, for :class:`MergingAttention`.
ATTENTION_PARTS: dict[type, AttentionParts] = {spec.attention_class: spec.attention_parts for spec in TOWERS.values()}

MODELS: dict[type, Model] = {
    **{tower: Model() for tower in TOWERS},
    vit.ViTForImageClassification: Model(tower="vit", heads=("classifier",)),
    deit.DeiTForImageClassification: Model(tower="deit", heads=("classifier",)),
    deit.DeiTForImageClassificationWithTeacher: Model(tower="deit",
                                                      heads=("cls_classifier", "distillation_classifier")),
    clip.CLIPVisionModelWithProjection: Model(tower="vision_model", heads=("visual_projection",)),
    clip.CLIPModel: Model(tower="vision_model", heads=("visual_projection",)),
    dinov2.Dinov2ForImageClassification: Model(tower="dinov2", heads=("classifier",),
                                               pooling=MergingDinov2Classifier),
    dinov2_registers.Dinov2WithRegistersForImageClassification: Model(
        tower="dinov2_with_registers", heads=("classifier",), pooling=MergingDinov2Classifier),
    videomae.VideoMAEForVideoClassification: Model(tower="videomae", heads=("classifier",),
                                                   pooling=MergingVideoMAEClassifier),
    ast.ASTForAudioClassification: Model(tower="audio_spectrogram_transformer", heads=("classifier",)),
}


def _model_class(model: torch.nn.Module) -> type:
    """The model's own class, also while a pooling mixin is swapped in."""
    return original_class(model) if is_swapped(model) else type(model)


def _tower(model: torch.nn.Module) -> PreTrainedModel:
    """The model's tower, one of the classes in :data:`TOWERS` once :meth:`TransformersAdapter.check` passed."""
    name = MODELS[_model_class(model)].tower
    return cast(PreTrainedModel, model.get_submodule(name) if name else model)


def _layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    return cast(torch.nn.ModuleList, tower.get_submodule(TOWERS[type(tower)].layers))


def _attentions(tower: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention module of every layer, the one the attention mixin patches."""
    return [layer.get_submodule(TOWERS[type(tower)].attention) for layer in _layers(tower)]


def _patch_projection(tower: torch.nn.Module) -> torch.nn.Conv2d | torch.nn.Conv3d:
    """The convolution of the tower's embeddings that makes the patch (or tubelet) tokens."""
    embeddings = tower.get_submodule("embeddings")
    return cast(torch.nn.Conv2d | torch.nn.Conv3d, embeddings.get_submodule(TOWERS[type(tower)].patch_projection))


def _final(tower: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the tower's ``last_hidden_state``."""
    return next(getattr(tower, name) for name in TOWERS[type(tower)].final if getattr(tower, name) is not None)


def _num_prefix_tokens(tower: torch.nn.Module) -> int:
    """Class, distillation and register tokens: the embeddings put them before the patch tokens."""
    registers = getattr(tower.embeddings, "register_tokens", None)
    return TOWERS[type(tower)].class_tokens + (0 if registers is None else registers.shape[1])


def _num_protected(tower: torch.nn.Module) -> int:
    """The prefix tokens, and a first patch token that is pooled: they are never merged."""
    spec = TOWERS[type(tower)]
    pooled_first = bool(spec.mean_pooling) and not getattr(tower.config, spec.mean_pooling)
    return _num_prefix_tokens(tower) + pooled_first


def _input_size(tower: PreTrainedModel) -> tuple[int, int]:
    """The sizes of the last two dimensions of one input the tower is configured for:
    an image's or a video frame's (height, width), a spectrogram's (time, frequency)."""
    config = tower.config
    if TOWERS[type(tower)].spectrogram:
        return config.max_length, config.num_mel_bins
    size = config.image_size
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _num_patches(tower: PreTrainedModel, size: Optional[tuple[int, int]]) -> int:
    """The patch tokens the tower's patch convolution makes of an input whose last two
    dimensions are ``size`` (:func:`_input_size`, the configured one for None); of a
    video, over its configured frames."""
    projection = _patch_projection(tower)
    size = _input_size(tower) if size is None else size
    extents: tuple[int, ...] = size[::-1] if TOWERS[type(tower)].spectrogram else size
    if isinstance(projection, torch.nn.Conv3d):
        extents = (tower.config.num_frames, *extents)
    return math.prod((extent - kernel) // stride + 1
                     for extent, kernel, stride in zip(extents, projection.kernel_size, projection.stride))


def _pooling(model: torch.nn.Module) -> list[tuple[torch.nn.Module, type]]:
    """The modules that hand on or pool the final tokens, with their mixins."""
    tower = _tower(model)
    found: list[tuple[torch.nn.Module, type]] = [(_final(tower), FinalTokens)]
    pooling = MODELS[_model_class(model)].pooling
    if pooling is not None:
        found.append((model, pooling))
    if TOWERS[type(tower)].attention_pooling_head and tower.use_head:
        found.append((cast(siglip.SiglipVisionModel, tower).head, MergingAttentionPoolingHead))
    return found


class TransformersAdapter(Adapter):
    """The adapter of transformers' towers. For a VideoMAE model, :meth:`input_size` is
    the (height, width) of its frames, and the token counts are for its configured
    number of frames; for an AST model, it is the (time, frequency) size of its
    spectrograms, the last two dimensions of its ``input_values``."""

    supported = SUPPORTED

    def check(self, model: torch.nn.Module) -> None:
        if type(model) not in MODELS:
            raise TypeError(f"tokenmerge does not support transformers' {type(model).__name__}. Supported: {SUPPORTED}")
        tower = _tower(model)
        if type(tower) not in TOWERS:
            raise TypeError(f"tokenmerge does not support tower class {type(tower).__name__}. Supported: {SUPPORTED}")
        spec = TOWERS[type(tower)]
        for index, layer in enumerate(_layers(tower)):
            if type(layer) is not spec.layer:
                raise TypeError(
                    f"tokenmerge does not support layer class {type(layer).__name__} ({spec.layers}.{index}). "
                    f"Supported: {SUPPORTED}"
                )
            attention = layer.get_submodule(spec.attention)
            if type(attention) is not spec.attention_class:
                raise TypeError(
                    f"tokenmerge does not support attention class {type(attention).__name__} "
                    f"({spec.layers}.{index}.{spec.attention}). Supported: {SUPPORTED}"
                )
        _check_implementation(tower.config._attn_implementation)
        if TOWERS[type(tower)].attention_pooling_head and tower.use_head:
            if type(tower.head) is not siglip.SiglipMultiheadAttentionPoolingHead:
                raise TypeError(
                    f"tokenmerge does not support pooling head {type(tower.head).__name__}. Supported: {SUPPORTED}"
                )
            check_multihead(tower.head.attention, "head.attention")

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(_layers(_tower(model)))

    def block_mixin(self, model: torch.nn.Module) -> type[MergingBlock]:
        return TOWERS[type(_tower(model))].layer_mixin

    def num_protected(self, model: torch.nn.Module) -> int:
        return _num_protected(_tower(model))

    def mixins(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, type]]:
        tower = _tower(model)
        spec = TOWERS[type(tower)]
        found: list[tuple[torch.nn.Module, type]] = [(attention, MergingAttention) for attention in _attentions(tower)]
        if spec.embeddings_mixin is not None:
            found.append((tower.get_submodule("embeddings"), spec.embeddings_mixin))
        return found + _pooling(model)

    def pre_hooks(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, Callable]]:
        tower = _tower(model)
        parameters = list(inspect.signature(type(tower).forward).parameters)
        if "attention_mask" not in parameters:
            return []
        return [(tower, partial(_note_callers_mask, parameters.index("attention_mask") - 1))]

    def input_size(self, model: torch.nn.Module) -> tuple[int, int]:
        return _input_size(_tower(model))

    def token_layout(self, model: torch.nn.Module, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        tower = _tower(model)
        return _num_patches(tower, img_size) + _num_prefix_tokens(tower), _num_protected(tower)

    def flop_shape(self, model: torch.nn.Module, img_size: Optional[tuple[int, int]] = None) -> FlopShape:
        tower = _tower(model)
        spec = TOWERS[type(tower)]
        layers, attentions = _layers(tower), _attentions(tower)
        projection = _patch_projection(tower)
        num_patches = _num_patches(tower, img_size)
        heads = [getattr(tower, name) for name in spec.heads]
        heads += [getattr(model, name) for name in MODELS[_model_class(model)].heads]
        head = sum(linear_flops_per_token(module) for module in heads if module is not None)
        mlp_linear = [sum(linear_flops_per_token(layer.get_submodule(name)) for name in spec.mlp) for layer in layers]
        head_per_token = 0
        if TOWERS[type(tower)].attention_pooling_head and tower.use_head:
            per_image, head_per_token = _pooling_head_flops(cast(siglip.SiglipVisionModel, tower).head)
            head += per_image
        return FlopShape(
            stem=num_patches * 2 * projection.weight[0].numel() * projection.out_channels,
            head=head,
            attention_linear=tuple(linear_flops_per_token(layer) - mlp for layer, mlp in zip(layers, mlp_linear)),
            mlp_linear=tuple(mlp_linear),
            attention_width=tuple(getattr(attention, spec.attention_parts.query).out_features
                                  for attention in attentions),
            key_size=tuple(getattr(attention, spec.attention_parts.head_dim) for attention in attentions),
            head_per_token=head_per_token,
        )


def _pooling_head_flops(head: siglip.SiglipMultiheadAttentionPoolingHead) -> tuple[int, int]:
    """FLOPs of SigLIP's attention-pooling head: per image (the probe's query, the
    output projection and the MLP, all on one token) and per pooled token (its key and
    value projections, and the probe's attention score and weighted sum over it)."""
    width = head.attention.embed_dim
    return linear_flops_per_token(head) + 2 * width * width, 2 * width * 2 * width + 4 * width


ADAPTER = TransformersAdapter()
