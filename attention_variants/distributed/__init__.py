"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

>>> from attention_variants.distributed import context_parallel_attention, shard, unshard
>>> out = context_parallel_attention(shard(q, rank, world), shard(k, rank, world), shard(v, rank, world),
...                                  "full", causal=True)

Each variant declares its strategy (``context_parallel``): ``full`` runs ring attention
(:mod:`.ring`), ``sliding_window`` a halo exchange (:mod:`.halo`), ``performer`` a reduction or
prefix scan of its feature state (:mod:`.linear`). Any other variant, a plug-in's included, runs
the exact all-gather fallback (:mod:`.gather`). :func:`strategy_of` names the one a variant gets;
:func:`analytic_bytes` gives the bytes a rank sends; :func:`count_bytes` measures them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..base import get_variant
from ..dense import compute_dtype, empty_attention
from ..performer import PerformerAttention
from ..sliding_window import SlidingWindowAttention
from .agree import agree, check_whole, local_verdict
from .blocks import block_impl
from .comm import Comm, PeerError, Traffic, count_bytes
from .gather import gather_attention, gather_bytes
from .halo import halo_attention, halo_bytes, reach_of
from .layout import LAYOUTS, chunk_ids, positions, shard, unshard
from .linear import performer_attention, performer_bytes
from .ring import RingConfig, ring_attention, ring_bytes
from .strategy import FALLBACK, STRATEGIES, strategy_of

__all__ = [
    "FALLBACK",
    "STRATEGIES",
    "LAYOUTS",
    "PeerError",
    "Traffic",
    "analytic_bytes",
    "chunk_ids",
    "context_parallel_attention",
    "count_bytes",
    "positions",
    "shard",
    "strategy_of",
    "unshard",
]


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    variant: str = "full",
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    key_padding_mask: Tensor | None = None,
    **variant_kwargs: Any,
) -> Tensor:
    """This rank's shard of ``attention(q_full, k_full, v_full, variant, ...)``.

    ``q (B, H, n, D)``, ``k (B, Hk, n, D)``, ``v (B, Hk, n, Dv)`` are this rank's shard of a
    self-attention sequence of ``N = n * P`` tokens (``P`` ranks of ``group``, default the world),
    cut by ``layout`` (see :mod:`.layout`; :func:`shard` makes the shards). ``key_padding_mask``:
    this rank's shard ``(B, n)`` of the full mask (True = real key). Global tokens of
    ``sliding_window`` are positions in the whole sequence. Returns ``(B, H, n, Dv)`` in q's
    dtype; differentiable in ``q``, ``k``, ``v``.

    Every rank must call it with the same shapes and options. The ranks first agree (:mod:`.agree`):
    a bad input on any rank, or ranks that differ, raise the same ValueError on every rank (naming
    the rank and its problem, or the field that differs). ``N`` must be a multiple of ``P``
    (contiguous) or ``2P`` (zigzag); pad it and mask the padding otherwise. A collective that fails
    because a peer rank exited raises :class:`PeerError`.
    """
    comm = Comm(group, q.device if isinstance(q, Tensor) else "cpu")
    call, inputs, error = local_verdict(
        q, k, v, variant, layout, causal, scale, backend, key_padding_mask, variant_kwargs
    )
    call = agree(comm, call, inputs, error)
    check_whole(call, comm.world)
    q, k, v, kpm, var = call.q, call.k, call.v, call.kpm, call.variant
    if q.shape[2] == 0:
        return empty_attention(q, k, v)
    kw = dict(comm=comm, layout=call.layout, causal=call.causal, scale=call.scale)
    strategy = strategy_of(var)  # check_local made sure it is valid
    if strategy == "ring":
        cfg = RingConfig(comm, block_impl(call.resolved, q, v), call.causal, call.scale, call.layout, kpm)
        return ring_attention(q, k, v, cfg)
    if strategy == "halo":
        assert isinstance(var, SlidingWindowAttention)
        return halo_attention(var, q, k, v, kpm, backend=call.resolved, **kw)
    if strategy == "scan":
        assert isinstance(var, PerformerAttention)
        return performer_attention(var, q, k, v, kpm, **kw)
    return gather_attention(var, q, k, v, kpm, backend=call.resolved, **kw)


def analytic_bytes(
    variant: str,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    *,
    world: int,
    rank: int = 0,
    layout: str = "contiguous",
    causal: bool = False,
    dtype: torch.dtype = torch.float32,
    padded: bool = False,
    **variant_kwargs: Any,
) -> dict[str, float]:
    """Bytes rank ``rank`` sends in one forward and in its backward, from the shard shapes
    ``(B, H, n, D)``, ``(B, Hk, n, D)``, ``(B, Hk, n, Dv)`` alone (the formulas in docs/context-parallel.md)."""
    b, h, n, d = q_shape
    hk, dv = k_shape[1], v_shape[3]
    elem = torch.empty((), dtype=dtype).element_size()
    celem = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    var = get_variant(variant, **variant_kwargs)
    strategy = strategy_of(var)
    if strategy == "ring":
        return {k_: float(x) for k_, x in ring_bytes(b, hk, n, d, dv, world, elem, celem, padded).items()}
    if strategy == "halo":
        assert isinstance(var, SlidingWindowAttention)
        gm = var.global_mask(n * world)
        g = 0 if gm is None else int(gm.sum())
        reach = reach_of(var, causal, n * world)
        return halo_bytes(world, layout, rank, b, h, hk, n, d, dv, elem, celem, reach, g, padded)
    if strategy == "scan":
        assert isinstance(var, PerformerAttention)
        return performer_bytes(world, layout, rank, b, hk, var.num_features, dv, celem, causal, var.kernel)
    return gather_bytes(world, b, hk, n, d, dv, elem, padded)
