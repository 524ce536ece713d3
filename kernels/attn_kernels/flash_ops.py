"""The fused softmax kernels as PyTorch custom operators, for ``torch.compile``.

``torch.ops.attn_kernels.flash_fwd(q, k, v, causal, scale, left, right, has_window, global_pos,
key_valid, key_range) -> (out, lse)`` and ``flash_bwd(q, k, v, out, lse, dout, ...) -> (dq, dk,
dv)`` run the same host functions as an eager call (:func:`attn_kernels.flash_attention._forward`
and ``_backward``). Each has a fake implementation (shapes and dtypes only) and the forward an
autograd formula, so ``torch.compile(fullgraph=True)`` traces a model that uses the Triton
backend without a graph break, and AOTAutograd puts the backward kernels in the backward graph.

:func:`attn_kernels.flash_attention.flash_attention` calls these only while compiling: an eager
call through the dispatcher would cost more Python than the launch itself.

Arguments: ``left``/``right`` the band with causal folded in (read when ``has_window``);
``global_pos`` the sorted global positions (a window with ``Nq == Nk``; empty for none);
``key_valid`` int8 ``(B, Nk)`` and ``key_range`` int32 ``(B, 2)`` the key padding of
:func:`attn_kernels.flash_attention.padding_args`, or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flash_attention import FlashOptions, _backward, _forward, _last_dim_unit, global_tensors


def _options(
    q: Tensor,
    causal: bool,
    scale: float,
    left: int,
    right: int,
    has_window: bool,
    global_pos: list[int],
    key_valid: Tensor | None,
    key_range: Tensor | None,
) -> FlashOptions:
    window = (left, right) if has_window else None
    positions = tuple(global_pos) if has_window else ()
    gidx, gflag = global_tensors(positions, q.shape[2], q.device) if positions else (None, None)
    return FlashOptions(causal, scale, window, positions, gidx, gflag, key_valid, key_range)


@torch.library.custom_op("attn_kernels::flash_fwd", mutates_args=())
def flash_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    left: int,
    right: int,
    has_window: bool,
    global_pos: list[int],
    key_valid: Tensor | None,
    key_range: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Nq, Dv), lse (B, H, Nq) float32)`` of the fused forward."""
    opts = _options(q, causal, scale, left, right, has_window, global_pos, key_valid, key_range)
    return _forward(_last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), opts)


@flash_fwd.register_fake
def _flash_fwd_fake(q, k, v, causal, scale, left, right, has_window, global_pos, key_valid, key_range):
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attn_kernels::flash_bwd", mutates_args=())
def flash_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    causal: bool,
    scale: float,
    left: int,
    right: int,
    has_window: bool,
    global_pos: list[int],
    key_valid: Tensor | None,
    key_range: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of the fused backward, shaped and typed like ``q, k, v``."""
    opts = _options(q, causal, scale, left, right, has_window, global_pos, key_valid, key_range)
    q, k, v = (_last_dim_unit(t) for t in (q, k, v))
    return _backward(q, k, v, out, lse, dout, opts)


@flash_bwd.register_fake
def _flash_bwd_fake(q, k, v, out, lse, dout, causal, scale, left, right, has_window, global_pos, key_valid, key_range):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_SCALARS = ("causal", "scale", "left", "right", "has_window", "global_pos")


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, *scalars, key_valid, key_range = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scalars = scalars
    ctx.padding = (key_valid, key_range)  # int tensors: no gradient, kept as they are


def _flash_fwd_backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_bwd(q, k, v, out, lse, dout.contiguous(), *ctx.scalars, *ctx.padding)
    return (dq, dk, dv, *([None] * (len(_SCALARS) + 2)))


flash_fwd.register_autograd(_flash_fwd_backward, setup_context=_setup_context)

__all__ = ["flash_bwd", "flash_fwd"]
