"""Performer (FAVOR+) context parallelism: the feature state is all that crosses ranks.

Every rank draws the same projection ``W`` (same seed, drawn on the CPU). The per-feature key
stabiliser is the maximum over *all* keys, as on one process: each rank's maximum, then an
all-reduce MAX (no gradient; the shift cancels in the ratio). Non-causal: one all-reduce SUM of
``S = phi(K)^T [V, 1]`` ``(B, Hk, m, Dv + 1)``. Causal: an exclusive prefix scan of the per-chunk
states (LASP-style), done as one all-gather of the per-chunk states followed by a local sum of the
chunks before each of this rank's chunks; the chunk itself then runs the chunked causal form with
that state as its start. The per-shard compute is the ``torch`` backend's feature maps and causal
chunk form, whichever backend is named (the fused Triton kernel does not expose its state).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..base import compute_dtype
from ..performer import (
    PerformerAttention,
    _causal_piece,
    _drop_padded,
    _group,
    _key_logits,
    _normalise,
    _repeat_heads,
    _with_ones,
    key_features,
    query_features,
)
from .comm import Comm, _record, nbytes
from .layout import chunk_ids, chunks_per_rank


class _AllGather(torch.autograd.Function):
    """``x (k, ...)`` from every rank stacked in rank order ``(P * k, ...)``; the backward sums each
    rank's gradient slices back to their owner (a reduce-scatter done as an all-to-all)."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm) -> Tensor:  # type: ignore[override]
        ctx.comm = comm
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(comm.world)]
        _record("all_gather", (comm.world - 1) * nbytes(x))
        dist.all_gather(out, x, group=comm.group)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        comm: Comm = ctx.comm
        k = g.shape[0] // comm.world
        got = comm._all_to_all(g, (k,) * comm.world, (k,) * comm.world, "all_gather_bwd")
        return got.view(comm.world, k, *g.shape[1:]).sum(dim=0), None


def performer_attention(
    variant: PerformerAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kpm: Tensor | None,
    *,
    comm: Comm,
    layout: str,
    causal: bool,
    scale: float,
) -> Tensor:
    """This rank's output ``(B, H, n, Dv)`` of FAVOR+ attention over the sharded sequence."""
    cd = compute_dtype(q.dtype)
    b, h, n, _ = q.shape
    hk, dv = k.shape[1], v.shape[3]
    ws = variant.projection_matrix(q.shape[-1], q.device, cd) * scale**0.5
    shift = None
    if variant.kernel == "softmax":
        with torch.no_grad():
            local = _drop_padded(_key_logits(k, ws, scale), kpm, -math.inf).amax(dim=-2, keepdim=True)
            top = comm.all_reduce_max(local)
            shift = top.masked_fill_(top == -math.inf, 0.0)  # a batch element with no real key anywhere
    q_shift = _repeat_heads(shift, h // hk)
    phi_q = query_features(q, ws, scale, variant.kernel, q_shift)
    phi_k = key_features(k, ws, scale, variant.kernel, shift, kpm)
    v1 = _with_ones(v.to(cd))
    if not causal:
        state = comm.all_reduce_sum(torch.matmul(phi_k.transpose(-1, -2), v1))  # (B, Hk, m, Dv + 1)
        return _normalise(torch.matmul(_group(phi_q, hk), state[:, :, None])).reshape(b, h, n, dv).to(q.dtype)
    per = chunks_per_rank(layout)
    c = n // per
    pieces = [slice(a * c, (a + 1) * c) for a in range(per)]
    states = torch.stack([torch.matmul(phi_k[:, :, p].transpose(-1, -2), v1[:, :, p]) for p in pieces])
    every = _AllGather.apply(states, comm)  # (P * per, B, Hk, m, Dv + 1), rank r's chunks at [r * per, ...)
    ids = [i for r in range(comm.world) for i in chunk_ids(r, comm.world, layout)]
    outs = []
    for a, i in enumerate(chunk_ids(comm.rank, comm.world, layout)):
        # Indexing even with no earlier chunk keeps every rank's output a function of the gather,
        # so every rank runs its backward (gloo needs each collective on every rank).
        before = torch.tensor([j for j, cid in enumerate(ids) if cid < i], dtype=torch.long, device=q.device)
        start = every[before].sum(dim=0)
        out, _ = _causal_piece(phi_q[:, :, pieces[a]], phi_k[:, :, pieces[a]], v1[:, :, pieces[a]], start, [])
        outs.append(out)
    return torch.cat(outs, dim=2).to(q.dtype)


def performer_bytes(
    world: int, layout: str, b: int, hk: int, m: int, dv: int, compute_elem: int, causal: bool, kernel: str
) -> dict[str, float]:
    """Analytic bytes one rank sends: the MAX all-reduce of the ``(B, Hk, m)`` shift (softmax
    kernel), then non-causal the SUM all-reduce of ``S`` ``(B, Hk, m, Dv + 1)`` (and again in the
    backward), causal the all-gather of this rank's chunk states (and an all-to-all of their
    gradients in the backward)."""
    if world == 1:
        return {"forward": 0.0, "backward": 0.0}
    ring = 2.0 * (world - 1) / world
    state = b * hk * m * (dv + 1) * compute_elem
    fwd = ring * b * hk * m * compute_elem if kernel == "softmax" else 0.0
    if not causal:
        return {"forward": fwd + ring * state, "backward": ring * state}
    per = chunks_per_rank(layout)
    return {"forward": fwd + (world - 1) * per * state, "backward": float((world - 1) * per * state)}
