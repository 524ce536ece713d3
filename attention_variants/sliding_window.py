"""Sliding-window (Longformer-style) attention with optional global tokens.

Reference (dense band mask), PyTorch (blocked, never N x N) and Triton backends side by side.
The mask semantics live in :mod:`attention_variants.masks`.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import masks
from .base import (
    AttentionVariant,
    SweepOption,
    compute_dtype,
    dense_softmax_attention,
    register_backend,
    register_variant,
    repeat_kv,
)
from .decode import DecodeState, StateLayout, WindowCache, triton_step
from .full import FullAttention, _softmax_triton_check

MAX_DECODE_REACH = 1 << 62  # a wider decoding window sees every key anyway; keeps slot arithmetic in int64

# Query block of the blocked PyTorch backend. Each block of BLOCK_Q queries attends to a
# window of BLOCK_Q + left + right keys in one fused SDPA call; 32 balances the wasted
# corner work (which grows with the block) against GEMM efficiency (which falls below it).
BLOCK_Q = 32


@register_variant("sliding_window")
class SlidingWindowAttention(AttentionVariant):
    """Each query sees the keys within ``window`` of its (bottom-right aligned) position,
    plus optional global tokens; see :mod:`attention_variants.masks` for the exact rule.

    Args:
        window: an int ``w`` (``(w, w)``, or ``(w, 0)`` when causal) or a pair ``(left, right)``.
        global_tokens: an int ``g`` (the first ``g`` positions), a 1-D bool mask or a
            sequence/tensor of positions. Global positions attend everywhere and are attended
            by every query; they need ``Nq == Nk``.
    """

    softmax = True
    context_parallel = "halo"
    kernel_family = "flash"
    sweep_options = (SweepOption("window", 128, "sliding-window size w (keys each side; w back when causal)", "w"),)
    verify_options = ({"window": (5, 3)}, {"window": 16, "global_tokens": 2})

    def __init__(self, window: masks.WindowArg, global_tokens: masks.GlobalArg = None) -> None:
        self.window = masks.check_window(window)
        self.global_tokens = masks.check_global_tokens(global_tokens)
        g = self.global_tokens
        if isinstance(global_tokens, Sequence) and isinstance(g, Tensor):
            # Positions given in Python are known now: no call reads them back from a tensor
            # (which torch.compile could not trace).
            self._global_positions = (g, g._version, sorted({int(p) for p in global_tokens}))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("window", "global_tokens")

    def options(self) -> dict[str, object]:
        return {"window": self.window, "global_tokens": self.global_tokens}

    def global_mask(self, n: int, device: torch.device | str = "cpu") -> Tensor | None:
        """Bool mask ``(n,)`` of the global positions for sequence length ``n`` (None if none)."""
        return masks.global_mask(self.global_tokens, n, device)

    def check_call(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
        nq, nk = q.shape[2], k.shape[2]
        if self.global_tokens is None or (isinstance(self.global_tokens, int) and self.global_tokens == 0):
            return
        if nq != nk:
            raise ValueError(f"global_tokens need Nq == Nk, got Nq={nq}, Nk={nk}")
        # The rules of masks.global_mask, checked on the positions read once (no device sync per call).
        g = self.global_tokens
        if isinstance(g, int):
            if g > nq:
                raise ValueError(f"global_tokens={g} is more than the sequence length {nq}")
        elif g.dtype == torch.bool:
            if g.numel() != nq:
                raise ValueError(f"global_tokens bool mask has length {g.numel()}, expected the sequence length {nq}")
        elif (positions := self.global_positions()) and positions[-1] >= nq:
            raise ValueError(f"global_tokens position {positions[-1]} is out of range for sequence length {nq}")

    def mask_mod(self, nq: int, nk: int, causal: bool, device: torch.device | str = "cpu") -> masks.MaskMod | None:
        gm = self.global_mask(nq, device) if nq == nk else None
        return masks.mask_mod(nq, nk, causal=causal, window=self.window, global_mask=gm)

    def dense_mask(self, nq: int, nk: int, causal: bool, device: torch.device | str = "cpu") -> Tensor:
        """Bool ``(nq, nk)`` visibility matrix of this variant (dense; for references and baselines)."""
        return masks.dense_from_mod(self.mask_mod(nq, nk, causal, device), nq, nk, device)

    def visible_pairs(self, nq: int, nk: int, causal: bool) -> int:
        gm = self.global_mask(nq) if nq == nk else None
        return masks.visible_pairs(nq, nk, causal=causal, window=self.window, global_mask=gm)

    def global_positions(self) -> list[int]:
        """The global positions, sorted, as absolute token positions (a bool mask's True entries).

        Worked out once per value of ``global_tokens`` (a tensor's are read from the device once,
        not at every decoding step)."""
        g = self.global_tokens
        if g is None:
            return []
        if isinstance(g, int):
            return list(range(g))
        cached = getattr(self, "_global_positions", None)
        # While compiling, a tensor's version counter is not a number to compare: the positions
        # known from an earlier call or the constructor are used as they are.
        fresh = cached is not None and cached[0] is g and (torch.compiler.is_compiling() or cached[1] == g._version)
        if not fresh:
            pos = g.nonzero().flatten() if g.dtype == torch.bool else g
            cached = self._global_positions = (g, g._version, sorted({int(p) for p in pos.tolist()}))
        return list(cached[2])

    # -- decoding: a ring buffer of the last left + 1 tokens, plus the global tokens -----------------
    # Global positions must lie in the first step (the prefill): a global *query* sees every
    # earlier key, which a window-sized state no longer holds.

    def decode_left(self) -> int:
        """How many keys back a decoding query sees (decoding is causal: ``right`` plays no part)."""
        return min(masks.window_bounds(self.window, True)[0], MAX_DECODE_REACH)

    def decode_options(self) -> dict[str, object]:
        """``window``: the reach back (so ``4`` and ``(4, 2)`` decode alike); ``global_tokens``:
        the sorted global positions."""
        return {"window": self.decode_left(), "global_tokens": tuple(self.global_positions())}

    def decode_state(self, layout: StateLayout, *, capacity: int) -> WindowCache:
        return WindowCache(layout, left=self.decode_left(), capacity=capacity)

    def decode_step(self, q: Tensor, k: Tensor, v: Tensor, state: DecodeState, scale: float, backend: str) -> Tensor:
        assert isinstance(state, WindowCache)
        start, t, left = state.length, q.shape[2], state.left
        gpos = self.global_positions()
        if start == 0:
            return self._decode_first(q, k, v, state, scale, backend, [p for p in gpos if p < t])
        reached = [p for p in gpos if start <= p < start + t]
        if reached:
            raise ValueError(
                f"this step covers global position {reached[0]}, but decoding supports global tokens only "
                "within the first step (the prefill): a global query sees every earlier key, which the "
                "window's ring buffer does not keep"
            )
        # Global keys the queries cannot see through the band: positions < (query position) - left.
        glob = state.global_pos
        if triton_step(backend, q):
            from attn_kernels.decode import softmax_step

            # Split-KV kernel over the ring's positions [start - left, start), before this step's
            # write (which may overwrite the oldest of them), plus the new tokens and the globals.
            out = softmax_step(
                q, state.ring_k, state.ring_v, k, v, start=start, lo=max(0, start - left), scale=scale,
                left=left, period=state.period, global_k=state.global_k, global_v=state.global_v,
                global_pos=state.global_idx,
            )  # fmt: skip
            state.write(k, v, start)
            return out
        if t == 1 and backend in FullAttention._backends:
            # One query sees all the ring holds after the write, and the globals left of the band:
            # softmax does not care about key order, so attend to the ring in place.
            state.write(k, v, start)
            n = min(start + 1, state.period)
            ks, vs = state.ring_k[:, :, :n], state.ring_v[:, :, :n]
            extra = bisect.bisect_left(glob, start - left)
            if extra:
                ks = torch.cat([state.global_k[:, :, :extra], ks], dim=2)
                vs = torch.cat([state.global_v[:, :, :extra], vs], dim=2)
            return FullAttention()(q, ks, vs, causal=False, scale=scale, backend=backend)
        first = max(0, start - left)
        ks, vs = state.ordered(first, start)
        ks, vs = torch.cat([ks, k], dim=2), torch.cat([vs, v], dim=2)
        if not glob:
            out = SlidingWindowAttention((left, 0))(q, ks, vs, causal=True, scale=scale, backend=backend)
        else:
            pos_q = torch.arange(start, start + t, device=q.device)[:, None]
            pos_k = torch.arange(first, start + t, device=q.device)[None, :]
            band = (pos_k <= pos_q) & (pos_k >= pos_q - left)
            outside = torch.tensor(glob, device=q.device)[None, :] < pos_q - left
            mask = torch.cat([outside, band], dim=1)
            ks = torch.cat([state.global_k, ks], dim=2)
            vs = torch.cat([state.global_v, vs], dim=2)
            out = _masked_attention(q, ks, vs, mask, scale, upcast=backend == "reference")
        state.write(k, v, start)
        return out

    def _decode_first(
        self, q: Tensor, k: Tensor, v: Tensor, state: WindowCache, scale: float, backend: str, gpos: list[int]
    ) -> Tensor:
        """The first step: the causal forward, with the global positions that fall inside it."""
        first = SlidingWindowAttention(self.window, torch.tensor(gpos, dtype=torch.long) if gpos else None)
        out = first(q, k, v, causal=True, scale=scale, backend=backend)
        if gpos:
            idx = torch.tensor(gpos, device=k.device)
            state.global_pos = gpos
            state.global_idx = idx.to(torch.int32)
            state.global_k, state.global_v = k[:, :, idx].clone(), v[:, :, idx].clone()
        state.write(k, v, 0)
        return out


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, upcast: bool) -> Tensor:
    """Softmax attention under a bool ``(T, Nk)`` mask (every row sees a key), GQA by repetition."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if upcast:
        dtype = compute_dtype(q.dtype)
        return dense_softmax_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@register_backend(SlidingWindowAttention, "torch", padding=True)
def _sliding_torch(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    assert isinstance(variant, SlidingWindowAttention)
    if q.is_meta:
        # Meta tensors (shape inference) hold no values, and the blocked layout reads its masks:
        # the dense formula gives the same shapes, dtype and autograd graph at no cost on meta.
        return variant.dense(q, k, v, causal, scale, upcast=False, key_padding_mask=key_padding_mask)
    gm = variant.global_mask(q.shape[2], q.device) if q.shape[2] == k.shape[2] else None
    return banded_attention(q, k, v, variant.window, causal, scale, gm, key_padding_mask)


@register_backend(SlidingWindowAttention, "triton", check=_softmax_triton_check, padding=True)
def _sliding_triton(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    from attn_kernels.flash_attention import flash_attention

    assert isinstance(variant, SlidingWindowAttention)
    positions = variant.global_positions() if q.shape[2] == k.shape[2] else ()
    window = masks.clamp_reach(*masks.window_bounds(variant.window, causal), q.shape[2], k.shape[2])
    return flash_attention(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        window=window,
        global_positions=positions,
        key_padding_mask=key_padding_mask,
    )


@dataclass(frozen=True)
class _BandLayout:
    """Blocking of one (Nq, Nk, left, right) problem: block ``b`` holds queries
    ``[b*block, (b+1)*block)`` and sees keys ``first_key + b*block + [0, span)``."""

    block: int
    num_blocks: int
    span: int
    first_key: int
    pad_left: int
    pad_right: int
    mask: Tensor  # (num_blocks, block, span) bool
    bias: Tensor  # (1, num_blocks, block, span) additive mask: 0 where visible, -inf elsewhere
    row_any: Tensor | None  # (Nq, 1) bool, None when every query sees some key


@functools.lru_cache(maxsize=32)
def _band_layout(nq: int, nk: int, left: int, right: int, device: torch.device, dtype: torch.dtype) -> _BandLayout:
    """Blocking and per-block masks, cached: a model calls the same shapes layer after layer."""
    bq = min(BLOCK_Q, nq)
    nb = math.ceil(nq / bq)
    span = bq + left + right
    first = nk - nq - left  # key index at window slot 0 of block 0
    pad_l = max(0, -first)
    pad_r = max(0, (nb - 1) * bq + first + span - nk)
    tq = torch.arange(bq, device=device)[:, None]
    tk = torch.arange(span, device=device)[None, :]
    blk = torch.arange(nb, device=device)[:, None, None] * bq
    j, i = blk + first + tk, blk + tq
    rel = tk - tq  # j - (aligned query position) + left
    mask = (rel >= 0) & (rel <= left + right) & (j >= 0) & (j < nk) & (i < nq)
    # A row with no visible key gets one unmasked slot so the fused kernel never sees an
    # empty row (its output and gradient could be NaN on some devices); it is zeroed after.
    row_any = mask.any(dim=-1)
    mask[..., 0] |= ~row_any
    row_any = row_any.reshape(-1)[:nq, None]
    bias = _additive(mask, dtype)[None]
    return _BandLayout(bq, nb, span, first, pad_l, pad_r, mask, bias, None if bool(row_any.all()) else row_any)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask -> additive float mask (SDPA would convert a bool mask on every call)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: masks.WindowArg,
    causal: bool,
    scale: float,
    global_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Blocked sliding-window attention in O(N * (w + g)) time and memory.

    Queries are cut into blocks of ``BLOCK_Q``; block ``b`` sees the contiguous key range
    ``[b*BLOCK_Q + off - left, b*BLOCK_Q + off + BLOCK_Q - 1 + right]`` (``off = Nk - Nq``),
    taken as an overlapping strided view of the padded keys (no copy), plus the ``g`` global
    keys appended. One fused SDPA call per query-head group runs all blocks with a per-block
    ``(BLOCK_Q, S)`` additive mask, passed 4-D ``(1, nb, BLOCK_Q, S)`` since PyTorch's fused CPU
    kernel takes 4-D masks and falls back to a slow path for 3-D ones. Global query rows are then
    recomputed against every key.

    ``key_padding_mask (B, Nk)`` (True = real key) adds a per-batch bias on each block's key
    columns, so the blocks then run one batch element per call (the mask stays 4-D and
    ``(1, nb, BLOCK_Q, S)``); rows left with no visible real key are set to 0.
    """
    bsz, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = h // hk
    off = nk - nq
    # A reach beyond the key range sees nothing more: clamp it so the layout stays small.
    left, right = masks.clamp_reach(*masks.window_bounds(window, causal), nq, nk)
    lay = _band_layout(nq, nk, left, right, q.device, q.dtype)
    bq, nb, span = lay.block, lay.num_blocks, lay.span

    def windows(x: Tensor) -> Tensor:  # (B, Hk, N, E) -> (B, Hk, nb, span, E), a strided view
        xp = F.pad(x, (0, 0, lay.pad_left, lay.pad_right)) if lay.pad_left or lay.pad_right else x
        return xp[:, :, lay.first_key + lay.pad_left :].unfold(2, span, bq)[:, :, :nb].transpose(-1, -2)

    kw, vw = windows(k), windows(v)
    bias, row_any = lay.bias, lay.row_any
    # Key index of every block column (nb, span), and, with padding, which columns hold a real key.
    j = torch.arange(nb, device=q.device)[:, None] * bq + lay.first_key + torch.arange(span, device=q.device)
    real = None
    if key_padding_mask is not None:
        real = key_padding_mask[:, j.clamp(0, max(nk - 1, 0))] & ((j >= 0) & (j < nk))  # (B, nb, span)

    if global_mask is not None:
        gpos = global_mask.nonzero().flatten()
        i = torch.arange(nb, device=q.device)[:, None, None] * bq + torch.arange(bq, device=q.device)[:, None]
        # Global keys are appended to every block; drop them from the band so none counts twice.
        not_global = ~global_mask[j.clamp(0, nk - 1)][:, None, :]
        gcols = (i < nq).expand(nb, bq, gpos.numel())
        if causal:
            gcols = gcols & (gpos[None, None, :] <= i + off)
        mask = torch.cat([lay.mask & not_global, gcols], dim=-1)
        mask[..., 0] |= ~mask.any(dim=-1)  # see _band_layout
        bias = _additive(mask, q.dtype)[None]
        kg = k[:, :, gpos, None].transpose(2, 3).expand(bsz, hk, nb, gpos.numel(), d)
        vg = v[:, :, gpos, None].transpose(2, 3).expand(bsz, hk, nb, gpos.numel(), dv)
        kw = torch.cat([kw, kg], dim=3)
        vw = torch.cat([vw, vg], dim=3)
        if real is not None:
            real = torch.cat([real, key_padding_mask[:, None, gpos].expand(bsz, nb, gpos.numel())], dim=-1)

    qp = F.pad(q, (0, 0, 0, nb * bq - nq)) if nb * bq != nq else q
    qp = qp.view(bsz, hk, groups, nb, bq, d) if qp.is_contiguous() else qp.reshape(bsz, hk, groups, nb, bq, d)
    kw = kw.reshape(bsz * hk, nb, kw.shape[3], d)
    vw = vw.reshape(bsz * hk, nb, vw.shape[3], dv)

    def blocks(b: slice, attn_mask: Tensor) -> Tensor:  # batch elements b -> (len(b) * Hk, [G,] nb, bq, Dv)
        kb, vb = kw[b.start * hk : b.stop * hk], vw[b.start * hk : b.stop * hk]
        outs = [
            F.scaled_dot_product_attention(qp[b, :, g].reshape(-1, nb, bq, d), kb, vb, attn_mask=attn_mask, scale=scale)
            for g in range(groups)
        ]
        return outs[0] if groups == 1 else torch.stack(outs, dim=1)

    if real is None:
        out = blocks(slice(0, bsz), bias)
    else:
        # Finite bias on padded columns (see masks.padding_bias); one call per batch element.
        pad_bias = masks.padding_bias(real, q.dtype)[:, :, None, :]  # (B, nb, 1, S)
        out = torch.cat([blocks(slice(b, b + 1), bias + pad_bias[b]) for b in range(bsz)])
    out = out.reshape(bsz, h, nb * bq, dv)[:, :, :nq]
    if row_any is not None and key_padding_mask is None:  # with padding, all empty rows are zeroed below
        out = torch.where(row_any, out, out.new_zeros(()))

    if global_mask is not None:
        # Global query rows see every (causally visible) key: recompute them densely, g x Nk.
        gpos = global_mask.nonzero().flatten()
        rows_mask = None
        if causal:
            rows_mask = torch.arange(nk, device=q.device)[None, :] <= gpos[:, None] + off
        if key_padding_mask is not None:
            rows_mask = masks.padding_bias(key_padding_mask, q.dtype)[:, None, None, :] + (
                0.0 if rows_mask is None else _additive(rows_mask, q.dtype)
            )
        rows = F.scaled_dot_product_attention(
            q[:, :, gpos], k, v, attn_mask=rows_mask, scale=scale, enable_gqa=groups > 1
        )
        out = out.index_copy(2, gpos, rows)
    if key_padding_mask is not None:
        seen = masks.window_rows_seen(key_padding_mask, nq, window, causal, global_mask)
        out = torch.where(seen[:, None, :, None], out, out.new_zeros(()))
    return out
