"""Fused Triton kernels and their autograd wrappers.

Triton is imported under a guard: on a machine without it the package still imports and
:func:`triton_unavailable_reason` says why the ``triton`` backend cannot run.
"""

from __future__ import annotations

import torch

from .env import (
    AUTOTUNE_ENV,
    HAS_TRITON,
    device_capability,
    interpreter_enabled,
    interpreter_range,
    triton_unavailable_reason,
)

__all__ = [
    "AUTOTUNE_ENV",
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
    from .launch import autotune_cap

    autotune_cap.cache_clear()


def softmax_unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused softmax kernels (full, sliding window) cannot run a config, or None."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    from .flash_attention import unsupported_reason

    return unsupported_reason(variant, device, dtype, head_dim)


def favor_unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused Performer (FAVOR+) kernels cannot run a config, or None."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    from .favor import unsupported_reason

    return unsupported_reason(variant, device, dtype, head_dim)
