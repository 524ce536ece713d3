"""Input checks shared by the public entry points (variants, decoding, context parallelism).

Backends and kernels assume inputs that passed these checks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_qkv(q: object, k: object, v: object) -> None:
    """Check ranks, shapes, dtypes and devices of ``q (B,H,Nq,D)``, ``k (B,Hk,Nk,D)``, ``v (B,Hk,Nk,Dv)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, N, D), got shape {tuple(t.shape)}")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; q, k and v must share one device")
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {k.shape[1]}, v {v.shape[1]}")
    hk = k.shape[1]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hk}) for grouped-query attention")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[3] != d:
        raise ValueError(f"q and k must have the same head dim, got q {d}, k {k.shape[3]}")


def validate_key_padding_mask(key_padding_mask: object, q: Tensor, k: Tensor) -> Tensor | None:
    """Check ``key_padding_mask``: None, or a bool tensor ``(B, Nk)`` on q's device (True = a real key)."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got dtype {key_padding_mask.dtype}")
    want = (q.shape[0], k.shape[2])
    if tuple(key_padding_mask.shape) != want:
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = {want}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(
            f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}; it must be on q's device"
        )
    return key_padding_mask


def resolve_scale(scale: object, head_dim: int) -> float:
    """``scale`` or the default ``head_dim ** -0.5``; must be a positive finite number."""
    if scale is None:
        return head_dim**-0.5 if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def check_causal(causal: object) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return causal


def shape4(x: Tensor | Sequence[int]) -> tuple[int, ...]:
    shape = tuple(x.shape) if isinstance(x, Tensor) else tuple(int(s) for s in x)
    if len(shape) != 4:
        raise ValueError(f"expected a 4-dim shape (B, H, N, D), got {shape}")
    return shape
