"""An ``nn.Module`` wrapper: q/k/v/out projections around any registered variant."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .base import AttentionVariant, get_variant

if TYPE_CHECKING:
    from .decode import DecodeState


class AttentionLayer(nn.Module):
    """Multi-head attention layer for batch-first inputs ``(B, N, E)``, backed by any variant.

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: query heads ``H``.
        variant: a registered variant name (``"full"``, ``"sliding_window"``, ``"performer"``)
            or an :class:`AttentionVariant` instance.
        num_kv_heads: key/value heads (grouped-query attention); defaults to ``num_heads``.
        causal: default causal flag of :meth:`forward`.
        backend: backend used by :meth:`forward` (``"auto"`` by default).
        bias: whether the projections have a bias.
        **options: the variant's options, e.g. ``window=128`` or ``num_features=256``.

    Example:
        >>> layer = AttentionLayer(256, 4, "sliding_window", window=64, causal=True)
        >>> y = layer(torch.randn(2, 1000, 256))   # (2, 1000, 256)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        variant: str | AttentionVariant = "full",
        *,
        num_kv_heads: int | None = None,
        causal: bool = False,
        backend: str = "auto",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be an int, got {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if isinstance(variant, AttentionVariant):
            if options:
                raise TypeError("options are given to the variant instance, not to AttentionLayer")
            self.attn = variant
        else:
            self.attn = get_variant(variant, **options)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.backend = causal, backend
        kv_dim = self.head_dim * num_kv_heads
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``x (B, Nq, E)`` attends to ``context (B, Nk, E)`` (default: ``x``); returns ``(B, Nq, E)``.

        ``key_padding_mask``: optional bool ``(B, Nk)``, True for a real token; padded tokens are
        invisible as keys (see :meth:`AttentionVariant.__call__`)."""
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, N, {self.embed_dim}), got {shape}")
        context = x if context is None else context
        if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[-1] != self.embed_dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must have shape (B, N, {self.embed_dim}), got {shape}")
        b, nq, _ = x.shape
        nk = context.shape[1]
        q = self.q_proj(x).view(b, nq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, nk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(b, nk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        causal = self.causal if causal is None else causal
        out = self.attn(q, k, v, causal=causal, backend=self.backend, key_padding_mask=key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, self.embed_dim))

    def init_state(self, batch: int, *, capacity: int | None = None) -> DecodeState:
        """An empty decoding state for :meth:`step` (the variant's, in the projections' dtype and device)."""
        w = self.k_proj.weight
        return self.attn.init_state(
            batch, self.num_kv_heads, self.head_dim, dtype=w.dtype, device=w.device, capacity=capacity
        )

    def step(self, x: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Causal self-attention of the next ``T`` tokens ``x (B, T, E)`` against ``state``;
        returns ``((B, T, E), state)``. Decoding is causal whatever :attr:`causal` says: steps over a
        sequence equal ``forward(sequence, causal=True)``."""
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, T, {self.embed_dim}), got {shape}")
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out, state = self.attn.step(q, k, v, state, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.embed_dim)), state

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"attn={self.attn!r}, causal={self.causal}, backend={self.backend!r}"
        )
