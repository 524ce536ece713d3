"""Ring attention for the ``full`` variant: key/value shards travel around the ring of ranks.

Step ``s`` of ``P``: rank ``r`` holds the keys/values of rank ``(r - s) mod P`` (sent on to
``r + 1`` while it computes), attends its query chunks to their chunks, and merges the partial
outputs by their log-sum-exp in float32/float64. Causal: a key chunk after a query chunk is
skipped, the diagonal chunk runs the causal kernel. The backward (a custom autograd function,
not autograd through the collectives) walks the same ring with ``dK, dV`` travelling with
``K, V``; after ``P`` steps every rank holds the full gradient of its own keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dense import compute_dtype
from .blocks import block_backward, block_forward
from .comm import Comm
from .layout import chunk_ids, chunks_per_rank


@dataclass(frozen=True)
class RingConfig:
    comm: Comm
    impl: str
    causal: bool
    scale: float
    layout: str
    kpm: Tensor | None


def _pairs(cfg: RingConfig, src: int) -> list[tuple[int, int, bool]]:
    """(my chunk slot, src chunk slot, diagonal) of the blocks computed against rank ``src``."""
    mine, theirs = chunk_ids(cfg.comm.rank, cfg.comm.world, cfg.layout), chunk_ids(src, cfg.comm.world, cfg.layout)
    out = []
    for a, qi in enumerate(mine):
        for b, kj in enumerate(theirs):
            if cfg.causal and kj > qi:
                continue
            out.append((a, b, cfg.causal and kj == qi))
    return out


def _merge(acc_o: Tensor, acc_l: Tensor, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial softmax results; both weights are at most 1, -inf rows stay empty."""
    total = torch.logaddexp(acc_l, lse)
    safe = torch.where(torch.isinf(total), torch.zeros((), dtype=total.dtype, device=total.device), total)
    return acc_o * torch.exp(acc_l - safe)[..., None] + o * torch.exp(lse - safe)[..., None], total


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cfg: RingConfig) -> Tensor:  # type: ignore[override]
        comm, cd = cfg.comm, compute_dtype(q.dtype)
        c = q.shape[2] // chunks_per_rank(cfg.layout)
        sl = [slice(a * c, (a + 1) * c) for a in range(chunks_per_rank(cfg.layout))]
        b, h, dv = q.shape[0], q.shape[1], v.shape[-1]
        acc_o = [q.new_zeros(b, h, c, dv, dtype=cd) for _ in sl]
        acc_l = [q.new_full((b, h, c), -math.inf, dtype=cd) for _ in sl]
        cur = [k.contiguous(), v.contiguous()] + ([] if cfg.kpm is None else [cfg.kpm.contiguous()])
        for s in range(comm.world):
            src = (comm.rank - s) % comm.world
            pending = comm.ring_start(cur) if s < comm.world - 1 else None
            kk, vv = cur[0], cur[1]
            mask = cur[2] if cfg.kpm is not None else None
            for a, bb, diag in _pairs(cfg, src):
                o, lse = block_forward(
                    cfg.impl, q[:, :, sl[a]], kk[:, :, sl[bb]], vv[:, :, sl[bb]], diag, cfg.scale,
                    None if mask is None else mask[:, sl[bb]],
                )  # fmt: skip
                acc_o[a], acc_l[a] = _merge(acc_o[a], acc_l[a], o, lse)
            if pending is not None:
                comm.ring_wait(pending[1])
                cur = pending[0]
        out = torch.cat(acc_o, dim=2).to(q.dtype)
        lse = torch.cat(acc_l, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        cfg: RingConfig = ctx.cfg
        comm, cd = cfg.comm, compute_dtype(q.dtype)
        c = q.shape[2] // chunks_per_rank(cfg.layout)
        sl = [slice(a * c, (a + 1) * c) for a in range(chunks_per_rank(cfg.layout))]
        # Rows that see no key output a constant 0: no gradient flows through them.
        dout = dout.masked_fill(torch.isinf(lse)[..., None], 0.0)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        kk, vv, mask = k.contiguous(), v.contiguous(), cfg.kpm
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)
        for s in range(comm.world):
            src = (comm.rank - s) % comm.world
            for a, bb, diag in _pairs(cfg, src):
                gq, gk, gv = block_backward(
                    cfg.impl, dout[:, :, sl[a]], q[:, :, sl[a]], kk[:, :, sl[bb]], vv[:, :, sl[bb]],
                    out[:, :, sl[a]], lse[:, :, sl[a]], diag, cfg.scale, None if mask is None else mask[:, sl[bb]],
                )  # fmt: skip
                dq[:, :, sl[a]] += gq
                dk[:, :, sl[bb]] += gk
                dv[:, :, sl[bb]] += gv
            if comm.world == 1:
                break
            if s < comm.world - 1:  # keys/values go on, with the gradients gathered so far
                send = [kk, vv, dk, dv] + ([] if mask is None else [mask])
                bufs, reqs = comm.ring_start(send)
                comm.ring_wait(reqs)
                kk, vv, dk, dv = bufs[:4]
                mask = bufs[4] if mask is not None else None
            else:  # the last hop brings each rank the gradients of its own keys/values
                bufs, reqs = comm.ring_start([dk, dv])
                comm.ring_wait(reqs)
                dk, dv = bufs
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, cfg: RingConfig) -> Tensor:
    """This rank's output ``(B, H, n, Dv)`` of full attention over the sharded sequence."""
    return _RingAttention.apply(q, k, v, cfg)


def ring_bytes(
    b: int, hk: int, n: int, d: int, dv: int, world: int, elem: int, compute_elem: int, padded: bool
) -> dict[str, int]:
    """Analytic bytes one rank sends: forward ``(P-1)`` hops of ``K, V`` (and the ``(B, n)`` bool
    padding mask); backward ``P-1`` hops of ``K, V`` (and mask) plus ``P`` hops of ``dK, dV``
    (compute dtype)."""
    kv = b * hk * n * (d + dv) * elem + (b * n if padded else 0)
    dkv = b * hk * n * (d + dv) * compute_elem
    if world == 1:
        return {"forward": 0, "backward": 0}
    return {"forward": (world - 1) * kv, "backward": (world - 1) * kv + world * dkv}
