"""Small dense tensor helpers: grouped-query head repetition, the accumulation dtype and the
naive masked softmax attention that the reference backend and the CPU fallbacks build on."""

from __future__ import annotations

import torch
from torch import Tensor


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``(B, Hk, N, D) -> (B, Hk * groups, N, D)``: query head ``h`` reads key head ``h // groups``."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def normal_tensor(t: Tensor) -> Tensor:
    """``t``, or a copy of it made outside inference mode if ``t`` is an inference tensor: what a
    variant keeps (an option, a cache) must serve calls in every mode, autograd included, and an
    inference tensor can be neither saved for backward nor updated in place outside inference mode."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def padding_to_mask(mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
    """A variant's bool ``(Nq, Nk)`` mask (or None) combined with a key padding mask ``(B, Nk)``
    into one broadcastable to ``(B, H, Nq, Nk)``: ``(B, 1, Nq, Nk)``, or ``(B, 1, 1, Nk)`` for no mask."""
    if key_padding_mask is None:
        return mask
    pad = key_padding_mask[:, None, None, :]
    return pad if mask is None else mask & pad


def dense_softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Naive softmax attention in the dtype of the inputs, N x N scores; rows with no visible key give 0.

    ``q (B,H,Nq,D)``, ``k (B,H,Nk,D)``, ``v (B,H,Nk,Dv)`` (heads already repeated), ``mask`` bool
    broadcastable to ``(B,H,Nq,Nk)``.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    row_any = mask.any(dim=-1, keepdim=True)
    # Fill invisible entries with -inf, and empty rows with 0 so their softmax (discarded below)
    # stays finite and their gradient is exactly zero instead of NaN.
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~row_any, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_any
    return torch.matmul(probs, v)


def empty_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Output for ``Nq == 0`` or ``Nk == 0``: zeros of shape ``(B, H, Nq, Dv)``, still differentiable."""
    groups = q.shape[1] // k.shape[1]
    return torch.matmul(torch.matmul(q, repeat_kv(k, groups).transpose(-1, -2)), repeat_kv(v, groups))
