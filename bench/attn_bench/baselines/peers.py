"""Peer libraries as baselines: one small adapter per peer, in the table :data:`PEERS`.

Each adapter runs a third-party implementation on OUR problem: it takes our layout
``q (B, H, Nq, D)``, ``k (B, Hk, Nk, D)``, ``v (B, Hk, Nk, Dv)`` (grouped-query when
``Hk < H``) and returns ``(B, H, Nq, Dv)``, mapping our semantics (bottom-right causal
alignment, ``(left, right)`` windows, ``scale``, the Performer's projection) onto the peer's
parameters. The mapping of each peer is written down in its ``semantics`` string; where a
peer cannot express a configuration its ``check`` (or ``make``, for shape-dependent limits)
says why, and where its math differs from ours on purpose (performer-pytorch's epsilons)
:func:`semantic_deviation` measures the difference instead of hiding it.

The peers are optional (``pip install .[peers]`` for local-attention and performer-pytorch;
``pip install flash-attn`` / ``pip install xformers`` on a CUDA machine). They are imported
lazily, inside ``check`` and ``make``, so this module imports without them.

- ``check(variant, device, dtype, head_dim, needs_grad) -> str | None``: None when the peer
  can run ``variant`` (an :class:`attention_variants.AttentionVariant`) there, else the reason.
- ``make(variant, q, k, v, causal, scale) -> fn``: ``fn(q, k, v) -> out`` for inputs of these
  shapes, dtype and device. Raises :class:`attn_bench.baselines.target.Unsupported` for shapes the peer
  cannot express (e.g. ``Nq != Nk`` where it has no bottom-right alignment).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

import attention_variants as av
from attention_variants.checks import resolve_scale
from attn_bench.baselines.peer import PEERS_EXTRA, Peer
from attn_bench.baselines.peer_flash_attn import (
    FLASH_ATTN_KVCACHE_SEMANTICS,
    FLASH_ATTN_SEMANTICS,
    _flash_attn_check,
    _flash_attn_kvcache_check,
    _flash_attn_kvcache_make,
    _flash_attn_make,
)
from attn_bench.baselines.peer_local_attention import (
    LOCAL_ATTENTION_SEMANTICS,
    _local_attention_check,
    _local_attention_make,
)
from attn_bench.baselines.peer_performer_pytorch import PERFORMER_SEMANTICS, _performer_check, _performer_make
from attn_bench.baselines.peer_xformers import XFORMERS_SEMANTICS, _xformers_check, _xformers_make
from attn_bench.baselines.registry import Baseline, register_baseline
from attn_bench.baselines.target import Target

# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            name="local_attention",
            module="local_attention",
            install=PEERS_EXTRA,
            variants=("sliding_window",),
            devices=("cpu", "cuda"),
            exact=True,
            semantics=LOCAL_ATTENTION_SEMANTICS,
            check_options=_local_attention_check,
            make=_local_attention_make,
        ),
        Peer(
            name="performer_pytorch",
            module="performer_pytorch",
            install=PEERS_EXTRA,
            variants=("performer",),
            devices=("cpu", "cuda"),
            exact=False,
            semantics=PERFORMER_SEMANTICS,
            check_options=_performer_check,
            make=_performer_make,
        ),
        Peer(
            name="flash_attn",
            module="flash_attn",
            install="pip install flash-attn (a CUDA build; not in .[peers])",
            variants=("full", "sliding_window"),
            devices=("cuda",),
            exact=True,
            semantics=FLASH_ATTN_SEMANTICS,
            check_options=_flash_attn_check,
            make=_flash_attn_make,
        ),
        Peer(
            name="flash_attn_kvcache",
            module="flash_attn",
            install="pip install flash-attn (a CUDA build; not in .[peers])",
            variants=("full", "sliding_window"),
            devices=("cuda",),
            exact=True,
            semantics=FLASH_ATTN_KVCACHE_SEMANTICS,
            check_options=_flash_attn_kvcache_check,
            make=_flash_attn_kvcache_make,
        ),
        Peer(
            name="xformers",
            module="xformers.ops",
            install="pip install xformers (a CUDA build; not in .[peers])",
            variants=("full", "sliding_window"),
            devices=("cuda",),
            exact=True,
            semantics=XFORMERS_SEMANTICS,
            check_options=_xformers_check,
            make=_xformers_make,
        ),
    )
}


def get_peer(name: str) -> Peer:
    """The peer called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; peers are {', '.join(PEERS)}") from None


def semantic_deviation(
    name: str,
    variant: av.AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float | None = None,
) -> float:
    """``max |peer - ours|`` in float64 on these inputs: the part of a peer's error that comes from
    its documented semantics, not from rounding. 0.0 for the exact peers (their tests check that
    they match our reference to rounding); measured for the others (performer-pytorch's 1e-4
    inside its features, 1e-6 in its causal normaliser, and its stabilisers), on ``q``'s device.

    The numerics gate adds it to the bound of the peer's row and reports it, rather than
    failing the row or widening every tolerance.
    """
    peer = get_peer(name)
    if peer.exact:
        return 0.0
    s = resolve_scale(scale, q.shape[-1])
    q64, k64, v64 = (t.detach().to(torch.float64) for t in (q, k, v))
    with torch.no_grad():
        ours = variant.reference(q64, k64, v64, causal=causal, scale=s)
        theirs = peer.make(variant, q64, k64, v64, causal, s)(q64, k64, v64)
    return (theirs - ours).abs().max().item() if ours.numel() else 0.0


def _peer_target(peer: Peer, variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Target:
    scale = q.shape[-1] ** -0.5
    fn = peer.make(variant, q, k, v, causal, scale)
    truth = None
    if not peer.exact:
        # Its own math in float64: the gate checks its rounding against that, and reports how
        # far that math is from ours (its documented deviation) instead of hiding it.
        def truth(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
            return peer.make(variant, a, b, c, causal, scale)(a, b, c)

    return Target(fn, variant, peer.name, False, ground_truth=truth)


def _register_peers() -> None:
    """Every peer becomes a baseline of the sweep (once, when this module is imported)."""
    for peer in PEERS.values():
        kind = "same semantics" if peer.exact else "documented deviation, measured"
        what = f"peer {peer.module} ({', '.join(peer.variants)}; {'/'.join(peer.devices)}; {kind}; {peer.install})"
        register_baseline(Baseline(peer.name, peer.check, functools.partial(_peer_target, peer), what, exact=False))


_register_peers()
