"""Floating-point operations of a forward pass: counted by PyTorch, or computed from
the token counts a schedule gives."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .methods import resolve
from .schedule import capped

_aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's counter has no formula for the CPU attention kernel; without one it would
# miss the QK^T and AV products entirely.
_EXTRA_FORMULAS = {_aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of ``model(inputs)`` as PyTorch's FlopCounterMode counts them, including
    attention on the CPU, for which PyTorch has no formula of its own: the measured
    count that :func:`analytic_flops` is checked against.

    Args:
        model: the model, patched or not; it runs once, with gradients enabled.
        inputs: what it is called with, such as a (B, 3, H, W) batch of images.

    Returns:
        The FLOPs of the whole call (all of the batch), a multiply-add counting two.
    """
    # Gradients stay enabled: the counter's module tracker fails on parameters that
    # are expanded under no_grad (timm's attention-pooling latent).
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(inputs)
    return counter.get_total_flops()


@dataclass(frozen=True)
class FlopShape:
    """What the FLOPs of a ViT forward pass depend on, per image: what each adapter
    reads from its model for :func:`analytic_flops`. Linear layers count two FLOPs per
    multiply-add, like ``FlopCounterMode``; norms and activations are not counted.

    Attributes:
        stem: FLOPs of the patch embedding.
        head: FLOPs of the head (classifier, pooling) that do not depend on the number
            of tokens it is given.
        attention_linear: per block, FLOPs per token of the attention's linear layers
            (qkv, output projection, gate).
        mlp_linear: per block, FLOPs per token of the MLP.
        attention_width: per block, heads x head size, for the QK^T and AV products.
        key_size: per block, the head size, for the matching similarities.
        head_per_token: what the head spends on each token the last block leaves
            (attention pooling; 0 for a head that reads one token).
    """

    stem: int
    head: int
    attention_linear: tuple[int, ...]
    mlp_linear: tuple[int, ...]
    attention_width: tuple[int, ...]
    key_size: tuple[int, ...]
    head_per_token: int = 0


def linear_flops_per_token(module: torch.nn.Module) -> int:
    """FLOPs that the ``nn.Linear`` layers inside ``module`` (itself included) spend on
    one token, a multiply-add counting two: the per-token entries of a :class:`FlopShape`."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def analytic_flops(
    shape: FlopShape, num_tokens: int, r_per_block: Sequence[int], num_protected: int, method: str = "tome"
) -> int:
    """FLOPs per image from the token counts alone, without running the model: attention
    on the tokens entering a block, the MLP on the tokens left after the block's
    reduction, plus the similarity products of bipartite matching for the methods that
    match, and what the head spends on every token the last block leaves.

    Args:
        shape: what the model's FLOPs depend on, from its adapter.
        num_tokens: tokens entering the first block, protected tokens included.
        r_per_block: one r per block, as :func:`tokenmerge.schedule.resolve` gives it;
            capped here as the blocks cap it (:func:`tokenmerge.schedule.capped`).
        num_protected: leading tokens never reduced.
        method: the reduction method's name, which decides whether matching
            similarities are counted.

    Returns:
        FLOPs per image, a multiply-add counting two, as ``FlopCounterMode`` counts.

    Raises:
        ValueError: ``method`` is not registered (checked once a block reduces tokens).
    """
    total = shape.stem + shape.head
    for block, r in enumerate(capped(r_per_block, num_tokens, num_protected)):
        total += num_tokens * shape.attention_linear[block] + 4 * num_tokens * num_tokens * shape.attention_width[block]
        if r and resolve(method).matches:
            mergeable = num_tokens - num_protected
            total += 2 * ((mergeable + 1) // 2) * (mergeable // 2) * shape.key_size[block]
        num_tokens -= r
        total += num_tokens * shape.mlp_linear[block]
    return total + num_tokens * shape.head_per_token
