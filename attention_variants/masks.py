"""Mask semantics, written down once: causal alignment, sliding windows, global tokens.

Every backend (dense reference, blocked PyTorch, Triton) and the benchmark baselines
derive their masks from the functions here.

Causal alignment is bottom-right (as FlashAttention 2.1+). Query ``i`` sits at the
aligned position ``p = i + (Nk - Nq)`` and, when causal, sees key ``j`` iff ``j <= p``::

    Nq = 2, Nk = 5, causal          Nq = 5, Nk = 2, causal
        keys 0 1 2 3 4                  keys 0 1
    q0       x x x x .              q0       . .      <- no visible key: output 0
    q1       x x x x x              q1       . .
                                    q2       . .
                                    q3       x .
                                    q4       x x

Sliding window ``(left, right)``: query ``i`` sees key ``j`` iff
``p - left <= j <= p + right`` (causal, when set, applies on top). An int ``w``
means ``(w, w)``, or ``(w, 0)`` when causal. Window ``(2, 1)``, Nq = Nk = 6::

        keys 0 1 2 3 4 5
    q0       x x . . . .
    q1       x x x . . .
    q2       x x x x . .
    q3       . x x x x .
    q4       . . x x x x
    q5       . . . x x x

Global tokens (Longformer): a global position attends to every key and every query
attends to it; causal still applies. With window ``(1, 1)`` and global position 0::

        keys 0 1 2 3 4
    q0       x x x x x      <- global row
    q1       x x x . .
    q2       x x x x .
    q3       x . x x x      <- column 0 is global
    q4       x . . x x
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .dense import normal_tensor

WindowArg = int | tuple[int, int]
GlobalArg = int | Sequence[int] | Tensor | None
MaskMod = Callable[[Tensor, Tensor], Tensor]
"""A mask predicate ``mod(qi, ki) -> bool``: True where query ``qi`` sees key ``ki``. It takes integer
tensors that broadcast against each other, so one definition gives the dense ``(Nq, Nk)`` mask
(``qi`` a column, ``ki`` a row of indices) and a FlexAttention ``mask_mod`` (scalar indices)."""


def _check_nonneg_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return int(value)


def check_window(window: object) -> WindowArg:
    """Validate a window argument (an int ``w`` or a pair ``(left, right)``); return it as given."""
    if isinstance(window, tuple | list):
        if len(window) != 2:
            raise ValueError(f"window must be an int or a pair (left, right), got {window!r}")
        return (_check_nonneg_int(window[0], "window[0] (left)"), _check_nonneg_int(window[1], "window[1] (right)"))
    return _check_nonneg_int(window, "window")


def window_bounds(window: WindowArg, causal: bool) -> tuple[int, int]:
    """Effective ``(left, right)`` reach of a window, causal folded in (right becomes 0)."""
    if isinstance(window, tuple):
        left, right = window
    else:
        left, right = window, (0 if causal else window)
    if causal:
        right = 0
    return left, right


def clamp_reach(left: int, right: int, nq: int, nk: int) -> tuple[int, int]:
    """``(left, right)`` clamped to the sequences: with bottom-right alignment a reach of ``nk``
    to the left or ``nq`` to the right already sees every key, so a wider one (up to any
    Python int) gives the same mask while keeping index arithmetic inside int64."""
    return min(left, nk), min(right, nq)


def check_global_tokens(global_tokens: object) -> GlobalArg:
    """Validate the ``global_tokens`` option (count, positions, or bool mask) without knowing N."""
    if global_tokens is None:
        return None
    if isinstance(global_tokens, Tensor):
        if global_tokens.is_meta:
            raise ValueError("global_tokens must hold values (a bool mask or positions), got a meta tensor")
        if global_tokens.ndim != 1:
            raise ValueError(f"global_tokens as a tensor must be 1-D, got shape {tuple(global_tokens.shape)}")
        if global_tokens.dtype != torch.bool and (global_tokens.is_floating_point() or global_tokens.is_complex()):
            raise TypeError(f"global_tokens must be a bool mask or integer positions, got dtype {global_tokens.dtype}")
        if global_tokens.dtype != torch.bool and global_tokens.numel() and int(global_tokens.min()) < 0:
            raise ValueError("global_tokens positions must be non-negative")
        return normal_tensor(global_tokens)
    if isinstance(global_tokens, Sequence) and not isinstance(global_tokens, str):
        positions = [_check_nonneg_int(p, "global_tokens[i]") for p in global_tokens]
        return torch.tensor(positions, dtype=torch.long)
    return _check_nonneg_int(global_tokens, "global_tokens")


def global_mask(global_tokens: GlobalArg, n: int, device: torch.device | str = "cpu") -> Tensor | None:
    """Resolve ``global_tokens`` to a bool mask of shape ``(n,)``, or None when there are none."""
    if global_tokens is None:
        return None
    if torch.device(device).type == "meta":
        # Meta tensors hold no values; the positions do not depend on the data: resolve on the CPU.
        mask = global_mask(global_tokens, n, "cpu")
        return None if mask is None else mask.to(device)
    if isinstance(global_tokens, int):
        if global_tokens == 0:
            return None
        if global_tokens > n:
            raise ValueError(f"global_tokens={global_tokens} is more than the sequence length {n}")
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[:global_tokens] = True
        return mask
    tokens = global_tokens.to(device)
    if tokens.dtype == torch.bool:
        if tokens.numel() != n:
            raise ValueError(f"global_tokens bool mask has length {tokens.numel()}, expected the sequence length {n}")
        mask = tokens.clone()
    else:
        if tokens.numel() and int(tokens.max()) >= n:
            raise ValueError(f"global_tokens position {int(tokens.max())} is out of range for sequence length {n}")
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[tokens.long()] = True
    return mask if bool(mask.any()) else None


def mask_mod(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    window: WindowArg | None = None,
    global_mask: Tensor | None = None,
) -> MaskMod | None:
    """The predicate of the rules above for an ``(nq, nk)`` problem; None when every key is visible.

    The one definition of these masks: the dense mask, the reference, the SDPA baseline and the
    FlexAttention block mask all come from it.
    """
    if global_mask is not None and nq != nk:
        raise ValueError(f"global tokens need Nq == Nk, got Nq={nq}, Nk={nk}")
    if window is None:
        global_mask = None  # every key is visible anyway
    if window is None and not causal:
        return None
    off = nk - nq
    bounds = None
    if window is not None:
        bounds = clamp_reach(*window_bounds(window, causal), nq, nk)

    def mod(qi: Tensor, ki: Tensor) -> Tensor:
        p = qi + off
        keep = None
        if bounds is not None:
            keep = (ki >= p - bounds[0]) & (ki <= p + bounds[1])
        if global_mask is not None:
            assert keep is not None
            keep = keep | global_mask[qi] | global_mask[ki]
        if causal:
            keep = ki <= p if keep is None else keep & (ki <= p)
        assert keep is not None
        return keep

    return mod


def dense_from_mod(mod: MaskMod | None, nq: int, nk: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``(nq, nk)`` matrix of a predicate (all True for None). O(nq * nk) memory."""
    if mod is None:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    qi = torch.arange(nq, device=device)[:, None]
    ki = torch.arange(nk, device=device)[None, :]
    return mod(qi, ki).expand(nq, nk)


def dense_mask(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    window: WindowArg | None = None,
    global_mask: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Bool ``(nq, nk)`` matrix, True where query ``i`` may see key ``j``. O(nq * nk) memory."""
    gm = None if global_mask is None else global_mask.to(device)
    return dense_from_mod(mask_mod(nq, nk, causal=causal, window=window, global_mask=gm), nq, nk, device)


def visible_pairs(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    window: WindowArg | None = None,
    global_mask: Tensor | None = None,
) -> int:
    """Number of visible (query, key) pairs, computed in O(nq + g * nq) without an nq x nk mask."""
    p = torch.arange(nq, dtype=torch.long) + (nk - nq)
    lo = torch.zeros_like(p)
    hi = torch.full_like(p, nk - 1)
    if window is not None:
        left, right = clamp_reach(*window_bounds(window, causal), nq, nk)
        lo = (p - left).clamp(min=0)
        hi = (p + right).clamp(max=nk - 1)
    if causal:
        hi = torch.minimum(hi, p)
    count = (hi - lo + 1).clamp(min=0)
    if global_mask is not None and window is not None:
        g = global_mask.cpu()
        gpos = g.nonzero().flatten()
        # Global columns seen outside the band (and not yet counted).
        cols = gpos[None, :]
        outside = (cols < lo[:, None]) | (cols > hi[:, None])
        if causal:
            outside = outside & (cols <= p[:, None])
        extra = outside.sum(dim=1)
        # Global rows see every (causally visible) key.
        full_row = (p + 1).clamp(max=nk) if causal else torch.full_like(p, nk)
        count = torch.where(g, full_row, count + extra)
    return int(count.sum())


def padding_bias(real: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask of the same shape as the bool ``real`` (True = a real key): 0 for a real key,
    half the dtype's most negative value for a padded one.

    Finite rather than ``-inf`` on purpose: a fused kernel fed a row that sees only padded keys
    then computes a finite (uniform) softmax instead of NaN in its backward; callers zero such rows
    (:func:`keys_seen`). For a row with a real key, a padded key's weight underflows to exactly 0.
    """
    bias = torch.zeros(real.shape, dtype=dtype, device=real.device)
    return bias.masked_fill_(~real, torch.finfo(dtype).min / 2)


def keys_seen(key_padding_mask: Tensor, nq: int, causal: bool) -> Tensor:
    """Bool ``(B, Nq)``: True where query ``i`` sees at least one real key under full (optionally
    causal, bottom-right aligned) attention, i.e. some real key ``j <= i + Nk - Nq`` when causal."""
    b, nk = key_padding_mask.shape
    if nk == 0:
        return key_padding_mask.new_zeros(b, nq)
    if not causal:
        return key_padding_mask.any(dim=-1, keepdim=True).expand(b, nq)
    seen = torch.cumsum(key_padding_mask, dim=-1) > 0  # seen[:, j]: a real key at or before j
    p = torch.arange(nq, device=key_padding_mask.device) + (nk - nq)
    return seen[:, p.clamp(min=0)] & (p >= 0)


def window_rows_seen(
    key_padding_mask: Tensor, nq: int, window: WindowArg, causal: bool, global_mask: Tensor | None = None
) -> Tensor:
    """Bool ``(B, Nq)``: True where query ``i`` sees at least one real key under the sliding-window
    rule above (global rows and columns included). Prefix counts of the real keys, O(B (Nq + Nk))."""
    b, nk = key_padding_mask.shape
    if nk == 0:
        return key_padding_mask.new_zeros(b, nq)
    left, right = clamp_reach(*window_bounds(window, causal), nq, nk)
    p = torch.arange(nq, device=key_padding_mask.device) + (nk - nq)
    lo, hi = (p - left).clamp(min=0), (p + right).clamp(max=nk - 1)
    if causal:
        hi = torch.minimum(hi, p)
    before = torch.nn.functional.pad(torch.cumsum(key_padding_mask, dim=-1), (1, 0))  # real keys before j
    seen = (hi >= lo) & (before[:, (hi + 1).clamp(min=0)] > before[:, lo])
    if global_mask is not None:  # needs Nq == Nk, so p == i
        real_global = key_padding_mask & global_mask
        if causal:
            seen = seen | (torch.cumsum(real_global, dim=-1) > 0)  # a real global key at or before i
        else:
            seen = seen | real_global.any(dim=-1, keepdim=True)
        seen = torch.where(global_mask, keys_seen(key_padding_mask, nq, causal), seen)
    return seen
