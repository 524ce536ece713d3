"""Fused Triton kernels and their autograd wrappers.

Triton is imported under a guard: on a machine without it the package still imports and
:func:`triton_unavailable_reason` says why the ``triton`` backend cannot run.
"""

from __future__ import annotations

import torch

from . import env
from .env import (
    AUTOTUNE_ENV,
    DIRECT_LAUNCH_ENV,
    HAS_TRITON,
    device_capability,
    interpreter_enabled,
    interpreter_range,
    triton_unavailable_reason,
)

__all__ = [
    "AUTOTUNE_ENV",
    "DIRECT_LAUNCH_ENV",
    "HAS_TRITON",
    "device_capability",
    "favor_unsupported_reason",
    "interpreter_enabled",
    "interpreter_range",
    "refresh_environment",
    "softmax_unsupported_reason",
    "triton_unavailable_reason",
]


def refresh_environment() -> None:
    """Forget the environment variables the kernels read once per process (``TRITON_INTERPRET``,
    :data:`AUTOTUNE_ENV`): the next call reads them again. For tests that change them."""
    interpreter_enabled.cache_clear()
    _REASONS.clear()
    from .launch import autotune_cap, direct_launch_enabled

    autotune_cap.cache_clear()
    direct_launch_enabled.cache_clear()


_REASONS: dict[tuple, str | None] = {}


def softmax_unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused softmax kernels (full, sliding window) cannot run a config, or None.

    The answer depends on the device, dtype, head dim and environment only (not on the variant's
    options), so it is worked out once per such key: a call's backend check is a dict lookup."""
    key = (device, dtype, head_dim, interpreter_enabled(), env.HAS_TRITON)
    if key in _REASONS:
        return _REASONS[key]
    reason = triton_unavailable_reason(device)
    if reason is None:
        from .flash_attention import unsupported_reason

        reason = unsupported_reason(variant, device, dtype, head_dim)
    if len(_REASONS) >= 256:
        _REASONS.clear()
    _REASONS[key] = reason
    return reason


def favor_unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused Performer (FAVOR+) kernels cannot run a config, or None (worked out once
    per device, dtype, head dim, environment and the variant's feature count and kernel)."""
    features, kernel = getattr(variant, "num_features", None), getattr(variant, "kernel", "softmax")
    key = ("favor", device, dtype, head_dim, interpreter_enabled(), env.HAS_TRITON, features, kernel)
    if key in _REASONS:
        return _REASONS[key]
    reason = triton_unavailable_reason(device)
    if reason is None:
        from .favor import unsupported_reason

        reason = unsupported_reason(variant, device, dtype, head_dim)
    if len(_REASONS) >= 256:
        _REASONS.clear()
    _REASONS[key] = reason
    return reason
