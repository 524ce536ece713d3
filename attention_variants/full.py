"""Exact softmax attention: reference, PyTorch (SDPA) and Triton backends side by side."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from . import masks
from .base import (
    AttentionVariant,
    compute_dtype,
    dense_softmax_attention,
    register_backend,
    register_variant,
    repeat_kv,
)
from .base import _reference_forward as _reference


@register_variant("full")
class FullAttention(AttentionVariant):
    """Exact softmax attention ``softmax(q k^T * scale) v``, optionally causal (bottom-right).

    O(N^2 d) time; the ``torch`` and ``triton`` backends use O(N) extra memory.
    """

    def dense(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, upcast: bool = True) -> Tensor:
        nq, nk = q.shape[2], k.shape[2]
        mask = masks.dense_mask(nq, nk, causal=True, device=q.device) if causal else None
        return softmax_dense(q, k, v, mask, scale, upcast)

    def visible_pairs(self, nq: int, nk: int, causal: bool) -> int:
        return masks.visible_pairs(nq, nk, causal=causal)


def softmax_dense(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, upcast: bool) -> Tensor:
    """Dense softmax attention with GQA heads repeated; float32/float64 math when ``upcast``."""
    groups = q.shape[1] // k.shape[1]
    dtype = compute_dtype(q.dtype) if upcast else q.dtype
    out = dense_softmax_attention(
        q.to(dtype), repeat_kv(k, groups).to(dtype), repeat_kv(v, groups).to(dtype), mask, scale
    )
    return out.to(q.dtype)


register_backend(FullAttention, "reference")(_reference)


@register_backend(FullAttention, "torch")
def _full_torch(variant: AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if nq > nk:
        # The first nq - nk queries see no key (bottom-right alignment): their rows are 0.
        tail = F.scaled_dot_product_attention(q[:, :, nq - nk :], k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        head = tail.new_zeros(q.shape[0], q.shape[1], nq - nk, v.shape[-1])
        return torch.cat([head, tail], dim=2)
    if gqa:  # CausalBias does not forward enable_gqa on every PyTorch release
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk), scale=scale)


def _softmax_triton_check(
    variant: AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int
) -> str | None:
    from kernels import softmax_unsupported_reason

    return softmax_unsupported_reason(variant, device, dtype, head_dim)


@register_backend(FullAttention, "triton", check=_softmax_triton_check)
def _full_triton(variant: AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    from kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, causal=causal, scale=scale)
