"""Sliding-window context parallelism: a halo exchange, plus gathered global tokens.

A query chunk ``[s, e)`` sees keys in ``[s - left, e + right)`` only, so each rank receives just
those keys and values that other ranks hold (one all-to-all; a window wider than a chunk reaches
past the neighbour, and zigzag chunks have two halos each), then runs the variant's own backend on
the chunk against that contiguous key range, with the window shifted to the range's alignment.

Global tokens: their queries, keys and values are gathered once (an all-reduce of a buffer in
which each rank fills the rows it owns). Non-global rows then attend to their band plus the global
keys outside it, densely per chunk (O(chunk * (chunk + window + g))). Each rank computes the global
queries' rows against its own keys with their log-sum-exp; the rows are reduced across ranks
(all-reduce MAX of the log-sum-exp, then one all-reduce SUM of the rescaled numerators and
normalisers) and every rank keeps the rows of the global queries it holds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import masks
from ..dense import compute_dtype, dense_softmax_attention, repeat_kv
from ..sliding_window import SlidingWindowAttention
from .comm import Comm
from .layout import chunk_ids, chunks_per_rank, positions


def _ranges(rank: int, world: int, layout: str, c: int, reach: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Per chunk of ``rank``: ``(start, end, lh, rh)``; keys ``[start - lh, end + rh)`` are needed."""
    n_total = world * chunks_per_rank(layout) * c
    out = []
    for i in chunk_ids(rank, world, layout):
        s, e = i * c, (i + 1) * c
        out.append((s, e, min(reach[0], s), min(reach[1], n_total - e)))
    return out


def _needed(rank: int, world: int, layout: str, c: int, reach: tuple[int, int]) -> set[int]:
    """Positions of the keys ``rank`` needs from other ranks."""
    need: set[int] = set()
    for s, e, lh, rh in _ranges(rank, world, layout, c, reach):
        need.update(range(s - lh, e + rh))
    return need - set(positions(rank, world, layout, c * chunks_per_rank(layout)).tolist())


def halo_plan(world: int, layout: str, n: int, reach: tuple[int, int]) -> list[list[list[int]]]:
    """``plan[src][dst]``: sorted positions rank ``src`` sends to rank ``dst`` (derived from the
    layout alone: every rank computes the same plan, no communication)."""
    c = n // chunks_per_rank(layout)
    own = [set(positions(r, world, layout, n).tolist()) for r in range(world)]
    need = [_needed(r, world, layout, c, reach) for r in range(world)]
    return [[sorted(own[src] & need[dst]) if src != dst else [] for dst in range(world)] for src in range(world)]


def reach_of(variant: SlidingWindowAttention, causal: bool, total: int) -> tuple[int, int]:
    return masks.clamp_reach(*masks.window_bounds(variant.window, causal), total, total)


def halo_attention(
    variant: SlidingWindowAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kpm: Tensor | None,
    *,
    comm: Comm,
    layout: str,
    causal: bool,
    scale: float,
    backend: str,
) -> Tensor:
    """This rank's output ``(B, H, n, Dv)`` of sliding-window attention over the sharded sequence."""
    world, rank, n = comm.world, comm.rank, q.shape[2]
    per = chunks_per_rank(layout)
    c, total = n // per, n * world
    reach = reach_of(variant, causal, total)
    mine = positions(rank, world, layout, n).tolist()
    local = {p: i for i, p in enumerate(mine)}
    plan = halo_plan(world, layout, n, reach)
    send_idx = [local[p] for dst in range(world) for p in plan[rank][dst]]
    recv_pos = [p for src in range(world) for p in plan[src][rank]]
    d = k.shape[3]

    # Rows (position, B, Hk, D + Dv): own ones, then those received, looked up by position.
    kv = torch.cat([k, v], dim=-1).permute(2, 0, 1, 3)
    got = comm.all_to_all(
        kv[send_idx], [len(plan[rank][r]) for r in range(world)], [len(plan[s][rank]) for s in range(world)]
    )
    table = torch.cat([kv, got])
    row_of = {p: i for i, p in enumerate(mine + recv_pos)}
    pad_table = None
    if kpm is not None:
        pm = kpm.T.to(torch.uint8).contiguous()  # (n, B)
        pm_got = comm.all_to_all(
            pm[send_idx], [len(plan[rank][r]) for r in range(world)], [len(plan[s][rank]) for s in range(world)]
        )
        pad_table = torch.cat([pm, pm_got]).bool()

    gm = variant.global_mask(total, q.device)
    glob = None if gm is None else _gather_globals(q, k, v, kpm, gm, mine, comm, got)
    outs = []
    for a, (s, e, lh, rh) in enumerate(_ranges(rank, world, layout, c, reach)):
        rows = torch.tensor([row_of[p] for p in range(s - lh, e + rh)], device=q.device)
        krange = table[rows].permute(1, 2, 0, 3)
        kr, vr = krange[..., :d], krange[..., d:]
        pr = None if pad_table is None else pad_table[rows].T
        qa = q[:, :, a * c : (a + 1) * c]
        if glob is None:
            sw = SlidingWindowAttention((reach[0] + rh, reach[1] - rh))
            outs.append(sw(qa, kr, vr, causal=causal, scale=scale, backend=backend, key_padding_mask=pr))
        else:
            outs.append(_band_with_globals(variant, qa, kr, vr, pr, s, lh, rh, total, gm, glob, causal, scale))
    out = torch.cat(outs, dim=2)
    if glob is not None:
        out = _global_rows(out, q, k, v, kpm, gm, mine, glob, comm, causal, scale)
    return out


def _gather_globals(
    q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, gm: Tensor, mine: list[int], comm: Comm, halo: Tensor
) -> dict[str, Tensor]:
    """Queries, keys, values (and padding) of the global positions, on every rank: one all-reduce
    of a ``(g, ...)`` buffer in which each rank fills the rows it owns.

    The buffer is made to depend (times zero) on this rank's rows and on the received ``halo``,
    on every rank: the backward then runs each collective on every rank, in one order (row
    reduction, this gather, the halo exchange), as gloo needs, whichever rows a rank owns."""
    gpos = gm.nonzero().flatten().tolist()
    slot = {p: i for i, p in enumerate(gpos)}
    own = [(i, slot[p]) for i, p in enumerate(mine) if p in slot]
    b, h, _, d = q.shape
    parts = [
        q.permute(2, 0, 1, 3).reshape(len(mine), -1),
        torch.cat([k, v], -1).permute(2, 0, 1, 3).reshape(len(mine), -1),
    ]
    if kpm is not None:
        parts.append(kpm.T.to(q.dtype))
    rows = torch.cat(parts, dim=1)
    buf = rows.new_zeros(len(gpos), rows.shape[1])
    if own:
        idx = torch.tensor([i for i, _ in own], device=q.device)
        buf = buf.index_copy(0, torch.tensor([s for _, s in own], device=q.device), rows[idx])
    buf = comm.all_reduce_sum(buf + 0.0 * (rows.sum() + halo.sum()))
    hk, dv = k.shape[1], v.shape[3]
    nq = b * h * d
    qg = buf[:, :nq].reshape(len(gpos), b, h, d).permute(1, 2, 0, 3)
    kvg = buf[:, nq : nq + b * hk * (d + dv)].reshape(len(gpos), b, hk, d + dv).permute(1, 2, 0, 3)
    out = {"pos": torch.tensor(gpos, device=q.device), "q": qg, "k": kvg[..., :d], "v": kvg[..., d:]}
    if kpm is not None:
        out["pad"] = buf[:, nq + b * hk * (d + dv) :].T.detach() > 0.5
    return out


def _band_with_globals(
    variant: SlidingWindowAttention, qa: Tensor, kr: Tensor, vr: Tensor, pr: Tensor | None,
    s: int, lh: int, rh: int, total: int, gm: Tensor, glob: dict[str, Tensor], causal: bool, scale: float,
) -> Tensor:  # fmt: skip
    """Chunk queries ``[s, s + c)`` against their key range plus the global keys outside it (dense)."""
    c = qa.shape[2]
    kpos = torch.arange(s - lh, s + c + rh, device=qa.device)
    outside = (glob["pos"] < s - lh) | (glob["pos"] >= s + c + rh)
    kpos = torch.cat([kpos, glob["pos"][outside]])
    kk = torch.cat([kr, glob["k"][:, :, outside]], dim=2)
    vv = torch.cat([vr, glob["v"][:, :, outside]], dim=2)
    mod = masks.mask_mod(total, total, causal=causal, window=variant.window, global_mask=gm)
    assert mod is not None
    mask = mod(torch.arange(s, s + c, device=qa.device)[:, None], kpos[None, :])
    if pr is not None:
        pad = torch.cat([pr, glob["pad"][:, outside]], dim=1)
        mask = mask[None, None] & pad[:, None, None, :]
    cd = compute_dtype(qa.dtype)
    groups = qa.shape[1] // kk.shape[1]
    out = dense_softmax_attention(qa.to(cd), repeat_kv(kk, groups).to(cd), repeat_kv(vv, groups).to(cd), mask, scale)
    return out.to(qa.dtype)


def _global_rows(
    out: Tensor, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, gm: Tensor, mine: list[int],
    glob: dict[str, Tensor], comm: Comm, causal: bool, scale: float,
) -> Tensor:  # fmt: skip
    """Replace the rows of this rank's global queries by the all-rank reduction of their partials."""
    cd = compute_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    s = torch.matmul(glob["q"].to(cd), repeat_kv(k, groups).to(cd).transpose(-1, -2)) * scale  # (B, H, g, n)
    pos = torch.tensor(mine, device=q.device)
    mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        mask = pos[None, :] <= glob["pos"][:, None]
    if kpm is not None:
        mask = mask[None, None] & kpm[:, None, None, :]
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, g), -inf where no own key is visible
    zero = torch.zeros((), dtype=cd, device=q.device)
    p = torch.exp(s - torch.where(torch.isinf(lse), zero, lse)[..., None])
    part = torch.matmul(p, repeat_kv(v, groups).to(cd))
    top = comm.all_reduce_max(lse)
    w = torch.exp(lse - torch.where(torch.isinf(top), zero, top))
    red = comm.all_reduce_sum(torch.cat([part * w[..., None], w[..., None]], dim=-1))
    num, den = red[..., :-1], red[..., -1:]
    rows = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), zero).to(out.dtype)
    slot = {int(p): i for i, p in enumerate(glob["pos"].tolist())}
    own = [(i, slot[p]) for i, p in enumerate(mine) if p in slot]
    if not own:  # still part of the graph, so that every rank runs the reduction's backward
        return out + 0.0 * rows.sum()
    dst = torch.tensor([i for i, _ in own], device=q.device)
    return out.index_copy(2, dst, rows[:, :, [j for _, j in own]])


def halo_bytes(
    world: int, layout: str, rank: int, b: int, h: int, hk: int, n: int, d: int, dv: int, elem: int, compute_elem: int,
    reach: tuple[int, int], g: int, padded: bool,
) -> dict[str, float]:  # fmt: skip
    """Analytic bytes rank ``rank`` sends (see docs/context-parallel.md): the halo rows it owns that others need,
    ``B (Hk (D + Dv) elem + padded)`` bytes each; with ``g`` global tokens, the gather
    ``2 (P-1)/P g B (H D + Hk (D + Dv) + padded) elem`` and the row reduction
    ``2 (P-1)/P B H g (Dv + 2) compute_elem``. Backward: the halo received, sent back as gradients,
    and the two differentiable all-reduces again."""
    if world == 1:
        return {"forward": 0.0, "backward": 0.0}
    plan = halo_plan(world, layout, n, reach)
    sent = sum(len(x) for x in plan[rank])
    received = sum(len(plan[s][rank]) for s in range(world))
    row = b * hk * (d + dv) * elem
    fwd, bwd = sent * (row + (b if padded else 0)), received * row
    if g:
        ring = 2.0 * (world - 1) / world
        gather = ring * g * (b * h * d + b * hk * (d + dv) + (b if padded else 0)) * elem
        fwd += gather + ring * b * h * g * compute_elem + ring * b * h * g * (dv + 1) * compute_elem
        bwd += gather + ring * b * h * g * (dv + 1) * compute_elem
    return {"forward": fwd, "backward": bwd}
