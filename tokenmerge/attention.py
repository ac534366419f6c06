"""Proportional attention: softmax(QK^T * scale + log s) V.

A key that stands for s merged patches gets the attention weight of s identical
keys. ``F.scaled_dot_product_attention`` takes the bias in one of two ways, which
give the same attention up to rounding:

- **mask** (:func:`attention_with_mask`): ``log s`` as a float ``attn_mask`` of
  shape (B, 1, 1, N).
- **channel** (:func:`attention_with_channel`): no mask; one channel more on the
  queries (a constant 1) and on the keys (``log s / scale``), so that
  ``q'.k' * scale = q.k * scale + log s``, and a zero channel on the values; the head
  dim is then padded with zeros to a multiple of 8 (zeros in q and k add nothing to
  the logits, the values' extra channels are sliced off the output).

Which SDPA backend each lands on (``proportional_attention`` picks per device; its
``formulation=`` overrides the pick):

- CPU: both run ``aten::_scaled_dot_product_flash_attention_for_cpu`` (seen with
  ``torch.profiler``, torch 2.14, float32, bfloat16 and float16): PyTorch's CPU
  flash kernel takes a float mask, so the mask costs it little, while the channel
  makes every head 72 wide instead of 64 (ViT-S/16). With ``dropout_p > 0`` both
  fall to ``aten::_scaled_dot_product_attention_math``, as does plain SDPA. Measured
  with ``benchmarks/attention.py --threads 2`` (float32, ViT-S/16's token counts at
  r=13, batch 1 and 32), the mask costs 1-8% over no bias at all and the channel
  18-92% over the mask (its copies, and 72 channels for 64), so the CPU uses the
  **mask**.
- CUDA: PyTorch's flash backend refuses any ``attn_mask`` (``check_for_attn_mask``
  in ``aten/src/ATen/native/transformers/sdp_utils_cpp.h``: "Flash Attention does
  not support non-null attn_mask", a message the installed ``libtorch_cuda.so``
  holds), so the mask sends SDPA to the memory-efficient (or cuDNN, or math)
  kernel; the channel keeps the flash kernel eligible (float16 and bfloat16; flash
  takes no float32, where both land on memory-efficient), so CUDA uses the
  **channel**. Not measured here (no GPU).
- Any other device: the mask, unmeasured.

Before the first merge (``size=None``) no mask and no padding are used at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: The formulations :func:`proportional_attention` can run.
FORMULATIONS = ("mask", "channel")

#: The head dims the fused CUDA kernels take are multiples of this.
HEAD_DIM_MULTIPLE = 8


def log_size_bias(size: Tensor, dtype) -> Tensor:
    """The additive attention bias for token sizes (B, N, 1): (B, 1, 1, N), in ``dtype``."""
    bias = size.view(size.shape[0], 1, 1, size.shape[1]).log()
    return bias if bias.dtype == dtype else bias.to(dtype)


def mask_with_key_bias(mask: Tensor | None, bias: Tensor, queries: int, dtype: torch.dtype) -> Tensor:
    """An additive (B, 1, Q, K) float attention mask: ``mask`` plus ``bias`` (B, K) on
    every key, for attention implementations that add their mask to the logits
    (transformers' ``eager`` and ``sdpa``).

    ``mask`` is what such an implementation is given: a float mask (added as it is), a
    boolean one (True: attend), or None for causal attention of the ``queries`` last
    positions over K keys. Masked entries take ``dtype``'s lowest value, not -inf, so that
    a row with no key to attend to (left padding) stays finite, as transformers' own masks do.
    """
    keys = bias.shape[-1]
    lowest = torch.finfo(dtype).min
    if mask is None:
        positions = torch.arange(keys, device=bias.device)
        allowed = positions[None, :] <= positions[keys - queries:, None]
        mask = allowed.view(1, 1, queries, keys)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, lowest)
    return mask.to(dtype) + bias.to(dtype)[:, None, None, :]


def attention_with_mask(
    q: Tensor, k: Tensor, v: Tensor, size: Tensor, *, dropout_p: float = 0.0, scale: float | None = None
) -> Tensor:
    """Proportional attention with ``log s`` passed as SDPA's float ``attn_mask``."""
    mask = log_size_bias(size, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def attention_with_channel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    size: Tensor,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    multiple: int = HEAD_DIM_MULTIPLE,
) -> Tensor:
    """Proportional attention without a mask: ``log s / scale`` as an extra key
    channel met by a constant-1 query channel, the head dim padded with zeros to a
    multiple of ``multiple`` (1: no padding)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale  # SDPA's default, of the unpadded head dim
    q, k, v_padded = with_size_channel(q, k, v, size, scale=scale, multiple=multiple)
    out = F.scaled_dot_product_attention(q, k, v_padded, dropout_p=dropout_p, scale=scale)
    return out[..., :v.shape[-1]]


def with_size_channel(
    q: Tensor, k: Tensor, v: Tensor, size: Tensor, *, scale: float, multiple: int = HEAD_DIM_MULTIPLE
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values (B, H, N, D) widened so that attention over them with
    ``scale`` and no mask is proportional attention: the queries get a channel of
    ones, the keys one of ``log s / scale``, the values a zero channel, and all three
    zeros up to a multiple of ``multiple``. The output's first D channels are the
    attended values; attention weights computed from them are the biased ones."""
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    width = -(-max(head_dim + 1, value_dim) // multiple) * multiple
    batch, heads, num_keys = k.shape[:3]
    precise = size.to(torch.promote_types(size.dtype, k.dtype))  # rounded to k's dtype once, at the end
    key_channel = (precise.view(size.shape[0], 1, num_keys, 1).log() / scale).to(k.dtype)

    def padded(x: Tensor, extra: Tensor | None) -> Tensor:
        parts = [x] if extra is None else [x, extra]
        used = sum(part.shape[-1] for part in parts)
        return torch.cat(parts + [x.new_zeros(*x.shape[:-1], width - used)], dim=-1)

    return (padded(q, q.new_ones(*q.shape[:-1], 1)), padded(k, key_channel.expand(batch, heads, num_keys, 1)),
            padded(v, None))


def default_formulation(device: torch.device) -> str:
    """The formulation :func:`proportional_attention` runs on ``device`` (module docstring)."""
    return "channel" if device.type == "cuda" else "mask"


def proportional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    size: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    formulation: str | None = None,
) -> Tensor:
    """Multi-head attention in which key j counts ``size[j]`` times:
    ``softmax(QK^T * scale + log s) V``. With ``size=None`` this is exactly
    ``F.scaled_dot_product_attention``.

    Args:
        q: (B, H, M, D) queries (M may be fewer than the N keys).
        k: (B, H, N, D) keys.
        v: (B, H, N, D) values.
        size: (B, N, 1) sizes of the tokens, or ``None`` for no bias.
        dropout_p: attention dropout, as ``F.scaled_dot_product_attention`` takes it.
        scale: the logits' scale (default: ``D ** -0.5``).
        formulation: ``"mask"`` or ``"channel"`` (module docstring); default: the
            faster one on ``q``'s device.

    Returns:
        (B, H, M, D) the attended values.
    """
    if size is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    formulation = default_formulation(q.device) if formulation is None else formulation
    if formulation == "mask":
        return attention_with_mask(q, k, v, size, dropout_p=dropout_p, scale=scale)
    if formulation == "channel":
        return attention_with_channel(q, k, v, size, dropout_p=dropout_p, scale=scale)
    raise ValueError(f"unknown formulation {formulation!r}; expected one of {', '.join(FORMULATIONS)}")
