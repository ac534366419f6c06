"""Counting the floating-point operations of a forward pass."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's counter has no formula for the CPU attention kernel; without one it would
# miss the QK^T and AV products entirely.
_EXTRA_FORMULAS = {_aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of ``model(inputs)`` as PyTorch's FlopCounterMode counts them (a
    multiply-add is two), including attention on the CPU."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(inputs)
    return counter.get_total_flops()
