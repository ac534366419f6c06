"""torchvision: ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``,
``vit_l_32``, ``vit_h_14``, also at the larger image sizes of the SWAG weights) built from
``EncoderBlock``, with dropout, a representation layer in the head, a convolutional
stem, and LayerNorm or RMSNorm as the norm layer.

The class token is the only protected token and the model classifies from it
alone, so the head needs no token sizes. The blocks attend with
``nn.MultiheadAttention``, which is recomputed from its own parameters to get at the
keys and to add the log-size bias. With the ``dense`` setting the encoder's output
(``model.encoder``) has one token per input token again.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, cast

from torch import Tensor, nn
from torchvision.models.vision_transformer import Encoder, EncoderBlock, MLPBlock, VisionTransformer

from ..block import MergingBlock, Projected
from ..flops import FlopShape, linear_flops_per_token
from ..state import MergeState, Pass
from .base import Adapter
from .multihead import check_multihead, multihead_attend, multihead_linear_flops, multihead_project

SUPPORTED = (
    "torchvision VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, or built directly) "
    "whose encoder layers are torchvision.models.vision_transformer.EncoderBlock with batch-first "
    "nn.MultiheadAttention, an MLPBlock, and LayerNorm or RMSNorm norms"
)
SUPPORTED_NORMS = (nn.LayerNorm, nn.RMSNorm)
NUM_PROTECTED = 1  # the class token


class TorchvisionAdapter(Adapter):
    supported = SUPPORTED

    def check(self, model: nn.Module) -> None:
        if type(model) is not VisionTransformer:
            raise TypeError(f"tokenmerge does not support torchvision's {type(model).__name__}. Supported: {SUPPORTED}")
        encoder = _vit(model).encoder
        if type(encoder) is not Encoder or type(encoder.layers) is not nn.Sequential:
            raise TypeError(
                f"tokenmerge does not support encoder class {type(encoder).__name__} with layers in a "
                f"{type(encoder.layers).__name__}. Supported: {SUPPORTED}"
            )
        _check_norm(encoder.ln, "encoder.ln")
        block: EncoderBlock  # once its class is checked
        for name, block in encoder.layers.named_children():
            where = f"encoder.layers.{name}"
            if type(block) is not EncoderBlock:
                raise TypeError(
                    f"tokenmerge does not support encoder layer class {type(block).__name__} ({where}). "
                    f"Supported: {SUPPORTED}"
                )
            _check_attention(block.self_attention, f"{where}.self_attention")
            if type(block.mlp) is not MLPBlock:
                raise TypeError(
                    f"tokenmerge does not support MLP class {type(block.mlp).__name__} ({where}.mlp). "
                    f"Supported: {SUPPORTED}"
                )
            _check_norm(block.ln_1, f"{where}.ln_1")
            _check_norm(block.ln_2, f"{where}.ln_2")

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        vit = _vit(model)
        return vit.image_size, vit.image_size

    def token_layout(self, model: nn.Module, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        _check_img_size(model, img_size)
        return _vit(model).seq_length, NUM_PROTECTED

    def flop_shape(self, model: nn.Module, img_size: Optional[tuple[int, int]] = None) -> FlopShape:
        _check_img_size(model, img_size)
        vit = _vit(model)
        blocks = list(vit.encoder.layers)
        return FlopShape(
            stem=_stem_flops(vit.conv_proj, vit.image_size),
            head=linear_flops_per_token(vit.heads),
            attention_linear=tuple(multihead_linear_flops(block.self_attention) for block in blocks),
            mlp_linear=tuple(linear_flops_per_token(block.mlp) for block in blocks),
            attention_width=tuple(block.self_attention.embed_dim for block in blocks),
            key_size=tuple(block.self_attention.head_dim for block in blocks),
        )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_vit(model).encoder.layers)

    def block_mixin(self, model: nn.Module) -> type[MergingBlock]:
        return MergingEncoderBlock

    def mixins(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        return [(_vit(model).encoder, MergingEncoder)]

    def num_protected(self, model: nn.Module) -> int:
        return NUM_PROTECTED


def _vit(model: nn.Module) -> VisionTransformer:
    """The model, a VisionTransformer once :meth:`TorchvisionAdapter.check` passed."""
    return cast(VisionTransformer, model)


def _check_attention(attention: nn.Module, where: str) -> None:
    try:
        check_multihead(attention, where)
    except TypeError as error:
        raise TypeError(f"{error}. Supported: {SUPPORTED}") from None
    if not attention.batch_first:
        # EncoderBlock passes batch-first tokens; a sequence-first module would attend
        # across the batch, which merged tokens cannot reproduce.
        raise TypeError(
            f"tokenmerge does not support nn.MultiheadAttention with batch_first=False ({where}). "
            f"Supported: {SUPPORTED}"
        )


def _check_norm(norm: nn.Module, where: str) -> None:
    """Refuse norms that may mix tokens: merged tokens are only exact for norms of one token."""
    if not isinstance(norm, SUPPORTED_NORMS) or len(norm.normalized_shape) != 1:
        raise TypeError(
            f"tokenmerge does not support norm layer {type(norm).__name__} ({where}), "
            f"only norms of single tokens. Supported: {SUPPORTED}"
        )


def _check_img_size(model: nn.Module, img_size: Optional[tuple[int, int]]) -> None:
    image_size = _vit(model).image_size
    if img_size is not None and tuple(img_size) != (image_size, image_size):
        raise ValueError(
            f"torchvision's VisionTransformer takes only {image_size}x{image_size} inputs, "
            f"got {img_size[0]}x{img_size[1]}; resize the images to its image_size"
        )


def _stem_flops(stem: nn.Module, image_size: int) -> int:
    """FLOPs of the convolutions that turn an image into patch tokens: the single
    patchifying convolution, or every convolution of a convolutional stem in turn."""
    height = width = image_size
    total = 0
    for conv in (module for module in stem.modules() if isinstance(module, nn.Conv2d)):
        height, width = _conv_output_length(conv, height, 0), _conv_output_length(conv, width, 1)
        total += 2 * height * width * conv.out_channels * conv.weight[0].numel()
    return total


def _conv_output_length(conv: nn.Conv2d, length: int, dim: int) -> int:
    if conv.padding == "same":
        return length
    padding = 0 if isinstance(conv.padding, str) else conv.padding[dim]  # the other string: "valid"
    reach = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
    return (length + 2 * padding - reach) // conv.stride[dim] + 1


class MergingEncoderBlock(MergingBlock):
    """torchvision ``EncoderBlock`` that merges tokens between its attention and MLP branches."""

    # What the mixin reads of the torchvision ``EncoderBlock`` it is mixed into.
    ln_1: nn.Module
    self_attention: nn.MultiheadAttention
    dropout: nn.Module
    ln_2: nn.Module
    mlp: nn.Module

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 3:
            raise ValueError(f"Expected (batch_size, seq_length, hidden_dim) got {tuple(input.shape)}")
        # the host class, torchvision's EncoderBlock, defines forward
        return self.tokenmerge_forward(input, partial(super().forward, input))  # type: ignore[misc]

    def tokenmerge_project(self, x: Tensor, run: Pass) -> Projected:
        return multihead_project(self.self_attention, self.ln_1(x))

    def tokenmerge_attend(self, projected: Projected, size: Optional[Tensor]) -> Tensor:
        return self.dropout(multihead_attend(self.self_attention, projected, size))

    def tokenmerge_mlp(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_2(x))


class MergingEncoder:
    """torchvision ``Encoder``, whose output keeps the sizes of its last block's tokens
    and, with the ``dense`` setting, is spread back over the tokens that entered its
    first block: ``model.encoder`` then gives one token per patch, and the head, which
    reads the class token alone, is unchanged."""

    _tokenmerge_state: MergeState

    def forward(self, input: Tensor) -> Tensor:
        passes = self._tokenmerge_state.passes
        # the host class, torchvision's Encoder, defines forward
        return passes.unmerged(passes.adopt(super().forward(input)))  # type: ignore[misc]


ADAPTER = TorchvisionAdapter()
