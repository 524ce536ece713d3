"""Fused softmax attention (full and sliding window) in Triton: placeholder until the kernels land."""

from __future__ import annotations

import torch
from torch import Tensor


def unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return "the fused Triton softmax-attention kernels are not implemented yet"


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    window: tuple[int, int] | None = None,
    global_mask: Tensor | None = None,
) -> Tensor:
    raise NotImplementedError("the fused Triton softmax-attention kernels are not implemented yet")
