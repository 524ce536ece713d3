"""Performer (FAVOR+) context parallelism: the feature state is all that crosses ranks.

Every rank draws the same projection ``W`` (same seed, drawn on the CPU). The per-feature key
stabiliser is the maximum over *all* keys, as on one process: each rank's maximum, then an
all-reduce MAX (no gradient; the shift cancels in the ratio). Non-causal: one all-reduce SUM of
``S = phi(K)^T [V, 1]`` ``(B, Hk, m, Dv + 1)``. Causal: an exclusive prefix scan of the per-chunk
states (LASP-style): the running sum is handed from rank to rank in sequence order, so each rank
sends at most one state per chunk it holds, flat in ``P``; each chunk then runs the chunked causal
form with its prefix as its start. The per-shard compute is the ``torch`` backend's feature maps and causal
chunk form, whichever backend is named (the fused Triton kernel does not expose its state).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..dense import compute_dtype
from ..favor import (
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
from ..performer import PerformerAttention
from .comm import Comm
from .layout import chunk_ids, chunks_per_rank


def _owners(world: int, layout: str) -> list[int]:
    """``owners[i]``: the rank holding chunk ``i`` of the sequence."""
    out = [0] * (world * chunks_per_rank(layout))
    for r in range(world):
        for i in chunk_ids(r, world, layout):
            out[i] = r
    return out


class _ExclusiveScan(torch.autograd.Function):
    """Exclusive prefix sum of the chunk states along the sequence, passed from chunk to chunk.

    ``states (c, ...)``: this rank's chunk states in shard order; returns ``starts (c, ...)``,
    the sum of the states of every earlier chunk of the sequence. The running sum walks the
    chunks in sequence order and crosses to another rank only where the owner changes (LASP's
    ring pass): each rank sends at most one state per chunk it holds, whatever ``P`` is. The
    backward walks back with the gradient (an exclusive suffix sum). The walk is sequential in
    ``P``; the state is small (``m (Dv + 1)`` per head), so it is latency, not bandwidth.
    """

    @staticmethod
    def _walk(comm: Comm, owners: list[int], local: dict[int, Tensor], order: range, op: str) -> dict[int, Tensor]:
        carry: Tensor | None = None  # sum over the chunks walked so far (on the rank walking them)
        template = next(iter(local.values()))
        out: dict[int, Tensor] = {}
        prev = None
        for i in order:
            if prev is not None and owners[prev] != owners[i]:
                if comm.rank == owners[prev]:
                    assert carry is not None
                    comm.send(carry, owners[i], op)
                if comm.rank == owners[i]:
                    carry = torch.empty_like(template)
                    comm.recv(carry, owners[prev], op)
            if comm.rank == owners[i]:
                out[i] = torch.zeros_like(template) if carry is None else carry.clone()
                carry = local[i] if carry is None else carry + local[i]
            prev = i
        return out

    @staticmethod
    def forward(ctx, states: Tensor, comm: Comm, layout: str) -> Tensor:  # type: ignore[override]
        ids = chunk_ids(comm.rank, comm.world, layout)
        owners = _owners(comm.world, layout)
        ctx.comm, ctx.ids, ctx.owners = comm, ids, owners
        local = {i: states[a] for a, i in enumerate(ids)}
        starts = _ExclusiveScan._walk(comm, owners, local, range(len(owners)), "scan")
        return torch.stack([starts[i] for i in ids])

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        local = {i: g[a] for a, i in enumerate(ctx.ids)}
        # d state_j = sum of d start_i over the chunks i after j: the same walk, from the end.
        grads = _ExclusiveScan._walk(ctx.comm, ctx.owners, local, range(len(ctx.owners) - 1, -1, -1), "scan_bwd")
        return torch.stack([grads[i] for i in ctx.ids]), None, None


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
    # Every rank's output depends on ``starts`` (zeros on the first chunk), so every rank runs the
    # scan's backward and the walk back meets every send with its receive.
    starts = _ExclusiveScan.apply(states, comm, layout)  # (per, B, Hk, m, Dv + 1)
    outs = []
    for a in range(per):
        out, _ = _causal_piece(phi_q[:, :, pieces[a]], phi_k[:, :, pieces[a]], v1[:, :, pieces[a]], starts[a], [])
        outs.append(out)
    return torch.cat(outs, dim=2).to(q.dtype)


def performer_bytes(
    world: int,
    layout: str,
    rank: int,
    b: int,
    hk: int,
    m: int,
    dv: int,
    compute_elem: int,
    causal: bool,
    kernel: str,
) -> dict[str, float]:
    """Analytic bytes one rank sends: the MAX all-reduce of the ``(B, Hk, m)`` shift (softmax
    kernel), then non-causal the SUM all-reduce of ``S`` ``(B, Hk, m, Dv + 1)`` (and again in the
    backward), causal one state per hand-over of the running prefix that leaves this rank (contiguous:
    1, the last rank 0; zigzag: 2, the first and last ranks 1), the same walking back."""
    if world == 1:
        return {"forward": 0.0, "backward": 0.0}
    ring = 2.0 * (world - 1) / world
    state = b * hk * m * (dv + 1) * compute_elem
    fwd = ring * b * hk * m * compute_elem if kernel == "softmax" else 0.0
    if not causal:
        return {"forward": fwd + ring * state, "backward": ring * state}
    owners = _owners(world, layout)
    # the running sum leaves this rank after chunk i when chunk i + 1 (forward) or i - 1 (backward) is another's
    sends_fwd = sum(owners[i] == rank != owners[i + 1] for i in range(len(owners) - 1))
    sends_bwd = sum(owners[i] == rank != owners[i - 1] for i in range(1, len(owners)))
    return {"forward": fwd + sends_fwd * state, "backward": float(sends_bwd * state)}
