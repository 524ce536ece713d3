"""The exact fallback of context parallelism, for every variant without a strategy of its own.

Each rank sends its keys and values (and its key padding) to every other rank (one all-to-all:
an all-gather), puts what it holds then in sequence order, and runs the variant's own backend
over the whole sequence with its queries at their positions; the query rows of the other ranks
are zeros, and only this rank's rows are kept. This is exact for any attention whose output row
depends only on its own query and on the keys and values, whatever the variant's mask, causal
rule or normalisation. The cost: every rank computes the whole sequence (more ranks bring no
speed-up), and the bytes are those of an all-gather of K and V (:func:`gather_bytes`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import AttentionVariant
from .comm import Comm
from .layout import positions


def _gathered(x: Tensor, comm: Comm, order: Tensor) -> Tensor:
    """Every rank's rows ``x (n, ...)``, in sequence order ``(N, ...)`` (differentiable)."""
    n, world = x.shape[0], comm.world
    rows = comm.all_to_all(x.repeat(world, *([1] * (x.dim() - 1))), [n] * world, [n] * world)
    return rows[order]


def gather_attention(
    variant: AttentionVariant,
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
    """This rank's output ``(B, H, n, Dv)``: ``variant`` over the gathered sequence, own rows kept."""
    world, n, d = comm.world, q.shape[2], k.shape[3]
    held = torch.cat([positions(r, world, layout, n, q.device) for r in range(world)])
    order = torch.argsort(held)  # received row i holds position held[i]
    kv = _gathered(torch.cat([k, v], dim=-1).permute(2, 0, 1, 3), comm, order).permute(1, 2, 0, 3)
    pad = None
    if kpm is not None:
        pad = _gathered(kpm.T.to(torch.uint8).contiguous(), comm, order).T.bool()
    mine = positions(comm.rank, world, layout, n, q.device)
    whole_q = q.new_zeros(q.shape[0], q.shape[1], n * world, d).index_copy(2, mine, q)
    out = variant(whole_q, kv[..., :d], kv[..., d:], causal=causal, scale=scale, backend=backend, key_padding_mask=pad)
    return out.index_select(2, mine)


def gather_bytes(world: int, b: int, hk: int, n: int, d: int, dv: int, elem: int, padded: bool) -> dict[str, float]:
    """Analytic bytes one rank sends: forward its ``n`` rows of K and V to each of the ``P - 1``
    others, ``(P - 1) n B Hk (D + Dv) elem`` (plus ``(P - 1) n B`` bytes of padding mask);
    backward the gradients of the rows it received back to their owners, as many bytes again
    (without the mask)."""
    rows = (world - 1) * n * b * hk * (d + dv) * elem
    return {"forward": float(rows + ((world - 1) * n * b if padded else 0)), "backward": float(rows)}
