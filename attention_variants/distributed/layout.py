"""Sequence layouts of context parallelism: which tokens each rank holds.

The sequence of length ``N`` is cut into equal chunks. ``"contiguous"``: ``P`` chunks of
``N / P`` tokens, rank ``r`` holds chunk ``r``. ``"zigzag"``: ``2P`` chunks of ``N / (2P)``
tokens, rank ``r`` holds chunks ``r`` and ``2P - 1 - r`` (in that order), which gives every rank
the same number of causally visible (query, key) pairs::

    P = 2, N = 8      positions  0 1 | 2 3 | 4 5 | 6 7
    contiguous        rank       0 0   0 0   1 1   1 1
    zigzag            rank       0 0   1 1   1 1   0 0

Uneven ``N`` (not a multiple of ``P``, or of ``2P`` for zigzag) is refused with a ValueError:
pad the sequence to a multiple and pass a ``key_padding_mask`` that hides the padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: object) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a str, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if check_layout(layout) == "zigzag" else 1


def chunk_ids(rank: int, world: int, layout: str) -> list[int]:
    """Indices of the chunks rank ``rank`` holds, in the order they sit in its shard."""
    if chunks_per_rank(layout) == 1:
        return [rank]
    return [rank, 2 * world - 1 - rank]


def check_length(n: int, world: int, layout: str, name: str = "N") -> None:
    """ValueError unless a sequence of length ``n`` splits into this layout's equal chunks."""
    parts = world * chunks_per_rank(layout)
    if n % parts:
        raise ValueError(
            f"{name}={n} is not a multiple of {parts} ({world} ranks, layout={layout!r}); pad the sequence "
            f"to a multiple of {parts} and hide the padding with key_padding_mask"
        )


def positions(rank: int, world: int, layout: str, shard_len: int, device: torch.device | str = "cpu") -> Tensor:
    """Absolute positions ``(shard_len,)`` of the tokens in rank ``rank``'s shard."""
    per = chunks_per_rank(layout)
    c = shard_len // per
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(rank, world, layout)])


def shard(x: Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Rank ``rank``'s shard of the full sequence ``x`` along ``dim`` (2 for ``(B, H, N, D)``;
    use ``dim=1`` for a ``(B, N)`` key padding mask). Contiguous, a copy for zigzag."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_rank(rank, world)
    n = x.shape[dim]
    check_length(n, world, layout)
    c = n // (world * chunks_per_rank(layout))
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(rank, world, layout)]
    return torch.cat(parts, dim=dim).contiguous()


def unshard(shards: list[Tensor] | tuple[Tensor, ...], layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full sequence from the shards of every rank, in rank order (inverse of :func:`shard`)."""
    world = len(shards)
    if world == 0:
        raise ValueError("shards must hold one tensor per rank, got none")
    per = chunks_per_rank(layout)
    n = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"shards must share one shape, got {[tuple(s.shape) for s in shards]}")
    if n % per:
        raise ValueError(f"a zigzag shard holds two equal chunks, got length {n} along dim {dim}")
    c = n // per
    pieces: dict[int, Tensor] = {}
    for r, s in enumerate(shards):
        for j, i in enumerate(chunk_ids(r, world, layout)):
            pieces[i] = s.narrow(dim, j * c, c)
    return torch.cat([pieces[i] for i in range(world * per)], dim=dim)


def _check_rank(rank: object, world: object) -> None:
    for name, value in (("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    assert isinstance(rank, int) and isinstance(world, int)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world and world >= 1, got rank={rank}, world={world}")
