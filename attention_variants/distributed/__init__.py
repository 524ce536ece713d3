"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

>>> from attention_variants.distributed import context_parallel_attention, shard, unshard
>>> out = context_parallel_attention(shard(q, rank, world), shard(k, rank, world), shard(v, rank, world),
...                                  "full", causal=True)

Per variant: ``full`` runs ring attention (:mod:`.ring`), ``sliding_window`` a halo exchange
(:mod:`.halo`), ``performer`` a reduction or prefix scan of its feature state (:mod:`.linear`).
:func:`analytic_bytes` gives the bytes a rank sends; :func:`count_bytes` measures them.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..base import BACKENDS, get_variant
from ..checks import check_causal, resolve_scale, validate_key_padding_mask, validate_qkv
from ..dense import compute_dtype, empty_attention
from ..full import FullAttention
from ..performer import PerformerAttention
from ..sliding_window import SlidingWindowAttention
from .blocks import block_impl
from .comm import Comm, Traffic, count_bytes
from .halo import halo_attention, halo_bytes, reach_of
from .layout import LAYOUTS, check_layout, check_length, chunk_ids, positions, shard, unshard
from .linear import performer_attention, performer_bytes
from .ring import RingConfig, ring_attention, ring_bytes

__all__ = [
    "LAYOUTS",
    "Traffic",
    "analytic_bytes",
    "chunk_ids",
    "context_parallel_attention",
    "count_bytes",
    "positions",
    "shard",
    "unshard",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    this rank's shard ``(B, n)`` of the full mask (True = real key). Returns ``(B, H, n, Dv)`` in
    q's dtype; differentiable in ``q``, ``k``, ``v``. Every rank must call it with the same
    shapes and options: a mismatch raises ValueError on every rank. ``N`` must be a multiple of
    ``P`` (contiguous) or ``2P`` (zigzag); pad it and mask the padding otherwise.
    """
    validate_qkv(q, k, v)
    layout = check_layout(layout)
    causal = check_causal(causal)
    scale = resolve_scale(scale, q.shape[-1])
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"context parallelism is self-attention: q and k shards need one length, got {q.shape[2]} and {k.shape[2]}"
        )
    kpm = validate_key_padding_mask(key_padding_mask, q, k)
    var = get_variant(variant, **variant_kwargs)
    comm = Comm(group, q.device)
    _agree(comm, q, k, v, kpm, layout, causal, scale, repr(var) + backend)
    n_total = q.shape[2] * comm.world
    check_length(n_total, comm.world, layout)
    name = var.resolve_backend(backend, q, v, padding=kpm is not None)
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: context parallelism runs the backends {', '.join(BACKENDS)}")
    if q.shape[2] == 0:
        return empty_attention(q, k, v)
    var.check_call(q, k, v, causal)
    if isinstance(var, FullAttention):
        cfg = RingConfig(comm, block_impl(name, q, v), causal, scale, layout, kpm)
        return ring_attention(q, k, v, cfg)
    if isinstance(var, SlidingWindowAttention):
        var.global_mask(n_total)  # validates the global positions against N
        return halo_attention(var, q, k, v, kpm, comm=comm, layout=layout, causal=causal, scale=scale, backend=name)
    if isinstance(var, PerformerAttention):
        return performer_attention(var, q, k, v, kpm, comm=comm, layout=layout, causal=causal, scale=scale)
    raise ValueError(f"variant {variant!r} has no context-parallel algorithm (full, sliding_window, performer do)")


def _agree(
    comm: Comm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kpm: Tensor | None,
    layout: str,
    causal: bool,
    scale: float,
    variant: str,
) -> None:
    """Every rank's shapes and options must match; a ValueError on every rank otherwise (never a hang)."""
    mine = [*q.shape, k.shape[1], v.shape[3], _DTYPES.index(q.dtype), LAYOUTS.index(layout), int(causal)]
    mine += [int(kpm is not None), zlib.crc32(repr((round(scale, 12), variant)).encode())]
    every = comm.gather_ints(mine)
    if any(e != every[0] for e in every):
        names = "B, H, n, D, Hk, Dv, dtype, layout, causal, padded, options"
        rows = "; ".join(f"rank {r}: {e[:9]}" for r, e in enumerate(every))
        raise ValueError(f"context_parallel_attention: ranks disagree on ({names}): {rows}")


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
    if isinstance(var, FullAttention):
        return {k_: float(x) for k_, x in ring_bytes(b, hk, n, d, dv, world, elem, celem, padded).items()}
    if isinstance(var, SlidingWindowAttention):
        gm = var.global_mask(n * world)
        g = 0 if gm is None else int(gm.sum())
        reach = reach_of(var, causal, n * world)
        return halo_bytes(world, layout, rank, b, h, hk, n, d, dv, elem, celem, reach, g, padded)
    if isinstance(var, PerformerAttention):
        return performer_bytes(world, layout, rank, b, hk, var.num_features, dv, celem, causal, var.kernel)
    raise ValueError(f"variant {variant!r} has no context-parallel algorithm")
