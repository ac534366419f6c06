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
    """FLOPs of ``model(inputs)`` as PyTorch's FlopCounterMode counts them (a
    multiply-add is two), including attention on the CPU."""
    # Gradients stay enabled: the counter's module tracker fails on parameters that
    # are expanded under no_grad (timm's attention-pooling latent).
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(inputs)
    return counter.get_total_flops()


@dataclass(frozen=True)
class FlopShape:
    """What the FLOPs of a ViT forward pass depend on, per image. Linear layers count
    two FLOPs per multiply-add, like ``FlopCounterMode``; norms and activations are
    not counted."""

    stem: int  # patch embedding
    head: int  # classifier
    attention_linear: tuple[int, ...]  # per block, per token: qkv, output projection, gate
    mlp_linear: tuple[int, ...]  # per block, per token
    attention_width: tuple[int, ...]  # per block: heads x head size, for QK^T and AV
    key_size: tuple[int, ...]  # per block: head size, for the matching similarities
    head_per_token: int = 0  # what the head spends on each token the last block leaves (attention pooling)


def linear_flops_per_token(module: torch.nn.Module) -> int:
    """FLOPs that the ``nn.Linear`` layers inside ``module`` spend on one token."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def analytic_flops(
    shape: FlopShape, num_tokens: int, r_per_block: Sequence[int], num_protected: int, method: str = "tome"
) -> int:
    """FLOPs per image from the token counts alone: attention on the tokens entering a
    block, the MLP on the tokens left after the block's reduction, plus the similarity
    products of bipartite matching for the methods that match, and what the head
    spends on every token the last block leaves."""
    total = shape.stem + shape.head
    for block, r in enumerate(capped(r_per_block, num_tokens, num_protected)):
        total += num_tokens * shape.attention_linear[block] + 4 * num_tokens * num_tokens * shape.attention_width[block]
        if r and resolve(method).matches:
            mergeable = num_tokens - num_protected
            total += 2 * ((mergeable + 1) // 2) * (mergeable // 2) * shape.key_size[block]
        num_tokens -= r
        total += num_tokens * shape.mlp_linear[block]
    return total + num_tokens * shape.head_per_token
