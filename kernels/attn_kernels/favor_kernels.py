"""The Triton kernels of the fused FAVOR+ attention (launched by :mod:`attn_kernels.favor`, whose
docstring gives the algorithm, the table of kernels and the product precisions).

The shared helpers take their feature map (``KERNEL``: ``"softmax"`` or ``"relu"``) and the
split of the projection (``N_SPLIT``) as named constexprs after their tile sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .favor_configs import BLOCK_ROWS, CHUNK, FeatureConfig, precisions
from .launch import LaunchSample, cdiv, pad_pow2
from .launch import loop_range as _range

# ---------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, row_ok, offs_d, n_rows, D):
    """``(R, D_PAD)`` block of a contiguous ``(.., n_rows, D)`` head at ``ptr``, in its dtype; 0 outside."""
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    return tl.load(ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _project(
    x, wt_ptr, f0, offs_d, D_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_F: tl.constexpr, N_SPLIT: tl.constexpr
):
    """``x . Ws[f0:f0+BLOCK_F]^T`` as ``(R, BLOCK_F)`` float32, to about float32 accuracy.

    16-bit ``x`` is exact in its own dtype, so ``Ws`` comes split into ``N_SPLIT`` terms of that
    dtype (``wt_ptr``: ``(N_SPLIT, D_PAD, M_PAD)``, ``Ws^T = sum`` of the terms) and the product
    takes ``N_SPLIT`` native tensor-core products. ``N_SPLIT == 0``: float32 ``x`` and ``Ws^T``,
    one three-TF32 product.
    """
    offs_f = f0 + tl.arange(0, BLOCK_F)
    offs = offs_d[:, None] * M_PAD + offs_f[None, :]
    if N_SPLIT == 0:
        u = tl.dot(x, tl.load(wt_ptr + offs), input_precision="tf32x3")
    else:
        u = tl.dot(x, tl.load(wt_ptr + offs))
        for i in tl.static_range(1, N_SPLIT):
            u = tl.dot(x, tl.load(wt_ptr + i * D_PAD * M_PAD + offs), acc=u)
    return u


@triton.jit
def _real_rows(kpm_ptr, bhk, HK, NK, rows, row_ok, HAS_PAD: tl.constexpr):
    """``row_ok`` less the padded keys of key head ``bhk`` (``kpm_ptr``: int8 ``(B, NK)``, 1 = real)."""
    if HAS_PAD:
        b = (bhk // HK).to(tl.int64)
        flag = tl.load(kpm_ptr + b * NK + rows, mask=row_ok, other=0)
        row_ok = row_ok & (flag != 0)
    return row_ok


@triton.jit
def _half_sqnorm(x, half_s2):
    """``s^2 |x|^2 / 2`` per row, float32."""
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, 1) * half_s2


@triton.jit
def _logits(u, xsq, f0, M, row_ok, BLOCK_F: tl.constexpr):
    """Softmax-kernel logits ``u - s^2 |x|^2 / 2``; ``-inf`` on padded features and rows."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    ok = row_ok[:, None] & (offs_f[None, :] < M)
    return tl.where(ok, u - xsq[:, None], float("-inf"))


@triton.jit
def _relu_features(u, f0, M, row_ok, BLOCK_F: tl.constexpr):
    """``relu(u) + eps``; zero on padded features and rows."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    ok = row_ok[:, None] & (offs_f[None, :] < M)
    return tl.where(ok, tl.maximum(u, 0.0) + 1e-3, 0.0)  # RELU_EPS


@triton.jit
def _key_features(
    kx,
    ksq,
    kstab,
    wt_ptr,
    f0,
    offs_d,
    M,
    k_ok,
    D_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_F: tl.constexpr,
    KERNEL: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    """``(phi(k), u)`` for a block of keys and features ``[f0, f0 + BLOCK_F)``."""
    u = _project(kx, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
    if KERNEL == "softmax":
        phi = tl.exp(_logits(u, ksq, f0, M, k_ok, BLOCK_F) - kstab)
    else:
        phi = _relu_features(u, f0, M, k_ok, BLOCK_F)
    return phi, u


@triton.jit
def _query_psi(
    qx,
    qsq,
    lse,
    wt_ptr,
    f0,
    offs_d,
    M,
    q_ok,
    D_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_F: tl.constexpr,
    KERNEL: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    """``(psi, u)`` with ``psi = phi(q) / den`` from the saved ``lse`` (``+inf`` on empty rows gives 0)."""
    u = _project(qx, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
    if KERNEL == "softmax":
        psi = tl.exp(_logits(u, qsq, f0, M, q_ok, BLOCK_F) - lse[:, None])
    else:
        psi = _relu_features(u, f0, M, q_ok, BLOCK_F) * tl.exp(-lse)[:, None]
    return psi, u


@triton.jit
def _feature_grad(phi, u, dphi, f0, M, BLOCK_F: tl.constexpr, KERNEL: tl.constexpr):
    """Gradient w.r.t. the logit (softmax: ``phi * dphi``) or projection (relu: ``dphi * [u > 0]``)."""
    if KERNEL == "softmax":
        grad = phi * dphi
    else:
        offs_f = f0 + tl.arange(0, BLOCK_F)
        grad = tl.where((u > 0.0) & (offs_f[None, :] < M), dphi, 0.0)
    return grad


@triton.jit
def _load_state(s_ptr, z_ptr, slot, f0, M_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_F: tl.constexpr):
    """``(S[f0:f0+BLOCK_F], z[f0:f0+BLOCK_F])`` of state ``slot`` (padded, so unmasked)."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    offs_v = tl.arange(0, DV_PAD)
    base = slot.to(tl.int64) * M_PAD
    s = tl.load(s_ptr + (base + offs_f[:, None]) * DV_PAD + offs_v[None, :])
    z = tl.load(z_ptr + base + offs_f)
    return s, z


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _key_max_kernel(
    k_ptr,
    wt_ptr,
    out_ptr,
    kpm_ptr,
    N,
    D,
    M,
    half_s2,
    n_blocks,
    HK,
    D_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    N_SPLIT: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Max logit of one block of keys over all features: ``out[bh, block]`` (``-inf`` if no real key)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = _real_rows(kpm_ptr, bh, HK, N, rows, rows < N, HAS_PAD=HAS_PAD)
    offs_d = tl.arange(0, D_PAD)
    x = _load_rows(k_ptr + bh.to(tl.int64) * N * D, rows, row_ok, offs_d, N, D)
    xsq = _half_sqnorm(x, half_s2)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for f0 in range(0, M_PAD, BLOCK_F):
        u = _project(x, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
        best = tl.maximum(best, tl.max(_logits(u, xsq, f0, M, row_ok, BLOCK_F), 1))
    tl.store(out_ptr + bh * n_blocks + pid_n, tl.max(best, 0))


@triton.jit
def _state_kernel(
    x_ptr,
    y_ptr,
    stab_ptr,
    wgt_ptr,
    wt_ptr,
    s_ptr,
    z_ptr,
    kpm_ptr,
    N,
    OFF,
    SEG,
    D,
    DV,
    M,
    half_s2,
    n_slots,
    slot0,
    slot_step,
    HEADS,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    KERNEL: tl.constexpr,
    STAB: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    N_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """One segment of positions ``[t SEG, (t+1) SEG)`` (rows ``i = p - OFF``), one feature block,
    stored in slot ``slot0 + slot_step * t`` of ``n_slots`` per head.

    ``S[f, :] = sum_i f_i[f] y_i``, ``z[f] = sum_i f_i[f] w_i`` with ``f_i`` the features of
    ``x_i`` divided by ``exp(stab)``: STAB 0 none, 1 one value per head (keys), 2 per row (the
    query-side ``lse`` of the backward). ``w_i`` is 1 or ``wgt[i]`` (HAS_WEIGHT). HAS_PAD (keys
    only, ``HEADS`` heads per batch): padded rows have zero features, so they add nothing.
    """
    pid_f = tl.program_id(0)
    t = tl.program_id(1)
    bh = tl.program_id(2)
    f0 = pid_f * BLOCK_F
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    x_base = x_ptr + bh.to(tl.int64) * N * D
    y_base = y_ptr + bh.to(tl.int64) * N * DV
    acc = tl.zeros([BLOCK_F, DV_PAD], tl.float32)
    zacc = tl.zeros([BLOCK_F], tl.float32)
    if STAB == 1:
        hstab = tl.load(stab_ptr + bh)
    for p0 in _range(t * SEG, (t + 1) * SEG, BLOCK_N):
        rows = p0 + tl.arange(0, BLOCK_N) - OFF
        row_ok = _real_rows(kpm_ptr, bh, HEADS, N, rows, (rows >= 0) & (rows < N), HAS_PAD=HAS_PAD)
        x = _load_rows(x_base, rows, row_ok, offs_d, N, D)
        y = _load_rows(y_base, rows, row_ok, offs_v, N, DV).to(tl.float32)
        u = _project(x, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
        if STAB == 2:
            rstab = tl.load(stab_ptr + bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf"))
        if KERNEL == "softmax":
            xsq = _half_sqnorm(x, half_s2)
            lg = _logits(u, xsq, f0, M, row_ok, BLOCK_F)
            if STAB == 1:
                lg = lg - hstab
            if STAB == 2:
                lg = lg - rstab[:, None]
            feat = tl.exp(lg)
        else:
            feat = _relu_features(u, f0, M, row_ok, BLOCK_F)
            if STAB == 2:
                feat = feat * tl.exp(-rstab)[:, None]
        acc += tl.dot(tl.trans(feat), y, input_precision=DOT_PREC)
        if HAS_WEIGHT:
            wgt = tl.load(wgt_ptr + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
            zacc += tl.sum(feat * wgt[:, None], 0)
        else:
            zacc += tl.sum(feat, 0)
    slot = (bh.to(tl.int64) * n_slots + slot0 + slot_step * t) * M_PAD + f0
    offs_f = tl.arange(0, BLOCK_F)
    tl.store(s_ptr + (slot + offs_f[:, None]) * DV_PAD + offs_v[None, :], acc)
    tl.store(z_ptr + slot + offs_f, zacc)


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    wt_ptr,
    s_ptr,
    z_ptr,
    kstab_ptr,
    o_ptr,
    lse_ptr,
    kpm_ptr,
    NQ,
    NK,
    OFF,
    T0,
    n_state,
    slot0,
    slot_step,
    D,
    DV,
    M,
    half_s2,
    G,
    HK,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CHUNK: tl.constexpr,
    CAUSAL: tl.constexpr,
    KERNEL: tl.constexpr,
    N_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Query pass: ``out = (phi(q) S + intra) / (phi(q) z + intra)`` for one block of queries.

    Non-causal: block ``pid`` of rows and the one total state. Causal: chunk ``t = pid + T0`` of
    positions, the exclusive prefix state of chunk ``t`` and the masked diagonal chunk of keys.
    Also writes ``lse = c_q + log(den)`` (``+inf`` for rows with no visible key).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    bhk = bh // G
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    if CAUSAL:
        t = pid // (CHUNK // BLOCK_M) + T0
        pos = t * CHUNK + (pid % (CHUNK // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)
        kpos = t * CHUNK + tl.arange(0, CHUNK)
        rows = pos - OFF
        slot = bhk * n_state + slot0 + slot_step * tl.maximum(t, 0)
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = bhk * n_state + slot0
    q_ok = (rows >= 0) & (rows < NQ)
    qx = _load_rows(q_ptr + bh.to(tl.int64) * NQ * D, rows, q_ok, offs_d, NQ, D)
    qsq = _half_sqnorm(qx, half_s2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    if CAUSAL:
        k_ok = _real_rows(kpm_ptr, bhk, HK, NK, kpos, (kpos >= 0) & (kpos < NK), HAS_PAD=HAS_PAD)
        kx = _load_rows(k_ptr + bhk.to(tl.int64) * NK * D, kpos, k_ok, offs_d, NK, D)
        ksq = _half_sqnorm(kx, half_s2)
        att = tl.zeros([BLOCK_M, CHUNK], tl.float32)
    kstab = 0.0
    if KERNEL == "softmax":
        kstab = tl.load(kstab_ptr + bhk)
    for f0 in range(0, M_PAD, BLOCK_F):
        u = _project(qx, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
        if KERNEL == "softmax":
            lg = _logits(u, qsq, f0, M, tl.full([BLOCK_M], 1, tl.int1), BLOCK_F)
            m_new = tl.maximum(m_i, tl.max(lg, 1))
            alpha = tl.exp(m_i - m_new)
            pq = tl.exp(lg - m_new[:, None])
            m_i = m_new
            acc = acc * alpha[:, None]
            den = den * alpha
        else:
            pq = _relu_features(u, f0, M, tl.full([BLOCK_M], 1, tl.int1), BLOCK_F)
        s, z = _load_state(s_ptr, z_ptr, slot, f0, M_PAD, DV_PAD, BLOCK_F)
        acc += tl.dot(pq, s, input_precision=DOT_PREC)
        den += tl.sum(pq * z[None, :], 1)
        if CAUSAL:
            pk, _ = _key_features(
                kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, D_PAD, M_PAD, BLOCK_F, KERNEL=KERNEL, N_SPLIT=N_SPLIT
            )
            if KERNEL == "softmax":
                att = att * alpha[:, None]
            att += tl.dot(pq, tl.trans(pk), input_precision=DOT_PREC)
    if CAUSAL:
        vis = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
        att = tl.where(vis, att, 0.0)
        vx = _load_rows(v_ptr + bhk.to(tl.int64) * NK * DV, kpos, k_ok, offs_v, NK, DV).to(tl.float32)
        acc += tl.dot(att, vx, input_precision=DOT_PREC)
        den += tl.sum(att, 1)
    has_key = den > 0.0
    out = acc / tl.where(has_key, den, 1.0)[:, None]
    lse = tl.log(tl.maximum(den, 1e-30))  # DEN_FLOOR
    if KERNEL == "softmax":
        lse += m_i
    lse = tl.where(has_key, lse, float("inf"))
    o_base = o_ptr + bh.to(tl.int64) * NQ * DV
    o_mask = q_ok[:, None] & (offs_v[None, :] < DV)
    tl.store(o_base + rows[:, None].to(tl.int64) * DV + offs_v[None, :], out.to(o_ptr.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptr + bh.to(tl.int64) * NQ + rows, lse, mask=q_ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    wt_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    kstab_ptr,
    dq_ptr,
    kpm_ptr,
    NQ,
    NK,
    OFF,
    T0,
    n_state,
    slot0,
    slot_step,
    D,
    DV,
    M,
    half_s2,
    G,
    HK,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CHUNK: tl.constexpr,
    CAUSAL: tl.constexpr,
    KERNEL: tl.constexpr,
    N_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """``dQ`` of one block of queries (same blocking as :func:`_fwd_kernel`).

    ``dphi(q_i) = (S dO_i - delta_i z + sum_j [dO_i.v_j - delta_i] phi(k_j)) / den_i`` with
    ``delta_i = dO_i . O_i``, then through the feature map and the projection.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    bhk = bh // G
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    if CAUSAL:
        t = pid // (CHUNK // BLOCK_M) + T0
        pos = t * CHUNK + (pid % (CHUNK // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)
        kpos = t * CHUNK + tl.arange(0, CHUNK)
        rows = pos - OFF
        slot = bhk * n_state + slot0 + slot_step * tl.maximum(t, 0)
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = bhk * n_state + slot0
    q_ok = (rows >= 0) & (rows < NQ)
    qx = _load_rows(q_ptr + bh.to(tl.int64) * NQ * D, rows, q_ok, offs_d, NQ, D)
    qsq = _half_sqnorm(qx, half_s2)
    dox = _load_rows(do_ptr + bh.to(tl.int64) * NQ * DV, rows, q_ok, offs_v, NQ, DV).to(tl.float32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * NQ + rows, mask=q_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * NQ + rows, mask=q_ok, other=0.0)
    kstab = 0.0
    if KERNEL == "softmax":
        kstab = tl.load(kstab_ptr + bhk)
    if CAUSAL:
        k_ok = _real_rows(kpm_ptr, bhk, HK, NK, kpos, (kpos >= 0) & (kpos < NK), HAS_PAD=HAS_PAD)
        kx = _load_rows(k_ptr + bhk.to(tl.int64) * NK * D, kpos, k_ok, offs_d, NK, D)
        ksq = _half_sqnorm(kx, half_s2)
        vx = _load_rows(v_ptr + bhk.to(tl.int64) * NK * DV, kpos, k_ok, offs_v, NK, DV).to(tl.float32)
        vis = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
        datt = tl.dot(dox, tl.trans(vx), input_precision=DOT_PREC) - delta[:, None]
        datt = tl.where(vis, datt, 0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    rs = tl.zeros([BLOCK_M], tl.float32)
    offs_fb = tl.arange(0, BLOCK_F)
    for f0 in range(0, M_PAD, BLOCK_F):
        psi, u = _query_psi(
            qx, qsq, lse, wt_ptr, f0, offs_d, M, q_ok, D_PAD, M_PAD, BLOCK_F, KERNEL=KERNEL, N_SPLIT=N_SPLIT
        )
        s, z = _load_state(s_ptr, z_ptr, slot, f0, M_PAD, DV_PAD, BLOCK_F)
        tt = tl.dot(dox, tl.trans(s), input_precision=DOT_PREC) - delta[:, None] * z[None, :]
        if CAUSAL:
            pk, _ = _key_features(
                kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, D_PAD, M_PAD, BLOCK_F, KERNEL=KERNEL, N_SPLIT=N_SPLIT
            )
            tt += tl.dot(datt, pk, input_precision=DOT_PREC)
        dl = _feature_grad(psi, u, tt, f0, M, BLOCK_F, KERNEL=KERNEL)
        if KERNEL != "softmax":
            dl = dl * tl.exp(-lse)[:, None]
        else:
            rs += tl.sum(dl, 1)
        w = tl.load(w_ptr + (f0 + offs_fb)[:, None] * D_PAD + offs_d[None, :])
        dq += tl.dot(dl, w, input_precision=DOT_PREC)
    if KERNEL == "softmax":
        dq -= (2.0 * half_s2) * qx.to(tl.float32) * rs[:, None]
    dq_base = dq_ptr + bh.to(tl.int64) * NQ * D
    mask = q_ok[:, None] & (offs_d[None, :] < D)
    tl.store(dq_base + rows[:, None].to(tl.int64) * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    wt_ptr,
    w_ptr,
    r_ptr,
    rz_ptr,
    kstab_ptr,
    dk_ptr,
    dv_ptr,
    kpm_ptr,
    NQ,
    NK,
    OFF,
    n_state,
    slot0,
    slot_step,
    D,
    DV,
    M,
    half_s2,
    G,
    HK,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CHUNK: tl.constexpr,
    CAUSAL: tl.constexpr,
    KERNEL: tl.constexpr,
    N_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """``dK, dV`` of one block of keys of key head ``bhk``, summed over its query heads.

    With the query-side state ``R = sum_i psi_i dO_i^T``, ``r = sum_i psi_i delta_i`` over the
    queries that see every key of the block (all of them, or later chunks when causal)::

        dV_j = R^T phi(k_j) + intra,   dphi(k_j) = R v_j - r + intra

    The causal intra part walks the diagonal chunk of each query head of the group.
    """
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    offs_fb = tl.arange(0, BLOCK_F)
    if CAUSAL:
        t = pid // (CHUNK // BLOCK_N)
        pos = t * CHUNK + (pid % (CHUNK // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = bhk * n_state + slot0 + slot_step * t
    else:
        pos = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = bhk * n_state + slot0
    k_ok = _real_rows(kpm_ptr, bhk, HK, NK, pos, pos < NK, HAS_PAD=HAS_PAD)
    kx = _load_rows(k_ptr + bhk.to(tl.int64) * NK * D, pos, k_ok, offs_d, NK, D)
    ksq = _half_sqnorm(kx, half_s2)
    vx = _load_rows(v_ptr + bhk.to(tl.int64) * NK * DV, pos, k_ok, offs_v, NK, DV).to(tl.float32)
    kstab = 0.0
    if KERNEL == "softmax":
        kstab = tl.load(kstab_ptr + bhk)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    rs = tl.zeros([BLOCK_N], tl.float32)
    for f0 in range(0, M_PAD, BLOCK_F):
        pk, u = _key_features(
            kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, D_PAD, M_PAD, BLOCK_F, KERNEL=KERNEL, N_SPLIT=N_SPLIT
        )
        r, rz = _load_state(r_ptr, rz_ptr, slot, f0, M_PAD, DV_PAD, BLOCK_F)
        dphi = tl.dot(vx, tl.trans(r), input_precision=DOT_PREC) - rz[None, :]
        dv += tl.dot(pk, r, input_precision=DOT_PREC)
        dl = _feature_grad(pk, u, dphi, f0, M, BLOCK_F, KERNEL=KERNEL)
        if KERNEL == "softmax":
            rs += tl.sum(dl, 1)
        w = tl.load(w_ptr + (f0 + offs_fb)[:, None] * D_PAD + offs_d[None, :])
        dk += tl.dot(dl, w, input_precision=DOT_PREC)
    if CAUSAL:
        qpos = t * CHUNK + tl.arange(0, CHUNK)
        rows = qpos - OFF
        q_ok = (rows >= 0) & (rows < NQ)
        vis = (qpos[None, :] >= pos[:, None]) & q_ok[None, :] & k_ok[:, None]  # (keys, queries)
        for g in _range(0, G):
            bh = bhk * G + g
            qx = _load_rows(q_ptr + bh.to(tl.int64) * NQ * D, rows, q_ok, offs_d, NQ, D)
            qsq = _half_sqnorm(qx, half_s2)
            dox = _load_rows(do_ptr + bh.to(tl.int64) * NQ * DV, rows, q_ok, offs_v, NQ, DV).to(tl.float32)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * NQ + rows, mask=q_ok, other=float("inf"))
            delta = tl.load(delta_ptr + bh.to(tl.int64) * NQ + rows, mask=q_ok, other=0.0)
            datt = tl.dot(vx, tl.trans(dox), input_precision=DOT_PREC) - delta[None, :]
            datt = tl.where(vis, datt, 0.0)
            att = tl.zeros([BLOCK_N, CHUNK], tl.float32)
            for f0 in range(0, M_PAD, BLOCK_F):
                pk, u = _key_features(
                    kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, D_PAD, M_PAD, BLOCK_F, KERNEL=KERNEL, N_SPLIT=N_SPLIT
                )
                psi, _ = _query_psi(
                    qx, qsq, lse, wt_ptr, f0, offs_d, M, q_ok, D_PAD, M_PAD, BLOCK_F, KERNEL=KERNEL, N_SPLIT=N_SPLIT
                )
                att += tl.dot(pk, tl.trans(psi), input_precision=DOT_PREC)
                dphi = tl.dot(datt, psi, input_precision=DOT_PREC)
                dl = _feature_grad(pk, u, dphi, f0, M, BLOCK_F, KERNEL=KERNEL)
                if KERNEL == "softmax":
                    rs += tl.sum(dl, 1)
                w = tl.load(w_ptr + (f0 + offs_fb)[:, None] * D_PAD + offs_d[None, :])
                dk += tl.dot(dl, w, input_precision=DOT_PREC)
            att = tl.where(vis, att, 0.0)
            dv += tl.dot(att, dox, input_precision=DOT_PREC)
    if KERNEL == "softmax":
        dk -= (2.0 * half_s2) * kx.to(tl.float32) * rs[:, None]
    if HAS_PAD:  # padded keys (relu: their feature gradient is not zero) get zero gradients
        dk = tl.where(k_ok[:, None], dk, 0.0)
        dv = tl.where(k_ok[:, None], dv, 0.0)
    k_in = pos < NK
    dk_base = dk_ptr + bhk.to(tl.int64) * NK * D
    dv_base = dv_ptr + bhk.to(tl.int64) * NK * DV
    row_off = pos[:, None].to(tl.int64)
    tl.store(
        dk_base + row_off * D + offs_d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=k_in[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        dv_base + row_off * DV + offs_v[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=k_in[:, None] & (offs_v[None, :] < DV),
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specialisations (tests/test_favor_compile.py, the static kernel report)
# ---------------------------------------------------------------------------------------------

_KERNELS = {
    "key_max": _key_max_kernel,
    "state": _state_kernel,
    "fwd": _fwd_kernel,
    "bwd_dq": _bwd_dq_kernel,
    "bwd_dkv": _bwd_dkv_kernel,
}
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer arguments holding tensors in the input dtype (the projection too, unless float32); the
# key-valid vector is int8 and every other pointer float32.
_DATA_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "x_ptr", "y_ptr"}


def _slots(kernel: str, causal: bool, backward_state: bool, n_seg: int) -> tuple[int, int, int]:
    """``(n_slots, first, step)`` of the states a launch reads or writes (``favor._Slots``)."""
    if kernel == "state":
        if not causal:
            return n_seg, 0, 1
        return (n_seg + 1, n_seg, -1) if backward_state else (n_seg + 1, 1, 1)
    if not causal:
        return 1, 0, 0  # the one total state
    return (n_seg + 1, n_seg - 1, -1) if kernel == "bwd_dkv" else (n_seg + 1, 0, 1)


def aot_spec(
    kernel: str,
    cfg: FeatureConfig,
    head_dim: int,
    dtype: torch.dtype,
    *,
    causal: bool,
    feature: str = "softmax",
    backward_state: bool = False,
    padded: bool = False,
    sample: LaunchSample | None = None,
) -> tuple[object, dict[str, str | int], dict[str, object]]:
    """``(fn, signature, constexprs)`` of one FAVOR+ kernel specialisation, for ``attn_kernels.aot.compile_for``.

    ``kernel``: ``"key_max"``, ``"state"``, ``"fwd"``, ``"bwd_dq"`` or ``"bwd_dkv"``; ``cfg`` a
    :class:`~attn_kernels.favor_configs.FeatureConfig`. ``backward_state``: the state kernel as the
    backward runs it (query-side states: per-row stabiliser and weights). ``padded``: with a key
    padding mask. Integer arguments carry their values in ``sample`` (default
    :class:`~attn_kernels.launch.LaunchSample`: contiguous ``(B, H, N, D)`` tensors,
    ``sample.features`` random features), as :mod:`attn_kernels.favor` passes them on a GPU of
    ``sample.sms`` SMs, so that the compile applies the launcher's specialisation.
    """
    sample = sample or LaunchSample()
    fn = _KERNELS[kernel]
    ty = _TRITON_TYPES[dtype]
    prec = precisions(dtype)
    n, h, hk, m = sample.seq_len, sample.heads, sample.kv_heads, sample.features
    d_pad, m_pad = pad_pow2(head_dim), pad_pow2(m)
    heads = h if backward_state else hk  # the state kernel's rows: queries (backward) or keys
    if causal:
        seg, n_seg = CHUNK, cdiv(n, CHUNK)
    else:  # favor._split_segments: enough programs to fill the GPU
        blocks = cdiv(n, BLOCK_ROWS)
        splits = max(1, min(blocks, cdiv(2 * sample.sms, sample.batch * heads * (m_pad // 32))))
        seg = BLOCK_ROWS * cdiv(blocks, splits)
        n_seg = cdiv(n, seg)
    n_slots, slot0, slot_step = _slots(kernel, causal, backward_state, n_seg)
    ints = dict(
        N=n, NQ=n, NK=n, D=head_dim, DV=head_dim, M=m, OFF=0, T0=0, SEG=seg, HK=hk, G=sample.groups, HEADS=heads,
        n_blocks=cdiv(n, BLOCK_ROWS), n_slots=n_slots, n_state=n_slots, slot0=slot0, slot_step=slot_step,
    )  # fmt: skip
    sig: dict[str, str | int] = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            data = name in _DATA_POINTERS or (name == "wt_ptr" and ty != "fp32")
            sig[name] = "*i8" if name == "kpm_ptr" else "*" + ty if data else "*fp32"
        elif name == "half_s2":
            sig[name] = "fp32"
        elif name in ints:
            sig[name] = ints[name]
    constexprs: dict[str, object] = dict(D_PAD=d_pad, M_PAD=m_pad, N_SPLIT=prec["N_SPLIT"], HAS_PAD=padded)
    if kernel == "key_max":
        return fn, sig, dict(constexprs, BLOCK_N=BLOCK_ROWS, BLOCK_F=cfg.block_f)
    constexprs.update(DV_PAD=d_pad, BLOCK_F=cfg.block_f, KERNEL=feature, DOT_PREC=prec["DOT_PREC"])
    if kernel == "state":
        stab = dict(STAB=2 if backward_state else 1, HAS_WEIGHT=backward_state)
        return fn, sig, dict(constexprs, BLOCK_N=CHUNK if causal else BLOCK_ROWS, **stab)
    rows = "BLOCK_N" if kernel == "bwd_dkv" else "BLOCK_M"
    return fn, sig, dict(constexprs, **{rows: cfg.block_m}, CHUNK=CHUNK, CAUSAL=causal)
