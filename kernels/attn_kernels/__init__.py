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


def _reason(family: str, key: tuple, variant: object, device: torch.device, dtype: torch.dtype, head_dim: int):
    """The support check of a kernel family, worked out once per ``key`` (what the answer depends
    on, with the environment added): a call's backend check is then a dict lookup."""
    key = (family, *key, device, dtype, head_dim, interpreter_enabled(), env.HAS_TRITON)
    if key in _REASONS:
        return _REASONS[key]
    reason = triton_unavailable_reason(device)
    if reason is None:
        if family == "softmax":
            from .flash_attention import unsupported_reason
        else:
            from .favor import unsupported_reason
        reason = unsupported_reason(variant, device, dtype, head_dim)
    if len(_REASONS) >= 256:
        _REASONS.clear()
    _REASONS[key] = reason
    return reason


def softmax_unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused softmax kernels (full, sliding window) cannot run a config, or None (it
    depends on the device, dtype, head dim and environment, not on the variant's options)."""
    return _reason("softmax", (), variant, device, dtype, head_dim)


def favor_unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused Performer (FAVOR+) kernels cannot run a config, or None (it depends on the
    device, dtype, head dim, environment and the variant's feature count and kernel)."""
    options = (getattr(variant, "num_features", None), getattr(variant, "kernel", "softmax"))
    return _reason("favor", options, variant, device, dtype, head_dim)
