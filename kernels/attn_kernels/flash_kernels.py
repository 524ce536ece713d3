"""The Triton kernels of the fused softmax attention (launched by :mod:`attn_kernels.flash_attention`).

One kernel family in the shape of Triton's fused-attention tutorial and FlashAttention-2:

- ``_fwd_kernel``: one program per (query block, batch x head). Online softmax in float32 with
  ``exp2``; writes the output and the log-sum-exp (base 2) of every row for the backward.
- ``_bwd_dq_kernel``: the same programs and key ranges; recomputes the probabilities from the
  saved log-sum-exp and accumulates ``dq``.
- ``_bwd_dkdv_kernel``: one program per (key block, batch x kv head); walks the query blocks
  that see the key block, for every query head of the group (GQA by indexing: no K/V copy),
  and accumulates ``dk`` and ``dv`` in registers. With ``ATOMIC`` it also adds ``dS^T K`` (as
  ``K^T dS^T``, whose M is the head dim: wgmma) into a float32 dQ with atomics, so that no dq
  kernel runs (5 tile products per pair instead of 7; not bitwise reproducible).
- ``_bwd_delta_kernel``: the row term ``delta = rowsum(dO * O)`` of the backward.

Each program reads its row of the block schedule (:mod:`attn_kernels.flash_configs`) and runs its
inner loop three times: the masked edge tiles ``[start, lo)``, the interior ``[lo, hi)`` without
mask arithmetic, the masked edge tiles ``[hi, end)``; band programs with global tokens add a
fourth pass over the gathered global keys (rows). The pass is a named constexpr ``MODE`` of the
inner loop: :data:`INTERIOR`, :data:`BAND_EDGE` or :data:`OUTSIDE_BAND`. The forward's band
programs (``ONE_LOOP``) instead run :data:`PREDICATED`: one loop over ``[start, end)`` that masks
only the tiles outside ``[lo, hi)``, so a short band fills and drains one software pipeline, not
three. ``WINDOW`` is false for full attention, whose masks then skip the band arithmetic.

The forward takes its scores raw and folds the softmax scale into the row maximum and the
``exp2`` argument (one FMA per score). With ``TMA`` its band passes load the key and value tiles
through TMA descriptors of ``(B, Hk, NK, D)`` (``KD``, ``VD``), which zero-fill past the sequence
and the head dim.

Key padding (constexpr ``HAS_PAD``): ``KPM`` is an int8 key-valid vector ``(B, NK)`` folded into
the score mask of every pass, ``KRANGE`` the ``(first, last + 1)`` real keys of each batch
element, which clip the query programs' schedule rows; the key programs zero the gradients of
padded keys and skip their loops when the whole key block is padding.

float32 inputs use IEEE float32 ``tl.dot`` (``input_precision="ieee"``, no TF32), so the
float32 path is as accurate as PyTorch's float32 matmul; float16/bfloat16 inputs use the
tensor cores with float32 accumulation, and the probabilities are cast to the input dtype
before the ``P @ V`` product, as in FlashAttention.

Needs Triton: imported by the host module only when Triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_configs import band_reach, dot_precision
from .launch import KernelConfig, LaunchSample, contiguous_strides, pad_pow2
from .launch import loop_range as _range

# How an inner loop masks its tiles (its MODE constexpr).
INTERIOR = tl.constexpr(0)  # tiles every row sees entirely: no mask arithmetic
BAND_EDGE = tl.constexpr(1)  # edge tiles of the band: band, causal and sequence-end mask
OUTSIDE_BAND = tl.constexpr(2)  # the gathered global keys (rows): visible outside the band only, so none counts twice
PREDICATED = tl.constexpr(3)  # one loop over a whole row: BAND_EDGE masks on the tiles outside [lo, hi) only


@triton.jit
def _visible(p, j, valid, left, right, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MODE: tl.constexpr):
    """Mask of the broadcast positions ``p`` (query) and ``j`` (key) in a masked ``MODE``.

    BAND_EDGE: inside the band; OUTSIDE_BAND: outside the band (the gathered global rows /
    keys, so that nothing counts twice). Causal applies in both. Without a ``WINDOW`` (full
    attention) the band is everything and is not computed.
    """
    rel = j - p
    if not WINDOW:
        vis = valid
    elif MODE == BAND_EDGE:
        vis = (rel >= -left) & (rel <= right) & valid
    else:
        vis = ((rel < -left) | (rel > right)) & valid
    if CAUSAL:
        vis = vis & (rel <= 0)
    return vis


@triton.jit
def _positions(base, offs, n_valid, IDX, GATHER: tl.constexpr):
    """Sequence indices of a tile: ``base + offs`` (contiguous) or ``IDX[base + offs]``."""
    t = base + offs
    valid = t < n_valid
    if GATHER:  # noqa: SIM108
        idx = tl.load(IDX + t, mask=valid, other=0)
    else:
        idx = t
    return idx, valid


@triton.jit
def _load_interior(ptrs, pad_mask, PADDED: tl.constexpr):
    """Load a tile whose rows are all in range: masked only along a padded head dim."""
    if PADDED:  # noqa: SIM108 - constexpr branches read better in kernels
        x = tl.load(ptrs, mask=pad_mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _own_positions(base, offs, n_own, GIDX, NG, LEFT, RIGHT, NQ, NK, GATHERED: tl.constexpr):
    """Positions a program owns (query rows; keys in the ``dk``/``dv`` kernel) and the band reach
    they see: ``(idx, valid, left, right)``.

    Band programs own ``base + offs`` (valid below ``n_own``) and see ``LEFT`` / ``RIGHT``; the
    GATHERED programs own the global positions ``GIDX[base + offs]`` (valid below ``NG``) and see
    every position (causal still applies).
    """
    if GATHERED:
        idx, valid = _positions(base, offs, NG, GIDX, GATHER=True)
        left = NK + NQ + 1
        right = NK + NQ + 1
    else:
        idx, valid = _positions(base, offs, n_own, GIDX, GATHER=False)
        left = LEFT
        right = RIGHT
    return idx, valid, left, right


@triton.jit
def _schedule_row(SCHED, pid):
    """``(start, lo, hi, end)`` of program ``pid`` (see :mod:`attn_kernels.flash_configs`)."""
    start = tl.load(SCHED + pid * 4)
    lo = tl.load(SCHED + pid * 4 + 1)
    hi = tl.load(SCHED + pid * 4 + 2)
    end = tl.load(SCHED + pid * 4 + 3)
    return start, lo, hi, end


@triton.jit
def _not_global(GFLAG, idx, valid):
    """``valid`` less the global positions (``GFLAG[idx] != 0``): the gathered programs store those."""
    flag = tl.load(GFLAG + idx, mask=valid, other=0).to(tl.int32)
    return valid & (flag == 0)


@triton.jit
def _real_keys(KPM, cols, valid):
    """``valid`` less the padded keys: ``KPM`` is the batch's row of the int8 key-valid vector."""
    flag = tl.load(KPM + cols, mask=valid, other=0)
    return valid & (flag != 0)


@triton.jit
def _clip_to_keys(KRANGE, b, start, lo, hi, end, BLOCK_N: tl.constexpr):
    """The schedule row clipped to the key blocks that hold a real key of batch ``b``.

    ``KRANGE[b] = (first, last + 1)`` of the real keys (``(0, 0)`` when there is none). Each of
    the three passes ``[start, lo)``, ``[lo, hi)``, ``[hi, end)`` keeps its block-aligned start
    (or becomes empty); the keys of a kept tile outside the range are masked as padded.
    """
    first = tl.load(KRANGE + 2 * b)
    last = tl.load(KRANGE + 2 * b + 1)
    first = (first // BLOCK_N) * BLOCK_N
    start = tl.maximum(start, first)
    lo = tl.minimum(tl.maximum(lo, first), last)
    hi = tl.minimum(tl.maximum(hi, first), last)
    end = tl.minimum(end, last)
    return start, lo, hi, end


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    kd,
    vd,
    bk,
    hk,
    stride_kn,
    stride_vn,
    pos_q,
    start,
    lo,
    hi,
    end,
    n_valid,
    IDX,
    kpm,
    left,
    right,
    qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    PREC: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MODE: tl.constexpr,
    HAS_PAD: tl.constexpr,
    TMA: tl.constexpr,
):
    """Online softmax over key tiles ``[start, end)`` (keys ``IDX[start:end]`` when ``MODE`` is
    OUTSIDE_BAND); in PREDICATED mode the tiles outside ``[lo, hi)`` are masked.

    TMA: the key and value tiles of the band come through the descriptors ``kd`` / ``vd`` of
    ``(B, Hk, NK, D)`` (batch ``bk``, head ``hk``), which zero-fill what lies past the sequence
    and the head dim; the gathered global keys always load through pointers.

    HAS_PAD: ``kpm`` is the batch's row of the key-valid vector, folded into the score mask of
    every pass (the interior one included). Tiles load as without it (folding the vector into
    the load masks made the forward spill).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    MASKED = (MODE != INTERIOR) | HAS_PAD
    for n in _range(start, end, BLOCK_N):
        cols, valid = _positions(n, offs_n, n_valid, IDX, GATHER=MODE == OUTSIDE_BAND)
        if TMA and MODE != OUTSIDE_BAND:
            kt = tl.trans(kd.load([bk, hk, n, 0]).reshape(BLOCK_N, BLOCK_D))
        else:
            kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
            if MODE == INTERIOR:
                kt = _load_interior(kt_ptrs, offs_d[:, None] < HEAD_D, PADDED=HEAD_D < BLOCK_D)
            else:
                kt = tl.load(kt_ptrs, mask=valid[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
        # Raw scores: the scale (positive) goes into the row max and, with the max, into the exp2
        # argument as one FMA, not into a multiply per score.
        s = tl.dot(q, kt, input_precision=PREC)
        if HAS_PAD and MODE == INTERIOR:  # every key of an interior tile is in range
            real = tl.load(kpm + n + offs_n) != 0
        elif HAS_PAD:
            real = _real_keys(kpm, cols, valid)
        else:
            real = valid
        if MODE == INTERIOR:
            if HAS_PAD:
                s = tl.where(real[None, :], s, float("-inf"))
        elif MODE == PREDICATED:
            # The key-valid flags stay out of the branch: Triton 3.6's pipeliner fails on a loaded
            # value used inside it.
            if HAS_PAD:
                s = tl.where(real[None, :], s, float("-inf"))
            if (n < lo) | (n >= hi):
                vis = _visible(pos_q[:, None], cols[None, :], valid[None, :], left, right, CAUSAL, WINDOW, BAND_EDGE)
                s = tl.where(vis, s, float("-inf"))
        else:
            vis = _visible(pos_q[:, None], cols[None, :], real[None, :], left, right, CAUSAL, WINDOW, MODE)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:  # noqa: SIM108
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows so far
        else:
            m_use = m_new
        p = tl.exp2(tl.fma(s, qk_scale, -m_use[:, None]))
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA and MODE != OUTSIDE_BAND:
            v = vd.load([bk, hk, n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :]
            if MODE == INTERIOR:
                v = _load_interior(v_ptrs, offs_dv[None, :] < HEAD_DV, PADDED=HEAD_DV < BLOCK_DV)
            else:
                v = tl.load(v_ptrs, mask=valid[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    SCHED,
    GIDX,
    GFLAG,
    KPM,
    KRANGE,
    KD,
    VD,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    GROUPS,
    NQ,
    NK,
    NG,
    LEFT,
    RIGHT,
    qk_scale,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    GATHERED: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
    ONE_LOOP: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // H
    h = bh % H
    hk32 = h // GROUPS
    b = b32.to(tl.int64)
    hk = hk32.to(tl.int64)
    h = h.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows, row_valid, left, right = _own_positions(
        pid * BLOCK_M, offs_m, NQ, GIDX, NG, LEFT, RIGHT, NQ, NK, GATHERED=GATHERED
    )
    pos_q = rows + (NK - NQ)

    q = tl.load(
        q_base + rows[:, None] * stride_qm + offs_d[None, :],
        mask=row_valid[:, None] & (offs_d[None, :] < HEAD_D),
        other=0.0,
    )
    start, lo, hi, end = _schedule_row(SCHED, pid)
    kpm = KPM + b * NK
    if HAS_PAD:
        start, lo, hi, end = _clip_to_keys(KRANGE, b, start, lo, hi, end, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if ONE_LOOP:
        # One pipelined loop over the whole row, masking its edge tiles: a short band has few
        # tiles, and each separate loop would fill and drain its own pipeline.
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, KD, VD, b32, hk32, stride_kn, stride_vn, pos_q, start, lo, hi, end,
            NK, GIDX, kpm, left, right, qk_scale, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
            CAUSAL, WINDOW, PREDICATED, HAS_PAD, TMA,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, KD, VD, b32, hk32, stride_kn, stride_vn, pos_q, start, lo, lo, lo,
            NK, GIDX, kpm, left, right, qk_scale, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
            CAUSAL, WINDOW, BAND_EDGE, HAS_PAD, TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, KD, VD, b32, hk32, stride_kn, stride_vn, pos_q, lo, lo, hi, hi,
            NK, GIDX, kpm, left, right, qk_scale, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
            CAUSAL, WINDOW, INTERIOR, HAS_PAD, TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, KD, VD, b32, hk32, stride_kn, stride_vn, pos_q, hi, hi, end, end,
            NK, GIDX, kpm, left, right, qk_scale, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
            CAUSAL, WINDOW, BAND_EDGE, HAS_PAD, TMA,
        )  # fmt: skip
    store_mask = row_valid
    if HAS_GLOBAL:
        # Band programs add the global keys outside the band and leave the global rows to the
        # gathered launch.
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, KD, VD, b32, hk32, stride_kn, stride_vn, pos_q, 0, 0, 0, NG,
            NG, GIDX, kpm, left, right, qk_scale, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
            CAUSAL, WINDOW, OUTSIDE_BAND, HAS_PAD, TMA,
        )  # fmt: skip
        store_mask = _not_global(GFLAG, rows, row_valid)  # the gathered programs store the global rows

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=store_mask[:, None] & (offs_dv[None, :] < HEAD_DV))
    tl.store(LSE + (b * H + h) * NQ + rows, lse, mask=store_mask)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    pos_q,
    start,
    lo,
    hi,
    end,
    n_valid,
    IDX,
    kpm,
    left,
    right,
    qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    PREC: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MODE: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """``dq += dS @ K`` over key tiles ``[start, end)``, as in :func:`_fwd_inner` (scale applied by the
    caller; in PREDICATED mode the tiles outside ``[lo, hi)`` are masked)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n in _range(start, end, BLOCK_N):
        cols, valid = _positions(n, offs_n, n_valid, IDX, GATHER=MODE == OUTSIDE_BAND)
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
        vt_ptrs = v_base + cols[None, :] * stride_vn + offs_dv[:, None]
        if MODE == INTERIOR:
            kt = _load_interior(kt_ptrs, offs_d[:, None] < HEAD_D, PADDED=HEAD_D < BLOCK_D)
            vt = _load_interior(vt_ptrs, offs_dv[:, None] < HEAD_DV, PADDED=HEAD_DV < BLOCK_DV)
        else:
            kt = tl.load(kt_ptrs, mask=valid[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
            vt = tl.load(vt_ptrs, mask=valid[None, :] & (offs_dv[:, None] < HEAD_DV), other=0.0)
        s = tl.dot(q, kt, input_precision=PREC)
        p = tl.exp2(tl.fma(s, qk_scale, -lse[:, None]))
        if HAS_PAD:  # noqa: SIM108
            real = _real_keys(kpm, cols, valid)
        else:
            real = valid
        if MODE == INTERIOR:
            if HAS_PAD:
                p = tl.where(real[None, :], p, 0.0)
        elif MODE == PREDICATED:  # the key-valid flags out of the branch, as in the forward
            if HAS_PAD:
                p = tl.where(real[None, :], p, 0.0)
            if (n < lo) | (n >= hi):
                vis = _visible(pos_q[:, None], cols[None, :], valid[None, :], left, right, CAUSAL, WINDOW, BAND_EDGE)
                p = tl.where(vis, p, 0.0)
        else:
            vis = _visible(pos_q[:, None], cols[None, :], real[None, :], left, right, CAUSAL, WINDOW, MODE)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    SCHED,
    GIDX,
    GFLAG,
    KPM,
    KRANGE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    H,
    GROUPS,
    NQ,
    NK,
    NG,
    LEFT,
    RIGHT,
    sm_scale,
    qk_scale,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    GATHERED: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    PREC: tl.constexpr,
    ONE_LOOP: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    rows, row_valid, left, right = _own_positions(
        pid * BLOCK_M, offs_m, NQ, GIDX, NG, LEFT, RIGHT, NQ, NK, GATHERED=GATHERED
    )
    pos_q = rows + (NK - NQ)

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
        mask=row_valid[:, None] & (offs_d[None, :] < HEAD_D),
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :],
        mask=row_valid[:, None] & (offs_dv[None, :] < HEAD_DV),
        other=0.0,
    )
    row_stats = (b * H + h) * NQ + rows
    lse = tl.load(LSE + row_stats, mask=row_valid, other=float("inf"))
    delta = tl.load(DELTA + row_stats, mask=row_valid, other=0.0)
    start, lo, hi, end = _schedule_row(SCHED, pid)
    kpm = KPM + b * NK
    if HAS_PAD:
        start, lo, hi, end = _clip_to_keys(KRANGE, b, start, lo, hi, end, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if ONE_LOOP:  # one pipelined loop for a band, as in the forward
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, start, lo, hi, end, NK, GIDX, kpm,
            left, right, qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, PREDICATED, HAS_PAD,
        )  # fmt: skip
    else:
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, start, lo, lo, lo, NK, GIDX, kpm,
            left, right, qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, BAND_EDGE, HAS_PAD,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, lo, lo, hi, hi, NK, GIDX, kpm,
            left, right, qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, INTERIOR, HAS_PAD,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, hi, hi, end, end, NK, GIDX, kpm,
            left, right, qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, BAND_EDGE, HAS_PAD,
        )  # fmt: skip
    store_mask = row_valid
    if HAS_GLOBAL:
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, 0, 0, 0, NG, NG, GIDX, kpm, left, right,
            qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, OUTSIDE_BAND, HAS_PAD,
        )  # fmt: skip
        store_mask = _not_global(GFLAG, rows, row_valid)  # the gathered programs store the global rows
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=store_mask[:, None] & (offs_d[None, :] < HEAD_D))


@triton.jit
def _bwd_delta_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    H,
    NQ,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DV: tl.constexpr,
):
    """``delta_i = sum_d dO_id O_id`` (float32), the row term of the softmax backward."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < NQ) & (offs_dv[None, :] < HEAD_DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :], mask=mask)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :], mask=mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * NQ + rows, delta, mask=rows < NQ)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    stats_base,
    LSE,
    DELTA,
    stride_qm,
    stride_dom,
    pos_k,
    start,
    lo,
    hi,
    end,
    n_valid,
    row_off,
    IDX,
    left,
    right,
    qk_scale,
    dqa_base,
    own_ok,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    PREC: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    MODE: tl.constexpr,
    ATOMIC: tl.constexpr,
    OWN_MASK: tl.constexpr,
):
    """``dv += P^T dO`` and ``dk += dS^T Q`` over query tiles ``[start, end)`` of one head (rows
    ``IDX[start:end]`` when ``MODE`` is OUTSIDE_BAND; in PREDICATED mode the tiles outside
    ``[lo, hi)`` are masked); with ATOMIC also ``dQ += dS K`` by float32 atomics."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for m in _range(start, end, BLOCK_M):
        rows, valid = _positions(m, offs_m, n_valid, IDX, GATHER=MODE == OUTSIDE_BAND)
        q_ptrs = q_base + rows[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = do_base + rows[:, None] * stride_dom + offs_dv[None, :]
        if MODE == INTERIOR:
            q = _load_interior(q_ptrs, offs_d[None, :] < HEAD_D, PADDED=HEAD_D < BLOCK_D)
            do = _load_interior(do_ptrs, offs_dv[None, :] < HEAD_DV, PADDED=HEAD_DV < BLOCK_DV)
            lse = tl.load(LSE + stats_base + rows)
            delta = tl.load(DELTA + stats_base + rows)
        else:
            q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
            do = tl.load(do_ptrs, mask=valid[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
            lse = tl.load(LSE + stats_base + rows, mask=valid, other=float("inf"))
            delta = tl.load(DELTA + stats_base + rows, mask=valid, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        pt = tl.exp2(tl.fma(st, qk_scale, -lse[None, :]))
        if MODE == PREDICATED:
            if (m < lo) | (m >= hi):
                vis = _visible(
                    rows[None, :] + row_off, pos_k[:, None], valid[None, :], left, right, CAUSAL, WINDOW, BAND_EDGE
                )
                pt = tl.where(vis, pt, 0.0)
        elif MODE != INTERIOR:
            vis = _visible(rows[None, :] + row_off, pos_k[:, None], valid[None, :], left, right, CAUSAL, WINDOW, MODE)
            pt = tl.where(vis, pt, 0.0)
        if OWN_MASK:
            pt = tl.where(own_ok[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=PREC)
        if ATOMIC:
            dqt = tl.dot(tl.trans(k), dst, input_precision=PREC)  # (BLOCK_D, BLOCK_M): M is the head dim
            dq_ptrs = dqa_base + rows[None, :] * HEAD_D + offs_d[:, None]
            tl.atomic_add(dq_ptrs, dqt, mask=valid[None, :] & (offs_d[:, None] < HEAD_D), sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    SCHED,
    GIDX,
    GFLAG,
    KPM,
    KRANGE,
    DQA,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    H,
    HK,
    GROUPS,
    NQ,
    NK,
    NG,
    LEFT,
    RIGHT,
    sm_scale,
    qk_scale,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    GATHERED: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    PREC: tl.constexpr,
    ATOMIC: tl.constexpr,
    ONE_LOOP: tl.constexpr,
):
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    cols, col_valid, left, right = _own_positions(
        pid * BLOCK_N, offs_n, NK, GIDX, NG, LEFT, RIGHT, NQ, NK, GATHERED=GATHERED
    )
    row_off = NK - NQ
    store_mask = col_valid

    k = tl.load(
        K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
        mask=col_valid[:, None] & (offs_d[None, :] < HEAD_D),
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :],
        mask=col_valid[:, None] & (offs_dv[None, :] < HEAD_DV),
        other=0.0,
    )
    start, lo, hi, end = _schedule_row(SCHED, pid)
    n_groups = GROUPS
    if HAS_PAD:  # a block of padded keys only stores zeros
        live = tl.max(_real_keys(KPM + b * NK, cols, col_valid).to(tl.int32), 0) > 0
        n_groups = tl.where(live, GROUPS, 0)

    # The atomic dQ of band programs leaves out their global keys: the gathered programs add those
    # for every row. (Key padding never takes the atomic dQ: the host launches dq separately.)
    own_mask: tl.constexpr = ATOMIC and HAS_GLOBAL
    own_ok = col_valid
    if ATOMIC and HAS_GLOBAL:
        own_ok = _not_global(GFLAG, cols, own_ok)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in _range(n_groups):
        h = hk * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        stats_base = (b * H + h) * NQ
        dqa_base = DQA
        if ATOMIC:
            dqa_base = DQA + stats_base * HEAD_D
        if ONE_LOOP:  # one pipelined loop for a band, as in the forward
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, start, lo, hi, end,
                NQ, row_off, GIDX, left, right, qk_scale, dqa_base, own_ok,
                BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, PREDICATED, ATOMIC, own_mask,
            )  # fmt: skip
        else:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, start, lo, lo, lo,
                NQ, row_off, GIDX, left, right, qk_scale, dqa_base, own_ok,
                BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, BAND_EDGE, ATOMIC, own_mask,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, lo, lo, hi, hi,
                NQ, row_off, GIDX, left, right, qk_scale, dqa_base, own_ok,
                BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, INTERIOR, ATOMIC, own_mask,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, hi, hi, end, end,
                NQ, row_off, GIDX, left, right, qk_scale, dqa_base, own_ok,
                BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, BAND_EDGE, ATOMIC, own_mask,
            )  # fmt: skip
        if HAS_GLOBAL:
            # Key-block programs add the global rows outside the band (row_off is 0 here).
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, 0, 0, 0, NG,
                NG, row_off, GIDX, left, right, qk_scale, dqa_base, own_ok,
                BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC, CAUSAL, WINDOW, OUTSIDE_BAND, ATOMIC, own_mask,
            )  # fmt: skip
    if HAS_PAD:  # padded keys get zero gradients
        real = _real_keys(KPM + b * NK, cols, store_mask)
        dk = tl.where(real[:, None], dk, 0.0)
        dv = tl.where(real[:, None], dv, 0.0)
    if HAS_GLOBAL:
        store_mask = _not_global(GFLAG, cols, store_mask)  # the gathered programs store the global keys
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask[:, None] & (offs_dv[None, :] < HEAD_DV))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specialisations (tests/test_flash_compile.py)
# ---------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_KERNEL_POINTERS = {
    "bwd_delta": ("O", "DO"),
    "fwd": ("Q", "K", "V", "O"),
    "bwd_dq": ("Q", "K", "V", "DO", "DQ"),
    "bwd_dkdv": ("Q", "K", "V", "DO", "DK", "DV"),
}


def aot_spec(
    kernel: str,
    cfg: KernelConfig,
    head_dim: int,
    dtype: torch.dtype,
    *,
    causal: bool = True,
    has_global: bool = True,
    gathered: bool = False,
    has_pad: bool = False,
    window: int | None = None,
    sample: LaunchSample | None = None,
) -> tuple[object, dict[str, str | int], dict[str, object]]:
    """``(fn, signature, constexprs)`` of one kernel specialisation, for ``attn_kernels.aot.compile_for``.

    ``kernel`` is ``"fwd"``, ``"bwd_dq"``, ``"bwd_dkdv"`` or ``"bwd_delta"``; the default flags
    (causal, global tokens) give the specialisation with the most live state, ``has_pad`` the
    one with a key padding mask. ``window``: the band ``w`` (reach ``w`` on each side) of a
    sliding window, None for full attention (global tokens imply a band, 256 unless given).
    ``cfg`` decides the forward's loads (:attr:`~attn_kernels.flash_configs.FlashConfig.tma`).
    Integer arguments carry their values in ``sample`` (default
    :class:`~attn_kernels.launch.LaunchSample`: contiguous ``(B, H, N, D)`` tensors), as
    :mod:`attn_kernels.flash_attention` passes them, so that the compile applies the launcher's
    specialisation.
    """
    fn = {
        "fwd": _fwd_kernel,
        "bwd_dq": _bwd_dq_kernel,
        "bwd_dkdv": _bwd_dkdv_kernel,
        "bwd_delta": _bwd_delta_kernel,
    }[kernel]
    sig: dict[str, str | int] = dict.fromkeys(_KERNEL_POINTERS[kernel], "*" + _TRITON_TYPES[dtype])
    bd = pad_pow2(head_dim)
    sample = sample or LaunchSample()
    n, h, hk = sample.seq_len, sample.heads, sample.kv_heads
    q_strides = contiguous_strides(sample.batch, h, n, head_dim)[:3]
    k_strides = contiguous_strides(sample.batch, hk, n, head_dim)[:3]
    strides: dict[str, int] = {}
    for t in ("q", "o", "do", "dq"):  # query-shaped tensors
        strides.update(zip((f"stride_{t}b", f"stride_{t}h", f"stride_{t}m"), q_strides, strict=True))
    for t in ("k", "v", "dk", "dv"):  # key-shaped tensors
        strides.update(zip((f"stride_{t}b", f"stride_{t}h", f"stride_{t}n"), k_strides, strict=True))
    sig.update((name, strides[name]) for name in fn.arg_names if name.startswith("stride_"))
    if kernel == "bwd_delta":
        sig.update(DELTA="*fp32", H=h, NQ=n)
        return fn, sig, dict(BLOCK_M=cfg.block_m, BLOCK_DV=bd, HEAD_DV=head_dim)
    sig.update(LSE="*fp32", SCHED="*i32", GIDX="*i32", GFLAG="*i8", KPM="*i8", KRANGE="*i32")
    if kernel != "fwd":
        sig["DELTA"] = "*fp32"
    if window is None and (has_global or gathered):
        window = 256
    left, right = band_reach(None if window is None else (window, window), n, n)
    ints = dict(H=h, HK=hk, GROUPS=sample.groups, NQ=n, NK=n, LEFT=left, RIGHT=right)
    ints["NG"] = sample.num_global if has_global or gathered else 0
    sig.update((name, value) for name, value in ints.items() if name in fn.arg_names)
    sig.update((name, "fp32") for name in ("qk_scale", "sm_scale") if name in fn.arg_names)
    constexprs: dict[str, object] = dict(
        CAUSAL=causal, WINDOW=window is not None, HAS_GLOBAL=has_global and not gathered, GATHERED=gathered,
        HAS_PAD=has_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_DV=bd, HEAD_D=head_dim,
        HEAD_DV=head_dim, PREC=dot_precision(dtype),
    )  # fmt: skip
    if kernel == "bwd_dkdv":
        atomic = getattr(cfg, "bwd", "") == "atomic"
        constexprs["ATOMIC"] = atomic
        if atomic:
            sig["DQA"] = "*fp32"
        else:
            constexprs["DQA"] = None
    if kernel != "bwd_delta":
        constexprs["ONE_LOOP"] = window is not None and not gathered
    if kernel == "fwd":
        tma = bool(getattr(cfg, "tma", False))
        constexprs["TMA"] = tma
        for name in ("KD", "VD"):
            if tma:
                sig[name] = f"tensordesc<{_TRITON_TYPES[dtype]}[1, 1, {cfg.block_n}, {bd}]>"
            else:
                constexprs[name] = None
    return fn, sig, constexprs
