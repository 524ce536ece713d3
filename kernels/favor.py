"""Fused Performer (FAVOR+) attention in Triton: placeholder until the kernels land."""

from __future__ import annotations

import torch
from torch import Tensor


def unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return "the fused Triton FAVOR+ kernels are not implemented yet"


def favor_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, causal: bool, scale: float, kernel: str) -> Tensor:
    raise NotImplementedError("the fused Triton FAVOR+ kernels are not implemented yet")
