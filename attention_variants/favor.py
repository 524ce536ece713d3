"""The FAVOR+ computation behind :class:`~attention_variants.performer.PerformerAttention`:
the random projection, the shifted feature maps and the linear-time non-causal and chunked causal
sums (see :mod:`attention_variants.performer` for the maths and the stabilisers)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import masks

RELU_EPS = 1e-3
CHUNK = 128  # chunk length of the causal prefix form in the PyTorch backend


def draw_projection(num_features: int, head_dim: int, *, ortho: bool = True, seed: int = 0) -> Tensor:
    """Random projection ``W (num_features, head_dim)`` in float64 on the CPU, reproducible by ``seed``.

    ``ortho=True``: stacked blocks of ``head_dim`` orthonormal rows (QR of a Gaussian matrix),
    each row rescaled by an independent chi(head_dim) norm, so every row is marginally N(0, I).
    ``ortho=False``: i.i.d. N(0, I) rows.
    """
    if head_dim == 0:
        return torch.zeros(num_features, 0, dtype=torch.float64)  # q.k = 0: uniform attention, exactly
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if not ortho:
        return torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64)
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gauss = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        qmat, rmat = torch.linalg.qr(gauss)
        # Fix QR's sign ambiguity so the draw does not depend on the LAPACK build.
        qmat = qmat * torch.sign(torch.diagonal(rmat))[None, :]
        blocks.append(qmat.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return rows * norms[:, None]


def _project(x: Tensor, ws: Tensor) -> Tensor:
    return torch.matmul(x.to(ws.dtype), ws.T)  # W x', with ws = W * sqrt(scale)


def _key_logits(x: Tensor, ws: Tensor, scale: float) -> Tensor:
    """The key exponents ``W k' - |k'|^2 / 2``, ``(..., N, m)``: one expression for
    :func:`key_shift` and :func:`key_features`, so the shifted maximum is exactly 0."""
    x = x.to(ws.dtype)
    return torch.matmul(x, ws.T).sub_((0.5 * scale) * x.square().sum(dim=-1, keepdim=True))


def query_features(x: Tensor, ws: Tensor, scale: float, kernel: str, shift: Tensor | None = None) -> Tensor:
    """``phi(q)`` for ``x (..., N, D)`` and the scaled projection ``ws = W * sqrt(scale)``.

    ``shift`` is the per-feature key shift of :func:`key_shift`, repeated to the query heads
    (``(..., 1, m)``); None gives the features of the definition up to a per-row constant.
    """
    proj = _project(x, ws)
    if kernel == "relu":
        return torch.relu(proj) + RELU_EPS
    # exp(W x' + c - |x'|^2/2 - r) / sqrt(m) with r the row max: |x'|^2/2 is constant along a
    # row and cancels with r, leaving exp(W x' + c - rowmax(W x' + c)) / sqrt(m).
    if shift is not None:
        proj = proj.add_(shift)
    with torch.no_grad():
        row = proj.amax(dim=-1, keepdim=True) + 0.5 * math.log(ws.shape[0])
    return proj.sub_(row).exp_()


def _drop_padded(logits: Tensor, key_mask: Tensor | None, fill: float) -> Tensor:
    """``logits (B, Hk, n, m)`` with the rows of padded keys (``key_mask (B, n)`` False) set to ``fill``."""
    return logits if key_mask is None else logits.masked_fill(~key_mask[:, None, :, None], fill)


def key_shift(
    k: Tensor, ws: Tensor, scale: float, kernel: str, rows: int | None = None, key_mask: Tensor | None = None
) -> Tensor | None:
    """The per-feature key shift ``c (..., 1, m)``: the max of the exponent ``W k' - |k'|^2/2``
    over the keys, for each feature. Computed ``rows`` keys at a time, no grad. ``key_mask (B, N)``:
    only the keys where it is True count (a batch element with none gets 0)."""
    if kernel == "relu":
        return None
    n = k.shape[-2]
    rows = rows or max(n, 1)
    with torch.no_grad():
        best = k.new_zeros(*k.shape[:-2], 1, ws.shape[0], dtype=ws.dtype) if n == 0 else None
        for start in range(0, n, rows):
            piece_mask = None if key_mask is None else key_mask[:, start : start + rows]
            logits = _drop_padded(_key_logits(k[..., start : start + rows, :], ws, scale), piece_mask, -math.inf)
            piece = logits.amax(dim=-2, keepdim=True)
            best = piece if best is None else torch.maximum(best, piece)
        assert best is not None
        return best if key_mask is None else best.masked_fill_(best == -math.inf, 0.0)


def key_features(
    x: Tensor, ws: Tensor, scale: float, kernel: str, shift: Tensor | None, key_mask: Tensor | None = None
) -> Tensor:
    """``phi(k)`` for ``x (B, Hk, N, D)`` with the shift of :func:`key_shift`; ``key_mask (B, N)``:
    padded keys (False) get all-zero features, so they drop out of every sum."""
    if kernel == "relu":
        return _drop_padded(torch.relu(_project(x, ws)) + RELU_EPS, key_mask, 0.0)
    assert shift is not None
    # -inf before the exp: a padded key's exponent may exceed the shift (taken over real keys only).
    return _drop_padded(_key_logits(x, ws, scale).sub_(shift), key_mask, -math.inf).exp_()


def feature_map(x: Tensor, w: Tensor, scale: float, kernel: str, is_query: bool) -> Tensor:
    """FAVOR+ features ``phi(x)``: ``x (..., N, D)``, ``w (m, D)`` -> ``(..., N, m)`` in ``w``'s dtype.

    Each side on its own, up to constants: queries per row, keys per feature (see the module
    docstring; the attention itself also adds the key shift to the query exponents)."""
    ws = w * scale**0.5
    if is_query:
        return query_features(x, ws, scale, kernel)
    return key_features(x, ws, scale, kernel, key_shift(x, ws, scale, kernel))


class _SafeDiv(torch.autograd.Function):
    """``num / den`` with ``den (..., 1)``: rows with no visible key (den == 0, hence num == 0)
    give 0 and zero gradients. In the backward, ``den`` is floored at ``BACKWARD_DEN_FLOOR``:
    large-norm float16 inputs can make the normaliser of an early causal row subnormal in
    float32, and ``g / den`` would overflow to inf. The forward is exact; the gradient of such
    a row (mathematically near zero there) is damped instead of infinite."""

    @staticmethod
    def forward(ctx, num: Tensor, den: Tensor) -> Tensor:  # type: ignore[override]
        empty = den == 0
        out = torch.where(empty, 0.0, num / torch.where(empty, 1.0, den))
        ctx.save_for_backward(out, den, empty)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out, den, empty = ctx.saved_tensors
        safe = torch.where(empty, 1.0, den.clamp_min(BACKWARD_DEN_FLOOR[den.dtype]))
        g_num = torch.where(empty, 0.0, g / safe)
        g_den = torch.where(empty, 0.0, -(g * out).sum(dim=-1, keepdim=True) / safe)
        return g_num, g_den


BACKWARD_DEN_FLOOR = {torch.float64: 1e-300, torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 0.0}


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` per row (``den (..., 1)``); see :class:`_SafeDiv`."""
    return _SafeDiv.apply(num, den)


PIECE_ELEMENTS = 1 << 21
"""Feature elements per piece of rows (8 MB in float32). The PyTorch backend walks the sequence in
pieces so that no intermediate grows past glibc's mmap threshold (32 MB at most): larger
tensors are mapped fresh on every allocation, and the page faults made time superlinear in N."""


def piece_rows(heads: int, num_features: int) -> int:
    """Rows per piece for ``heads = B * H`` heads of ``num_features`` features (a multiple of CHUNK)."""
    rows = PIECE_ELEMENTS // max(1, heads * num_features)
    return max(CHUNK, rows // CHUNK * CHUNK)


def _causal_rows_with_keys(key_padding_mask: Tensor | None, b: int, nq: int, nk: int, device: torch.device) -> Tensor:
    """Bool ``(B, Nq)``: the causal rows that see at least one (real) key."""
    if key_padding_mask is None:
        key_padding_mask = torch.ones(b, nk, dtype=torch.bool, device=device)
    return masks.keys_seen(key_padding_mask, nq, causal=True)


def _repeat_heads(shift: Tensor | None, groups: int) -> Tensor | None:
    """The key shift ``(B, Hk, 1, m)`` for the query heads, ``(B, Hk * groups, 1, m)``."""
    return shift if shift is None or groups == 1 else shift.repeat_interleave(groups, dim=1)


def _group(phi_q: Tensor, hk: int) -> Tensor:
    """``(B, H, N, m) -> (B, Hk, G, N, m)``: query heads grouped under their key head."""
    b, h, n, m = phi_q.shape
    return phi_q.view(b, hk, h // hk, n, m)


def _with_ones(v: Tensor) -> Tensor:
    """``[v, 1]``: one matmul with it yields both the numerator and the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _normalise(num_den: Tensor) -> Tensor:
    return _safe_div(num_den[..., :-1], num_den[..., -1:])


class PrecisionWarning(RuntimeWarning):
    """A causal Performer call whose feature exponents span more than its compute dtype resolves."""


def warn_if_underflow(den_min: Tensor) -> None:
    """Warn when a causal row's normaliser ``den_min`` (the smallest over rows that see a key) is
    below the dtype's smallest normal number: that row's terms are subnormal or lost to underflow.

    Non-causal rows never get there: the largest term of every row is exactly ``1 / sqrt(m)``.
    A causal row only sees a prefix of the keys, while the key shift is the maximum over all of
    them; when key exponents differ by more than the dtype's range (about 87 in float32, 708 in
    float64), the keys of early rows underflow. Measured (float32, D = 64, N = 256, m = 128, input
    standard deviations 5 to 9): rows off by more than 1e-4 all had normalisers below 1e-43, and
    rows with normalisers down to 1e-41 were still at float32 rounding, so this floor leaves
    a margin of about five orders of magnitude.
    """
    if den_min.is_meta or den_min.numel() == 0:
        return
    floor = torch.finfo(den_min.dtype).tiny
    den = float(den_min)
    if den < floor:  # False for NaN
        warnings.warn(
            f"causal Performer in {den_min.dtype}: a row's normaliser is {den:.3g}, below {floor:.3g}: "
            f"the key exponents (about scale * |k|^2 / 2) vary across the keys by more than {den_min.dtype} "
            "resolves, so the keys of early rows underflow and those rows are inaccurate. Smaller norms or "
            "scale help (float64 resolves about 8 times more); non-causal calls are not affected "
            "(see the PerformerAttention docstring).",
            PrecisionWarning,
            stacklevel=5,  # the caller of AttentionVariant.__call__
        )


FeatureFn = Callable[[int, int], Tensor]


def favor_noncausal(phi_q: FeatureFn, phi_k: FeatureFn, v1: Tensor, h: int, nq: int, rows: int) -> Tensor:
    """Non-causal FAVOR+: ``phi(K)^T [V, 1]`` over key pieces, then one readout per query piece.

    ``phi_q(start, end)`` / ``phi_k(start, end)`` give the features of rows ``[start, end)``
    (``(B, H, n, m)`` / ``(B, Hk, n, m)``); ``v1 = [V, 1]`` is ``(B, Hk, Nk, Dv + 1)``.
    Returns ``(B, H, Nq, Dv)``; O(N m Dv) time, O(rows m + m Dv) working memory.
    """
    b, hk, nk, dv1 = v1.shape
    kv = sum(
        torch.matmul(phi_k(s, s + rows).transpose(-1, -2), v1[:, :, s : s + rows]) for s in range(0, nk, rows)
    )  # (B, Hk, m, Dv + 1)
    outs = []
    for s in range(0, nq, rows):
        pq = phi_q(s, s + rows)
        outs.append(_normalise(torch.matmul(_group(pq, hk), kv[:, :, None])).reshape(b, h, pq.shape[2], dv1 - 1))
    return torch.cat(outs, dim=2)


def favor_causal(
    phi_q: FeatureFn, phi_k: FeatureFn, v1: Tensor, h: int, nq: int, rows: int, seen: Tensor | None = None
) -> Tensor:
    """Causal (bottom-right) FAVOR+, piece by piece with a running state (arguments as
    :func:`favor_noncausal`). Within a piece: chunks of ``CHUNK``, exact inside a chunk, prefix
    states across chunks. No N x m x Dv tensor; O(rows (m + CHUNK) + (rows / CHUNK) m Dv) working memory.
    Warns when a row's normaliser underflows (:func:`warn_if_underflow`); ``seen (B, Nq)``, when
    given, marks the rows that see a key at all (key padding: the others have a zero normaliser).
    """
    b, hk, nk, dv1 = v1.shape
    off = nk - nq
    outs = []
    q0 = 0
    if off < 0:  # the first -off queries see no key
        outs.append(v1.new_zeros(b, h, -off, dv1 - 1))
        q0, off = -off, 0
    # Keys before the aligned diagonal are visible to every query: they seed the state.
    state = v1.new_zeros(b, hk, 1, dv1) if off == 0 else 0
    for s in range(0, off, rows):
        e = min(off, s + rows)
        state = state + torch.matmul(phi_k(s, e).transpose(-1, -2), v1[:, :, s:e])
    dens: list[Tensor] = []
    for s in range(0, nq - q0, rows):
        e = min(nq - q0, s + rows)
        pq = phi_q(q0 + s, q0 + e)
        piece_seen = None if seen is None else seen[:, q0 + s : q0 + e]
        out, state = _causal_piece(pq, phi_k(off + s, off + e), v1[:, :, off + s : off + e], state, dens, piece_seen)
        outs.append(out)
    if dens:
        warn_if_underflow(torch.stack(dens).amin())
    return torch.cat(outs, dim=2)


def _causal_piece(
    pq: Tensor, pk: Tensor, pv: Tensor, state: Tensor, dens: list[Tensor], seen: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal FAVOR+ on aligned rows: ``pq (B,H,n,m)``, ``pk (B,Hk,n,m)``, ``pv (B,Hk,n,Dv+1)``,
    ``state (B,Hk,m,Dv+1)`` (or broadcastable) from earlier keys. Returns ``(out, new state)``
    and appends the smallest normaliser of the piece to ``dens`` (over the rows ``seen (B, n)``
    marks, when given)."""
    b, h, n, m = pq.shape
    hk, dv1 = pk.shape[1], pv.shape[-1]
    c = min(CHUNK, n)
    nc = math.ceil(n / c)
    pad = nc * c - n
    pq = torch.nn.functional.pad(pq, (0, 0, 0, pad)).view(b, hk, h // hk, nc, c, m)
    pk = torch.nn.functional.pad(pk, (0, 0, 0, pad)).view(b, hk, nc, c, m)
    pv = torch.nn.functional.pad(pv, (0, 0, 0, pad)).view(b, hk, nc, c, dv1)

    kv = torch.matmul(pk.transpose(-1, -2), pv)  # (B, Hk, nc, m, Dv + 1)
    # State before each chunk: state + sum of earlier chunks (not cumsum - kv: that cancels).
    prefix = torch.cumsum(kv, dim=2)
    states = torch.cat([state.expand(b, hk, m, dv1)[:, :, None], prefix[:, :, :-1] + state[:, :, None]], dim=2)
    num_den = torch.matmul(pq, states[:, :, None])  # (B, Hk, G, nc, c, Dv + 1)
    a = torch.matmul(pq, pk[:, :, None].transpose(-1, -2)).tril_()  # (B, Hk, G, nc, c, c), causal
    num_den = (num_den + torch.matmul(a, pv[:, :, None])).reshape(b, h, nc * c, dv1)[:, :, :n]
    den = num_den[..., -1].detach()
    dens.append((den if seen is None else den.masked_fill(~seen[:, None], math.inf)).amin())
    return _normalise(num_den), prefix[:, :, -1] + state
