"""One softmax block ``(queries, keys)`` with its log-sum-exp, forward and backward.

Ring attention computes each rank's output from blocks against the key/value shards of the other
ranks, merged by their log-sum-exp; its backward recomputes each block's probabilities from the
*merged* log-sum-exp (as FlashAttention's backward does), so a block needs ``(out, lse)`` forward
and ``(dq, dk, dv)`` given the global ``out`` and ``lse``. Three implementations:

- ``"cpu_flash"``: PyTorch's fused CPU kernel, which returns its log-sum-exp
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward; private ops, guarded);
- ``"triton"``: the project's fused kernels (:mod:`attn_kernels.flash_attention`), whose
  log-sum-exp is in base 2 (converted here);
- ``"dense"``: explicit scores in float32/float64 (the ``reference`` backend, and the fallback).

A block's mask is at most a top-left causal triangle (``diag``: a chunk against itself, square)
and a key padding mask ``(B, nk)``. ``lse`` is natural-log, in the compute dtype, ``-inf`` on rows
that see no key (their ``out`` is 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import masks
from ..base import compute_dtype, repeat_kv

_CPU_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_LOG2E = 1.0 / math.log(2.0)


def block_impl(backend: str, q: Tensor, v: Tensor) -> str:
    """The block implementation behind a resolved backend name of the ``full`` variant (the fused
    CPU kernel needs one head size for q, k and v)."""
    if backend == "triton":
        return "triton"
    fused = _CPU_FWD is not None and _CPU_BWD is not None and q.shape[-1] == v.shape[-1]
    if backend == "torch" and q.device.type == "cpu" and fused:
        return "cpu_flash"
    return "dense"


def _visible_rows(kpm: Tensor | None, nq: int, diag: bool, like: Tensor) -> Tensor | None:
    """Bool ``(B, 1, nq)`` rows that see a real key (None: all do)."""
    if kpm is None:
        return None
    return masks.keys_seen(kpm, nq, causal=diag)[:, None, :]


def _dense_scores(q: Tensor, k: Tensor, diag: bool, scale: float, kpm: Tensor | None) -> Tensor:
    cd = compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), repeat_kv(k, q.shape[1] // k.shape[1]).to(cd).transpose(-1, -2)) * scale
    mask = None
    if diag:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril_()
    if kpm is not None:
        pad = kpm[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return s if mask is None else s.masked_fill(~mask, -math.inf)


def _safe(lse: Tensor) -> Tensor:
    return torch.where(torch.isinf(lse), torch.zeros((), dtype=lse.dtype, device=lse.device), lse)


def block_forward(
    impl: str, q: Tensor, k: Tensor, v: Tensor, diag: bool, scale: float, kpm: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(out (B,H,nq,Dv), lse (B,H,nq))`` of one block, both in the compute dtype."""
    cd = compute_dtype(q.dtype)
    if impl == "dense":
        s = _dense_scores(q, k, diag, scale, kpm)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _safe(lse)[..., None])
        return torch.matmul(p, repeat_kv(v, q.shape[1] // k.shape[1]).to(cd)), lse
    if impl == "triton":
        from attn_kernels.flash_attention import FlashOptions, _forward, padding_args

        kv_valid = krange = None
        if kpm is not None:
            kv_valid, krange = padding_args(kpm)
        opts = FlashOptions(diag, float(scale), key_valid=kv_valid, key_range=krange)
        out, lse2 = _forward(*(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)), opts)
        lse = torch.where(torch.isinf(lse2), -math.inf, lse2 / _LOG2E)
        return out.to(cd), lse.to(cd)
    assert _CPU_FWD is not None
    bias = None if kpm is None else masks.padding_bias(kpm, q.dtype)[:, None, None, :]
    out, lse = _CPU_FWD(q, k, v, 0.0, diag, attn_mask=bias, scale=scale)
    seen = _visible_rows(kpm, q.shape[2], diag, q)
    out, lse = out.to(cd), lse.to(cd)
    if seen is not None:  # a row whose keys are all padded: finite bias, so say "no key" explicitly
        lse = lse.masked_fill(~seen, -math.inf)
        out = out.masked_fill(~seen[..., None], 0.0)
    return out, lse


def block_backward(
    impl: str,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    diag: bool,
    scale: float,
    kpm: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the *merged* ``out`` (input dtype) and ``lse`` (compute dtype,
    ``-inf`` on rows that see no key anywhere; their ``dout`` must be 0). In the compute dtype."""
    cd = compute_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    if impl == "dense":
        s = _dense_scores(q, k, diag, scale, kpm)
        p = torch.exp(s - _safe(lse)[..., None])
        do, o = dout.to(cd), out.to(cd)
        kr, vr = repeat_kv(k, groups).to(cd), repeat_kv(v, groups).to(cd)
        dv = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, vr.transpose(-1, -2)) - (do * o).sum(dim=-1, keepdim=True))
        dq = torch.matmul(ds, kr) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.to(cd)) * scale
        return dq, _group_sum(dk, groups), _group_sum(dv, groups)
    # A row that sees no key anywhere has lse = -inf: +inf makes its probabilities exactly 0.
    lse_inf = torch.where(lse == -math.inf, math.inf, lse)
    if impl == "triton":
        from attn_kernels.flash_attention import FlashOptions, _backward, padding_args

        kv_valid = krange = None
        if kpm is not None:
            kv_valid, krange = padding_args(kpm)
        opts = FlashOptions(diag, float(scale), key_valid=kv_valid, key_range=krange)
        q, k, v, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, out))
        grads = _backward(q, k, v, out, (lse_inf * _LOG2E).float().contiguous(), dout.contiguous(), opts)
        return tuple(g.to(cd) for g in grads)  # type: ignore[return-value]
    assert _CPU_BWD is not None
    bias = None if kpm is None else masks.padding_bias(kpm, q.dtype)[:, None, None, :]
    lse_op = lse_inf.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    grads = _CPU_BWD(dout.contiguous(), q, k, v, out.contiguous(), lse_op, 0.0, diag, attn_mask=bias, scale=scale)
    return tuple(g.to(cd) for g in grads)  # type: ignore[return-value]


def _group_sum(x: Tensor, groups: int) -> Tensor:
    """``(B, Hk * G, N, E) -> (B, Hk, N, E)``: gradients of repeated key heads summed."""
    if groups == 1:
        return x
    b, h, n, e = x.shape
    return x.view(b, h // groups, groups, n, e).sum(dim=2)
