"""The Triton kernels of the decoding steps (launched by :mod:`attn_kernels.decode`).

A step attends ``T`` new queries (a few) of one sequence to its decoding state. The work of one
(batch, key/value head) pair is split along a long axis into pieces run by separate programs,
each writing a partial result ``(m, l, acc)`` per query row: ``m`` a running maximum (base 2),
``l`` the sum and ``acc`` the numerator, both relative to ``exp2(m)``. ``_combine_kernel`` merges
the pieces of a row (``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``), as in
FlashDecoding; no atomics, so results are deterministic.

The query rows of a program are the ``G = H / Hk`` query heads of one key/value head times the
``T`` new tokens (row ``r``: head ``r // T`` of the group, token ``r % T``), so every key or
feature tile is loaded once for the whole group (grouped-query attention without copies).

- ``_softmax_split_kernel`` (full attention, sliding window): the pieces are chunks of the cached
  keys ``[lo, start)`` (a KV cache, or a ring buffer where position ``p`` lives in slot
  ``p % PERIOD``); one more program takes the ``T`` new keys and the global tokens. Key ``j`` is
  visible to the query at position ``p`` iff ``p - left <= j <= p``; a global key iff ``j < p - left``.
- ``_favor_step_kernel`` (Performer): the pieces are blocks of random features. Each program
  owns rows ``f`` of the state ``[S, z]`` and of the running key shift ``c``: it raises ``c`` to
  the new keys' exponents (rescaling its rows of the state), reads out the new queries against
  the state and the earlier new keys (causal), and adds the new keys to its rows of the state.
  The query features' row maximum is a per-piece maximum merged by the combine kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import loop_range as _range

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _store_partial(M, L, ACC, part, rows, offs_dv, m_i, l_i, acc, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Write one piece's ``(m, l, acc)`` for the ``BLOCK_M`` rows of partial slot ``part``."""
    tl.store(M + part * BLOCK_M + rows, m_i)
    tl.store(L + part * BLOCK_M + rows, l_i)
    tl.store(ACC + (part * BLOCK_M + rows[:, None]) * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _softmax_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, key_ok, pos_k, pos_q, row_ok, left, qk_scale,
    kmask_d, vmask_d, GLOBAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax; ``key_ok`` marks the keys that exist, ``pos_k`` their positions."""
    k = tl.load(k_ptrs, mask=key_ok[:, None] & kmask_d[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    rel = pos_k[None, :] - pos_q[:, None]
    if GLOBAL:  # noqa: SIM108 - constexpr branches read better in kernels
        vis = rel < -left  # globals inside the band are read from the cache, not twice
    else:
        vis = (rel <= 0) & (rel >= -left)
    vis = vis & key_ok[None, :] & row_ok[:, None]
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    v = tl.load(v_ptrs, mask=key_ok[:, None] & vmask_d[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _softmax_split_kernel(
    Q, KC, VC, KN, VN, GK, GV, GPOS, M, L, ACC,
    stride_qb, stride_qh, stride_qt,
    stride_kcb, stride_kch, stride_kcn,
    stride_vcb, stride_vch, stride_vcn,
    stride_knb, stride_knh, stride_knt,
    stride_vnb, stride_vnh, stride_vnt,
    stride_gkb, stride_gkh, stride_gkn,
    stride_gvb, stride_gvh, stride_gvn,
    HK, T, GROUPS, START, LO, CHUNK, NUM_SPLITS, PERIOD, LEFT, NG, qk_scale,
    RING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid ``(NUM_SPLITS + 1, B * Hk, row blocks)``: split ``s < NUM_SPLITS`` takes cached positions
    ``[LO + s * CHUNK, LO + (s + 1) * CHUNK) & [LO, START)``; split ``NUM_SPLITS`` the new keys and the globals."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    rb = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    rows = tl.arange(0, BLOCK_M)
    r = rb * BLOCK_M + rows
    row_ok = r < GROUPS * T
    tok = r % T
    head = hk * GROUPS + r // T
    pos_q = START + tok
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    kmask_d = offs_d < HEAD_D
    vmask_d = offs_dv < HEAD_DV
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & kmask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if split < NUM_SPLITS:
        first = LO + split * CHUNK
        last = tl.minimum(first + CHUNK, START)
        kc = KC + b * stride_kcb + hk * stride_kch
        vc = VC + b * stride_vcb + hk * stride_vch
        for n in _range(first, last, BLOCK_N):
            pos_k = n + offs_n
            key_ok = pos_k < last
            if RING:  # noqa: SIM108
                slot = pos_k % PERIOD
            else:
                slot = pos_k
            k_ptrs = kc + slot[:, None] * stride_kcn + offs_d[None, :]
            v_ptrs = vc + slot[:, None] * stride_vcn + offs_dv[None, :]
            acc, l_i, m_i = _softmax_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, key_ok, pos_k, pos_q, row_ok, LEFT, qk_scale,
                kmask_d, vmask_d, GLOBAL=False, PREC=PREC,
            )  # fmt: skip
    else:
        kn = KN + b * stride_knb + hk * stride_knh
        vn = VN + b * stride_vnb + hk * stride_vnh
        for n in _range(0, T, BLOCK_N):
            t = n + offs_n
            key_ok = t < T
            k_ptrs = kn + t[:, None] * stride_knt + offs_d[None, :]
            v_ptrs = vn + t[:, None] * stride_vnt + offs_dv[None, :]
            acc, l_i, m_i = _softmax_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, key_ok, START + t, pos_q, row_ok, LEFT, qk_scale,
                kmask_d, vmask_d, GLOBAL=False, PREC=PREC,
            )  # fmt: skip
        gk = GK + b * stride_gkb + hk * stride_gkh
        gv = GV + b * stride_gvb + hk * stride_gvh
        for n in _range(0, NG, BLOCK_N):
            g = n + offs_n
            key_ok = g < NG
            pos_k = tl.load(GPOS + g, mask=key_ok, other=0)
            k_ptrs = gk + g[:, None] * stride_gkn + offs_d[None, :]
            v_ptrs = gv + g[:, None] * stride_gvn + offs_dv[None, :]
            acc, l_i, m_i = _softmax_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, key_ok, pos_k, pos_q, row_ok, LEFT, qk_scale,
                kmask_d, vmask_d, GLOBAL=True, PREC=PREC,
            )  # fmt: skip
    part = (bh * tl.num_programs(2) + rb) * (NUM_SPLITS + 1) + split
    _store_partial(M, L, ACC, part, rows, offs_dv, m_i, l_i, acc, BLOCK_M, BLOCK_DV)


@triton.jit
def _favor_step_kernel(
    Q, K, V, WS, KV, SHIFT, KV_OUT, SHIFT_OUT, M, L, ACC,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    HK, T, GROUPS, NUM_F, half_scale, log_norm, relu_eps,
    SOFTMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
):  # fmt: skip
    """Grid ``(feature blocks, B * Hk, row blocks)``. ``KV (B, Hk, m, Dv + 1)`` (``[S, z]``) and
    ``SHIFT (B, Hk, m)`` are the state before the step, float32 and contiguous; the row block 0
    programs write the state after it to ``KV_OUT`` and ``SHIFT_OUT`` (other buffers: every row
    block reads the old state). ``WS (m, D)`` is the scaled projection, ``log_norm = log(m) / 2``."""
    fb = tl.program_id(0)
    bh = tl.program_id(1)
    rb = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < NUM_F
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DV
    rows = tl.arange(0, BLOCK_M)
    r = rb * BLOCK_M + rows
    row_ok = r < GROUPS * T
    tok = r % T
    head = hk * GROUPS + r // T

    ws = tl.load(WS + offs_f[:, None] * HEAD_D + offs_d[None, :], mask=f_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k_proj = tl.dot(k, tl.trans(ws), input_precision="ieee")  # (T, F)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q_proj = tl.dot(q, tl.trans(ws), input_precision="ieee")  # (rows, F)
    kv_base = KV + bh * NUM_F * (HEAD_DV + 1)
    s_ptrs = kv_base + offs_f[:, None] * (HEAD_DV + 1) + offs_dv[None, :]
    z_ptrs = kv_base + offs_f * (HEAD_DV + 1) + HEAD_DV
    s_mask = f_ok[:, None] & dv_ok[None, :]
    state_s = tl.load(s_ptrs, mask=s_mask, other=0.0)
    state_z = tl.load(z_ptrs, mask=f_ok, other=0.0)
    if SOFTMAX:
        # Key exponents W k' - |k'|^2 / 2; the running shift c is their maximum over every key seen.
        logits = k_proj - half_scale * tl.sum(k * k, 1)[:, None]
        logits = tl.where(t_ok[:, None], logits, float("-inf"))
        c_old = tl.load(SHIFT + bh * NUM_F + offs_f, mask=f_ok, other=0.0)
        c_new = tl.maximum(c_old, tl.max(logits, 0))
        c_new = tl.where(f_ok, c_new, 0.0)
        rescale = tl.exp(c_old - c_new)  # 0 before any key (c_old = -inf), when the state is 0
        state_s = state_s * rescale[:, None]
        state_z = state_z * rescale
        phi_k = tl.where(t_ok[:, None] & f_ok[None, :], tl.exp(logits - c_new[None, :]), 0.0)
        # Query exponents W q' + c, less their maximum over this block's features (and log(m) / 2).
        e_q = tl.where(f_ok[None, :], q_proj + c_new[None, :], float("-inf"))
        r_max = tl.max(e_q, 1) + log_norm
        phi_q = tl.exp(e_q - r_max[:, None])
    else:
        phi_k = tl.where(t_ok[:, None] & f_ok[None, :], tl.maximum(k_proj, 0.0) + relu_eps, 0.0)
        phi_q = tl.where(f_ok[None, :], tl.maximum(q_proj, 0.0) + relu_eps, 0.0)
        r_max = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_t[:, None] * stride_vt + offs_dv[None, :]
    v = tl.load(v_ptrs, mask=t_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
    # Readout: the state before this step, plus the new keys up to each query's own token.
    a = tl.dot(phi_q, tl.trans(phi_k), input_precision="ieee")  # (rows, T)
    a = tl.where(offs_t[None, :] <= tok[:, None], a, 0.0)
    num = tl.dot(phi_q, state_s, input_precision="ieee") + tl.dot(a, v, input_precision="ieee")
    den = tl.sum(phi_q * state_z[None, :], 1) + tl.sum(a, 1)
    num = tl.where(row_ok[:, None], num, 0.0)
    den = tl.where(row_ok, den, 0.0)
    part = (bh * tl.num_programs(2) + rb) * tl.num_programs(0) + fb
    _store_partial(M, L, ACC, part, rows, offs_dv, r_max * _LOG2E, den, num, BLOCK_M, BLOCK_DV)
    if rb == 0:
        out_base = KV_OUT + bh * NUM_F * (HEAD_DV + 1)
        s_ptrs = out_base + offs_f[:, None] * (HEAD_DV + 1) + offs_dv[None, :]
        z_ptrs = out_base + offs_f * (HEAD_DV + 1) + HEAD_DV
        tl.store(s_ptrs, state_s + tl.dot(tl.trans(phi_k), v, input_precision="ieee"), mask=s_mask)
        tl.store(z_ptrs, state_z + tl.sum(phi_k, 0), mask=f_ok)
        if SOFTMAX:
            tl.store(SHIFT_OUT + bh * NUM_F + offs_f, c_new, mask=f_ok)


@triton.jit
def _combine_kernel(
    M, L, ACC, O, DEN,
    stride_ob, stride_oh, stride_ot,
    HK, T, GROUPS, NUM_PARTS,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DV: tl.constexpr,
):  # fmt: skip
    """Grid ``(B * Hk, row blocks)``: merge the ``NUM_PARTS`` partial results of each row into
    ``O (B, H, T, Dv)``, and write the merged normaliser ``sum_s 2^(m_s - M) l_s`` to ``DEN (B, H, T)``
    (float32, contiguous). A row whose normaliser is 0 gets output 0."""
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    rows = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = (bh * tl.num_programs(1) + rb) * NUM_PARTS
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in _range(0, NUM_PARTS):
        m_all = tl.maximum(m_all, tl.load(M + (base + s) * BLOCK_M + rows))
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for s in _range(0, NUM_PARTS):
        w = tl.exp2(tl.load(M + (base + s) * BLOCK_M + rows) - m_use)
        l_all += w * tl.load(L + (base + s) * BLOCK_M + rows)
        acc += w[:, None] * tl.load(ACC + ((base + s) * BLOCK_M + rows[:, None]) * BLOCK_DV + offs_dv[None, :])
    out = tl.where(l_all[:, None] > 0, acc / tl.where(l_all > 0, l_all, 1.0)[:, None], 0.0)
    r = rb * BLOCK_M + rows
    row_ok = r < GROUPS * T
    tok = r % T
    head = hk * GROUPS + r // T
    o_ptrs = O + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    tl.store(DEN + (b * HK * GROUPS + head) * T + tok, l_all, mask=row_ok)
