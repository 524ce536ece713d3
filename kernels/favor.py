"""Fused Performer (FAVOR+) attention in Triton: forward and backward, causal and non-causal.

Semantics are those of :mod:`attention_variants.performer`. Per (batch, head), with
``s = scale ** 0.5`` and ``Ws = W * s`` (the scale is folded into the projection)::

    logit(x) = x . Ws^T - s^2 |x|^2 / 2                      (m features, float32)
    phi(x)   = exp(logit(x) - c)                                  kernel="softmax"
    phi(x)   = relu(x . Ws^T) + 1e-3                              kernel="relu"
    out_i    = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)      (visible j)

The ``1 / sqrt(m)`` of the definition and both stabilisers cancel in the ratio, so the kernels
drop the former and pick: for keys, one ``c`` per (batch, key head), the maximum logit over all
keys and features (found by a first reduction pass, :func:`_key_max_kernel`); for queries, the
row maximum, tracked online across feature blocks exactly like the running maximum of
flash attention, so a query row never holds more than ``BLOCK_F`` features at a time.

Kernels (``P`` = ``M_PAD`` padded features, ``Dv`` padded value dim)::

    _key_max_kernel   K             -> partial maxima of the key logits       (softmax only)
    _state_kernel     X, Y, stab    -> per segment: sum_rows f(x) y^T (P x Dv), sum_rows f(x) w
    _fwd_kernel       Q, state[, K, V of the diagonal chunk] -> O, lse
    _bwd_dq_kernel    Q, dO, lse, state[, K, V]               -> dQ
    _bwd_dkv_kernel   K, V, suffix state of queries[, Q, dO]  -> dK, dV

Non-causal: the key pass (``_state_kernel`` on K, V) sums ``phi(K)^T [V, 1]`` over split ranges
of N; the splits are added on the host (P x Dv per head); the query pass applies it.

Causal (bottom-right: query ``i`` sits at position ``p = i + Nk - Nq`` and sees keys ``j <= p``)
is chunked along positions with chunk ``C``::

    positions   0 ........ C ........ 2C ........ 3C
    keys        | chunk 0  | chunk 1  | chunk 2  |
    queries   (off)   | chunk 0  | chunk 1  | chunk 2  |     query chunk t reads the prefix
                                                           state of key chunks < t (inter) and
                                                           its own key chunk under a j <= p mask
                                                           (intra, C x C)

The state kernel writes one local state per chunk into slot ``t + 1`` of a buffer whose slot 0
is zero; an in-place cumulative sum over the slots leaves the exclusive prefix each chunk reads:
``(N / C + 1) * P * Dv`` floats per head, O(N m) for ``C >= Dv``, never an ``N x m x Dv``
tensor. A query chunk runs as ``C / BLOCK_M`` programs, each holding the whole diagonal key
chunk. The backward is the same linear-attention algebra run
twice: ``dQ`` reads the key prefix states, ``dK, dV`` read the query suffix states
``sum_i psi_i dO_i^T`` and ``sum_i psi_i (dO_i . O_i)`` with ``psi_i = phi(q_i) / den_i``.

Precision: the feature map must be float32-accurate (an error ``e`` in a logit is a relative
error ``e`` in ``phi``, and logits reach tens). 16-bit inputs are exact in their own dtype, so
``Ws`` is split on the host into two terms of that dtype (``hi + lo``: 22 bits for float16,
16 for bfloat16, a logit error near 1e-4) and the projection takes two native tensor-core
products; float32 inputs take one ``tf32x3`` product. The products of features (``phi S``,
``phi(Q) phi(K)^T``, ``A V`` and their backward) use TF32 operands for 16-bit inputs (float32
range, so small features do not flush as they would in float16) and ``tf32x3`` for float32
inputs. Everything accumulates in float32.

Rows with no visible key have ``den == 0``: the output is 0 and ``lse = +inf`` makes their
backward features exactly 0.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import AUTOTUNE_ENV, interpreter_enabled, interpreter_range

RELU_EPS = 1e-3  # the ``+ 1e-3`` of the relu feature map (attention_variants.performer.RELU_EPS)
CHUNK = 64  # chunk length of the causal kernels (positions)
BLOCK_ROWS = 64  # rows per program of the non-causal kernels
MAX_FEATURES = 1024
MAX_HEAD_DIM = 128
# Rows whose normaliser falls below this get their backward psi = phi / den computed with this
# floor instead (a damped gradient) so the query-side states cannot overflow float32.
DEN_FLOOR = 1e-30
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Loops over runtime bounds (segments, query heads of a group) use ``_range``: the loop ``range``
# compiles to, and under the interpreter one that Triton 3.6 can run too.
_range = interpreter_range if interpreter_enabled() else tl.range


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
    M_PAD: tl.constexpr,
    BLOCK_F: tl.constexpr,
    KERNEL: tl.constexpr,
    D_PAD: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    """``(phi(k), u)`` for a block of keys and features ``[f0, f0 + BLOCK_F)``."""
    u = _project(kx, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT)
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
    M_PAD: tl.constexpr,
    BLOCK_F: tl.constexpr,
    KERNEL: tl.constexpr,
    D_PAD: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    """``(psi, u)`` with ``psi = phi(q) / den`` from the saved ``lse`` (``+inf`` on empty rows gives 0)."""
    u = _project(qx, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT)
    if KERNEL == "softmax":
        psi = tl.exp(_logits(u, qsq, f0, M, q_ok, BLOCK_F) - lse[:, None])
    else:
        psi = _relu_features(u, f0, M, q_ok, BLOCK_F) * tl.exp(-lse)[:, None]
    return psi, u


@triton.jit
def _feature_grad(phi, u, dphi, f0, M, KERNEL: tl.constexpr, BLOCK_F: tl.constexpr):
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
    N,
    D,
    M,
    half_s2,
    n_blocks,
    D_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    """Max logit of one block of keys over all features: ``out[bh, block]``."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, D_PAD)
    x = _load_rows(k_ptr + bh.to(tl.int64) * N * D, rows, row_ok, offs_d, N, D)
    xsq = _half_sqnorm(x, half_s2)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for f0 in range(0, M_PAD, BLOCK_F):
        u = _project(x, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT)
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
):
    """One segment of positions ``[t SEG, (t+1) SEG)`` (rows ``i = p - OFF``), one feature block,
    stored in slot ``slot0 + slot_step * t`` of ``n_slots`` per head.

    ``S[f, :] = sum_i f_i[f] y_i``, ``z[f] = sum_i f_i[f] w_i`` with ``f_i`` the features of
    ``x_i`` divided by ``exp(stab)``: STAB 0 none, 1 one value per head (keys), 2 per row (the
    query-side ``lse`` of the backward). ``w_i`` is 1 or ``wgt[i]`` (HAS_WEIGHT).
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
        row_ok = (rows >= 0) & (rows < N)
        x = _load_rows(x_base, rows, row_ok, offs_d, N, D)
        y = _load_rows(y_base, rows, row_ok, offs_v, N, DV).to(tl.float32)
        u = _project(x, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT)
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
        k_ok = (kpos >= 0) & (kpos < NK)
        kx = _load_rows(k_ptr + bhk.to(tl.int64) * NK * D, kpos, k_ok, offs_d, NK, D)
        ksq = _half_sqnorm(kx, half_s2)
        att = tl.zeros([BLOCK_M, CHUNK], tl.float32)
    kstab = 0.0
    if KERNEL == "softmax":
        kstab = tl.load(kstab_ptr + bhk)
    for f0 in range(0, M_PAD, BLOCK_F):
        u = _project(qx, wt_ptr, f0, offs_d, D_PAD, M_PAD, BLOCK_F, N_SPLIT)
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
            pk, _ = _key_features(kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, M_PAD, BLOCK_F, KERNEL, D_PAD, N_SPLIT)
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
        k_ok = (kpos >= 0) & (kpos < NK)
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
        psi, u = _query_psi(qx, qsq, lse, wt_ptr, f0, offs_d, M, q_ok, M_PAD, BLOCK_F, KERNEL, D_PAD, N_SPLIT)
        s, z = _load_state(s_ptr, z_ptr, slot, f0, M_PAD, DV_PAD, BLOCK_F)
        tt = tl.dot(dox, tl.trans(s), input_precision=DOT_PREC) - delta[:, None] * z[None, :]
        if CAUSAL:
            pk, _ = _key_features(kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, M_PAD, BLOCK_F, KERNEL, D_PAD, N_SPLIT)
            tt += tl.dot(datt, pk, input_precision=DOT_PREC)
        dl = _feature_grad(psi, u, tt, f0, M, KERNEL, BLOCK_F)
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
    k_ok = pos < NK
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
        pk, u = _key_features(kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, M_PAD, BLOCK_F, KERNEL, D_PAD, N_SPLIT)
        r, rz = _load_state(r_ptr, rz_ptr, slot, f0, M_PAD, DV_PAD, BLOCK_F)
        dphi = tl.dot(vx, tl.trans(r), input_precision=DOT_PREC) - rz[None, :]
        dv += tl.dot(pk, r, input_precision=DOT_PREC)
        dl = _feature_grad(pk, u, dphi, f0, M, KERNEL, BLOCK_F)
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
                    kx, ksq, kstab, wt_ptr, f0, offs_d, M, k_ok, M_PAD, BLOCK_F, KERNEL, D_PAD, N_SPLIT
                )
                psi, _ = _query_psi(qx, qsq, lse, wt_ptr, f0, offs_d, M, q_ok, M_PAD, BLOCK_F, KERNEL, D_PAD, N_SPLIT)
                att += tl.dot(pk, tl.trans(psi), input_precision=DOT_PREC)
                dphi = tl.dot(datt, psi, input_precision=DOT_PREC)
                dl = _feature_grad(pk, u, dphi, f0, M, KERNEL, BLOCK_F)
                if KERNEL == "softmax":
                    rs += tl.sum(dl, 1)
                w = tl.load(w_ptr + (f0 + offs_fb)[:, None] * D_PAD + offs_d[None, :])
                dk += tl.dot(dl, w, input_precision=DOT_PREC)
            att = tl.where(vis, att, 0.0)
            dv += tl.dot(att, dox, input_precision=DOT_PREC)
    if KERNEL == "softmax":
        dk -= (2.0 * half_s2) * kx.to(tl.float32) * rs[:, None]
    dk_base = dk_ptr + bhk.to(tl.int64) * NK * D
    dv_base = dv_ptr + bhk.to(tl.int64) * NK * DV
    row_off = pos[:, None].to(tl.int64)
    tl.store(
        dk_base + row_off * D + offs_d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=k_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        dv_base + row_off * DV + offs_v[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=k_ok[:, None] & (offs_v[None, :] < DV),
    )


# ---------------------------------------------------------------------------------------------
# Configurations: a list per kernel, pruned by keep(); autotuned on GPU, first kept one otherwise
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tunable launch parameters of one kernel.

    ``block_m``: rows per program (queries of ``fwd`` and ``bwd_dq``, keys of ``bwd_dkv``; a
    divisor of ``CHUNK`` when causal); the ``key_max`` and ``state`` kernels take their rows from
    the algorithm (``BLOCK_ROWS`` / ``CHUNK``) and ignore it. ``block_f``: features per step.
    """

    block_m: int
    block_f: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"M{self.block_m}-F{self.block_f}-w{self.num_warps}-s{self.num_stages}"


CONFIGS: dict[str, tuple[KernelConfig, ...]] = {
    "key_max": (KernelConfig(64, 64, 4, 2), KernelConfig(64, 32, 4, 2), KernelConfig(64, 32, 8, 2)),
    "state": (
        KernelConfig(64, 64, 4, 2),
        KernelConfig(64, 32, 4, 2),
        KernelConfig(64, 32, 8, 1),
        KernelConfig(64, 16, 8, 1),
    ),
    # Left out after running every config alone on an H200 (Triton 3.6, head dim 64, 256 features,
    # tests/test_favor_gpu.py::test_every_config): fwd M64-F16-w8-s2 reads shared memory out of
    # bounds with float32 inputs; bwd_dq and bwd_dkv M64-F32-w8-s1 return garbage (relative error
    # 1e20 and more) for bfloat16 and fault when causal. The interpreter cannot see either.
    "fwd": (
        KernelConfig(64, 32, 4, 2),
        KernelConfig(64, 64, 8, 2),
        KernelConfig(32, 32, 8, 2),
        KernelConfig(32, 32, 4, 2),
        KernelConfig(16, 16, 8, 1),
    ),
    "bwd_dq": (KernelConfig(32, 32, 8, 1), KernelConfig(16, 16, 4, 1)),
    "bwd_dkv": (KernelConfig(32, 32, 8, 1), KernelConfig(16, 16, 8, 1)),
}
_ROW_BLOCK = {"fwd": "BLOCK_M", "bwd_dq": "BLOCK_M", "bwd_dkv": "BLOCK_N"}


@dataclass(frozen=True)
class LaunchShape:
    """What :func:`keep` looks at: padded feature count and head dims, the form, the input width."""

    m_pad: int
    d_pad: int
    dv_pad: int
    causal: bool
    fp32: bool = False


def keep(kernel: str, cfg: KernelConfig, shape: LaunchShape) -> bool:
    """Whether ``cfg`` is worth launching for ``shape`` (calibrated on ``ptxas -v`` for sm_80/sm_90).

    A feature block wider than the padded features only wastes work. The register model: the
    rows a program holds (its row block, plus the diagonal chunk of ``CHUNK`` keys when causal)
    times the head dim, per warp, must fit a budget that float32 inputs halve (their three-TF32
    products split every operand); float32 inputs also keep feature blocks to 32.
    """
    if cfg.block_f > shape.m_pad:
        return False
    rows = cfg.block_m if kernel in _ROW_BLOCK else BLOCK_ROWS
    if shape.causal and kernel in _ROW_BLOCK:
        if CHUNK % cfg.block_m or cfg.block_f > 32:
            return False
        rows += CHUNK
    if shape.fp32 and cfg.block_f > (16 if kernel == "state" else 32):
        return False
    budget = 512 if shape.fp32 else 1024
    return rows * max(shape.d_pad, shape.dv_pad) // cfg.num_warps <= budget


def kept_configs(kernel: str, shape: LaunchShape) -> list[KernelConfig]:
    """The configs of ``kernel`` that :func:`keep` accepts, in list order (never empty)."""
    kept = [c for c in CONFIGS[kernel] if keep(kernel, c, shape)]
    if not kept:  # the narrowest config (most warps), its feature block clipped to m_pad
        narrow = min(CONFIGS[kernel], key=lambda c: (c.block_m, c.block_f, -c.num_warps))
        kept = [replace(narrow, block_f=min(narrow.block_f, shape.m_pad))]
    return kept


def autotune_cap() -> int | None:
    """At most this many configs are autotuned per kernel (``ATTN_TRITON_AUTOTUNE_MAX``; None: all).

    Each tried config is one compilation: a benchmark run on a time budget caps them (the first
    kept configs are the ones the ``ptxas`` calibration prefers)."""
    text = os.environ.get(AUTOTUNE_ENV, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


_AUTOTUNED: dict[tuple, object] = {}
# Autotuning keys (those among a kernel's arguments): the padded sizes. The flags are constexprs
# fixed per call site, and each call site gets its own autotuner (the cache key below).
_TUNE_KEYS = ("D_PAD", "DV_PAD", "M_PAD")


def _params(kernel_name: str, cfg: KernelConfig) -> dict[str, int]:
    """The constexprs ``cfg`` sets: ``BLOCK_F`` and the row block where the kernel takes one."""
    row = _ROW_BLOCK.get(kernel_name)
    return {"BLOCK_F": cfg.block_f, **({row: cfg.block_m} if row else {})}


def autotuner(kernel_name: str, fn, kept: list[KernelConfig], flags: dict[str, object]):
    """``triton.autotune`` over the ``kept`` configs of ``fn``, one per (config set, constexpr flags)."""
    cache_key = (kernel_name, tuple(kept), tuple(sorted((k, str(v)) for k, v in flags.items())))
    tuned = _AUTOTUNED.get(cache_key)
    if tuned is None:
        configs = [triton.Config(_params(kernel_name, c), num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]
        keys = [k for k in _TUNE_KEYS if k in fn.arg_names]
        tuned = _AUTOTUNED[cache_key] = triton.autotune(configs=configs, key=keys)(fn)
    return tuned


def _launch(kernel_name: str, fn, grid_fn, args: tuple, shape: LaunchShape, **constexprs) -> None:
    """Launch ``fn`` with the kept configs of ``kernel_name``; ``grid_fn(block_m, block_f)`` gives the grid.

    Under the interpreter (and when one config is kept) the first kept config runs directly;
    on GPU the kept configs are autotuned (every kernel only stores, so re-running is safe).
    """
    kept = kept_configs(kernel_name, shape)[: autotune_cap()]
    if interpreter_enabled() or len(kept) == 1:
        cfg = kept[0]
        grid = grid_fn(cfg.block_m, cfg.block_f)
        fn[grid](*args, **constexprs, **_params(kernel_name, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    row = _ROW_BLOCK.get(kernel_name)
    tuned = autotuner(kernel_name, fn, kept, constexprs)
    grid = lambda meta: grid_fn(meta[row] if row else BLOCK_ROWS, meta["BLOCK_F"])
    tuned[grid](*args, **constexprs)  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the FAVOR+ kernels cannot run ``variant`` for this device, dtype and head dim, or None."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton FAVOR+ kernels support float16, bfloat16 and float32, not {dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"the Triton FAVOR+ kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    m = getattr(variant, "num_features", None)
    if m is not None and m > MAX_FEATURES:
        return f"the Triton FAVOR+ kernels support up to {MAX_FEATURES} random features, got {m}"
    kernel = getattr(variant, "kernel", "softmax")
    if kernel not in ("softmax", "relu"):
        return f"the Triton FAVOR+ kernels implement kernel='softmax' and 'relu', not {kernel!r}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "the Triton FAVOR+ kernels need compute capability 8.0 or newer (TF32 tensor cores)"
    return None


@dataclass(frozen=True)
class FavorOptions:
    """Non-tensor options of one FAVOR+ call, passed to the autograd function as one object."""

    causal: bool
    scale: float
    kernel: str
    m: int  # number of random features

    @property
    def half_s2(self) -> float:
        """``s^2 / 2`` with ``s = scale ** 0.5``: the factor of ``|x|^2`` in the logits."""
        return 0.5 * self.scale


@dataclass(frozen=True)
class _Geometry:
    b: int
    h: int
    hk: int
    nq: int
    nk: int
    d: int
    dv: int
    m_pad: int
    d_pad: int
    dv_pad: int
    fp32: bool

    @property
    def groups(self) -> int:
        return self.h // self.hk

    @property
    def off(self) -> int:
        return self.nk - self.nq

    def shape(self, causal: bool) -> LaunchShape:
        return LaunchShape(self.m_pad, self.d_pad, self.dv_pad, causal, self.fp32)


def _pad_pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# Terms of the split projection per input dtype (0: float32 and three-TF32 products). Two bfloat16
# terms carry 16 bits of Ws: a logit error near 1e-4, far below bfloat16's own rounding.
N_SPLIT = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 2}


def _precisions(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs fixing the product precisions for inputs of ``dtype`` (see the module docstring)."""
    return {"N_SPLIT": N_SPLIT[dtype], "DOT_PREC": "tf32x3" if dtype == torch.float32 else "tf32"}


def _prepare_projection(w: Tensor, dtype: torch.dtype, opts: FavorOptions, geo: _Geometry) -> tuple[Tensor, Tensor]:
    """``Ws = W * scale ** 0.5`` zero-padded to ``(M_PAD, D_PAD)`` (float32, for the backward), and
    ``Ws^T`` as the kernels' projection operand: ``(N_SPLIT, D_PAD, M_PAD)`` terms in ``dtype``
    that add up to ``Ws^T`` (float32 inputs: one float32 term).
    """
    ws = torch.zeros(geo.m_pad, geo.d_pad, device=w.device, dtype=torch.float64)
    ws[: w.shape[0], : w.shape[1]] = w.to(torch.float64) * math.sqrt(opts.scale)
    rest = ws.t().contiguous()
    n_split = N_SPLIT[dtype]
    if n_split == 0:
        return ws.float(), rest.float()[None].contiguous()
    terms = []
    for _ in range(n_split):
        terms.append(rest.to(dtype))
        rest = rest - terms[-1].double()
    return ws.float(), torch.stack(terms).contiguous()


def _key_stabiliser(k: Tensor, wt: Tensor, opts: FavorOptions, geo: _Geometry) -> Tensor:
    """``c`` per (batch, key head): the maximum key logit over all keys and features, float32."""
    bhk = geo.b * geo.hk
    if opts.kernel != "softmax":
        return torch.zeros(bhk, device=k.device, dtype=torch.float32)
    n_blocks = triton.cdiv(geo.nk, BLOCK_ROWS)
    part = torch.empty(bhk, n_blocks, device=k.device, dtype=torch.float32)
    _launch(
        "key_max",
        _key_max_kernel,
        lambda bm, bf: (n_blocks, bhk),
        (k, wt, part, geo.nk, geo.d, opts.m, opts.half_s2, n_blocks),
        geo.shape(opts.causal),
        D_PAD=geo.d_pad,
        M_PAD=geo.m_pad,
        BLOCK_N=BLOCK_ROWS,
        N_SPLIT=N_SPLIT[k.dtype],
    )
    return part.amax(dim=1)


@dataclass(frozen=True)
class _Slots:
    """Where per-segment states live: ``n`` slots per head; segment/chunk ``t`` uses ``first + step * t``."""

    n: int
    first: int = 0
    step: int = 1

    def args(self) -> tuple[int, int, int]:
        return (self.n, self.first, self.step)


_TOTAL = _Slots(1, 0, 0)  # one total state per head


def _segment_sums(
    x: Tensor,
    y: Tensor,
    stab: Tensor,
    wgt: Tensor | None,
    wt: Tensor,
    opts: FavorOptions,
    geo: _Geometry,
    *,
    n_rows: int,
    off: int,
    seg: int,
    n_seg: int,
    slots: _Slots,
    stab_mode: int,
) -> tuple[Tensor, Tensor]:
    """Per segment of ``seg`` positions: ``S (BH, slots.n, M_PAD, DV_PAD)``, ``z (BH, slots.n, M_PAD)``.

    Slots that no segment writes are left for the caller to fill.
    """
    bh = x.shape[0] * x.shape[1]
    s = torch.empty(bh, slots.n, geo.m_pad, geo.dv_pad, device=x.device, dtype=torch.float32)
    z = torch.empty(bh, slots.n, geo.m_pad, device=x.device, dtype=torch.float32)
    _launch(
        "state",
        _state_kernel,
        lambda bm, bf: (geo.m_pad // bf, n_seg, bh),
        (
            x,
            y,
            stab,
            x if wgt is None else wgt,
            wt,
            s,
            z,
            n_rows,
            off,
            seg,
            geo.d,
            y.shape[-1],
            opts.m,
            opts.half_s2,
            *slots.args(),
        ),
        geo.shape(opts.causal),
        D_PAD=geo.d_pad,
        DV_PAD=geo.dv_pad,
        M_PAD=geo.m_pad,
        BLOCK_N=CHUNK if opts.causal else BLOCK_ROWS,
        KERNEL=opts.kernel,
        STAB=stab_mode,
        HAS_WEIGHT=wgt is not None,
        **_precisions(x.dtype),
    )
    return s, z


def _n_splits(n: int, programs: int, device: torch.device) -> int:
    """Splits of N for the non-causal state pass: enough programs to fill the GPU."""
    blocks = triton.cdiv(n, BLOCK_ROWS)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(2 * sms, max(programs, 1))))


def _split_segments(n: int, programs: int, device: torch.device) -> tuple[int, int]:
    """``(seg, n_seg)``: N cut into whole row blocks for the non-causal state pass."""
    splits = _n_splits(n, programs, device)
    seg = BLOCK_ROWS * triton.cdiv(triton.cdiv(n, BLOCK_ROWS), splits)
    return seg, triton.cdiv(n, seg)


def _key_states(k: Tensor, v: Tensor, wt: Tensor, kstab: Tensor, opts: FavorOptions, geo: _Geometry):
    """Key states of the query pass: ``(S, z, slots)``, one total (non-causal) or, causal, the
    exclusive prefix of chunk ``t`` in slot ``t``.

    Causal, without a copy: chunk ``t`` writes its local state to slot ``t + 1``, slot 0 is
    zero, and an in-place cumulative sum over the slots leaves the exclusive prefixes.
    """
    if opts.causal:
        n_seg = triton.cdiv(geo.nk, CHUNK)
        s, z = _segment_sums(
            k, v, kstab, None, wt, opts, geo, n_rows=geo.nk, off=0, seg=CHUNK, n_seg=n_seg,
            slots=_Slots(n_seg + 1, 1, 1), stab_mode=1,
        )  # fmt: skip
        s[:, 0], z[:, 0] = 0.0, 0.0
        return s.cumsum_(dim=1), z.cumsum_(dim=1), _Slots(n_seg + 1, 0, 1)
    seg, n_seg = _split_segments(geo.nk, geo.b * geo.hk * (geo.m_pad // 32), k.device)
    s, z = _segment_sums(
        k, v, kstab, None, wt, opts, geo, n_rows=geo.nk, off=0, seg=seg, n_seg=n_seg, slots=_Slots(n_seg), stab_mode=1
    )
    return s.sum(dim=1).contiguous(), z.sum(dim=1).contiguous(), _TOTAL


def _query_states(q, dout, lse, delta, wt, opts: FavorOptions, geo: _Geometry):
    """Query-side states of the backward, per key head (summed over its query heads).

    ``R = sum_i psi_i dO_i^T``, ``r = sum_i psi_i delta_i``: one total (non-causal) or, causal,
    the exclusive suffix over the chunks after ``t``. Causal: chunk ``t`` writes slot
    ``NT - t`` (reversed), slot 0 is zero, and after an in-place cumulative sum slot ``NT - 1 - t``
    holds the sum over chunks ``> t``.
    """
    b, hk, g = geo.b, geo.hk, geo.groups
    if opts.causal:
        n_seg = triton.cdiv(geo.nk, CHUNK)
        slots = _Slots(n_seg + 1, n_seg, -1)
        r, rz = _segment_sums(
            q, dout, lse, delta, wt, opts, geo, n_rows=geo.nq, off=geo.off, seg=CHUNK, n_seg=n_seg,
            slots=slots, stab_mode=2,
        )  # fmt: skip
        r[:, 0], rz[:, 0] = 0.0, 0.0
        if g > 1:
            r = r.view(b * hk, g, *r.shape[1:]).sum(dim=1)
            rz = rz.view(b * hk, g, *rz.shape[1:]).sum(dim=1)
        return r.cumsum_(dim=1), rz.cumsum_(dim=1), _Slots(n_seg + 1, n_seg - 1, -1)
    seg, n_seg = _split_segments(geo.nq, geo.b * geo.h * (geo.m_pad // 32), q.device)
    r, rz = _segment_sums(
        q, dout, lse, delta, wt, opts, geo, n_rows=geo.nq, off=0, seg=seg, n_seg=n_seg, slots=_Slots(n_seg),
        stab_mode=2,
    )  # fmt: skip
    r = r.view(b * hk, g * n_seg, geo.m_pad, geo.dv_pad).sum(dim=1).contiguous()
    rz = rz.view(b * hk, g * n_seg, geo.m_pad).sum(dim=1).contiguous()
    return r, rz, _TOTAL


def _first_chunk(opts: FavorOptions, geo: _Geometry) -> int:
    """Chunk ``T0`` of the first query position (floor: negative when Nq > Nk, whose leading
    queries see no key); 0 when not causal."""
    return geo.off // CHUNK if opts.causal else 0


def _query_grid(opts: FavorOptions, geo: _Geometry):
    """``grid_fn(block_m, block_f)`` of the query-block kernels (``fwd``, ``bwd_dq``)."""
    bh = geo.b * geo.h
    if opts.causal:
        n_chunks = triton.cdiv(geo.nk, CHUNK) - _first_chunk(opts, geo)
        return lambda bm, bf: (n_chunks * (CHUNK // bm), bh)
    return lambda bm, bf: (triton.cdiv(geo.nq, bm), bh)


def _forward(q: Tensor, k: Tensor, v: Tensor, w: Tensor, opts: FavorOptions, geo: _Geometry):
    ws, wt = _prepare_projection(w, q.dtype, opts, geo)
    kstab = _key_stabiliser(k, wt, opts, geo)
    s, z, slots = _key_states(k, v, wt, kstab, opts, geo)
    out = torch.empty(geo.b, geo.h, geo.nq, geo.dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(geo.b, geo.h, geo.nq, device=q.device, dtype=torch.float32)
    t0 = _first_chunk(opts, geo)
    _launch(
        "fwd",
        _fwd_kernel,
        _query_grid(opts, geo),
        (
            q,
            k,
            v,
            wt,
            s,
            z,
            kstab,
            out,
            lse,
            geo.nq,
            geo.nk,
            geo.off,
            t0,
            *slots.args(),
            geo.d,
            geo.dv,
            opts.m,
            opts.half_s2,
            geo.groups,
        ),
        geo.shape(opts.causal),
        D_PAD=geo.d_pad,
        DV_PAD=geo.dv_pad,
        M_PAD=geo.m_pad,
        CHUNK=CHUNK,
        CAUSAL=opts.causal,
        KERNEL=opts.kernel,
        **_precisions(q.dtype),
    )
    return out, lse, kstab, ws, wt, (s, z) if not opts.causal else None


def _backward(q, k, v, out, dout, lse, kstab, ws, wt, saved_state, opts: FavorOptions, geo: _Geometry):
    delta = (dout.float() * out.float()).sum(dim=-1)
    if saved_state is not None:
        s, z, slots = *saved_state, _TOTAL
    else:
        s, z, slots = _key_states(k, v, wt, kstab, opts, geo)
    dq = torch.empty_like(q)
    t0 = _first_chunk(opts, geo)
    common = {
        "D_PAD": geo.d_pad,
        "DV_PAD": geo.dv_pad,
        "M_PAD": geo.m_pad,
        "CHUNK": CHUNK,
        "CAUSAL": opts.causal,
        "KERNEL": opts.kernel,
        **_precisions(q.dtype),
    }
    _launch(
        "bwd_dq",
        _bwd_dq_kernel,
        _query_grid(opts, geo),
        (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            wt,
            ws,
            s,
            z,
            kstab,
            dq,
            geo.nq,
            geo.nk,
            geo.off,
            t0,
            *slots.args(),
            geo.d,
            geo.dv,
            opts.m,
            opts.half_s2,
            geo.groups,
        ),
        geo.shape(opts.causal),
        **common,
    )
    r, rz, slots = _query_states(q, dout, lse, delta, wt, opts, geo)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _launch(
        "bwd_dkv",
        _bwd_dkv_kernel,
        lambda bm, bf: (triton.cdiv(geo.nk, bm), geo.b * geo.hk),
        (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            wt,
            ws,
            r,
            rz,
            kstab,
            dk,
            dv,
            geo.nq,
            geo.nk,
            geo.off,
            *slots.args(),
            geo.d,
            geo.dv,
            opts.m,
            opts.half_s2,
            geo.groups,
        ),
        geo.shape(opts.causal),
        **common,
    )
    return dq, dk, dv


class _FavorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, w: Tensor, opts: FavorOptions) -> Tensor:  # type: ignore[override]
        geo = _geometry(q, k, v, opts)
        out, lse, kstab, ws, wt, state = _forward(q, k, v, w, opts, geo)
        ctx.opts, ctx.geo = opts, geo
        ctx.save_for_backward(q, k, v, out, lse, kstab, ws, wt, *(state or ()))
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse, kstab, ws, wt, *state = ctx.saved_tensors
        dq, dk, dv = _backward(
            q, k, v, out, dout.contiguous(), lse, kstab, ws, wt, tuple(state) or None, ctx.opts, ctx.geo
        )
        return dq, dk, dv, None, None


def _geometry(q: Tensor, k: Tensor, v: Tensor, opts: FavorOptions) -> _Geometry:
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    fp32 = q.dtype == torch.float32
    return _Geometry(b, h, hk, nq, nk, d, dv, _pad_pow2(opts.m), _pad_pow2(d), _pad_pow2(dv), fp32)


def favor_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, causal: bool, scale: float, kernel: str) -> Tensor:
    """Fused FAVOR+ attention, differentiable in ``q``, ``k``, ``v``.

    ``q (B, H, Nq, D)``, ``k (B, Hk, Nk, D)``, ``v (B, Hk, Nk, Dv)`` with ``H % Hk == 0``, in
    float16, bfloat16 or float32 on one device; ``w (m, D)`` the float32 projection (no gradient).
    Returns ``(B, H, Nq, Dv)`` in the dtype of ``q``. Causal is bottom-right aligned; rows that see
    no key are zero. Inputs are assumed valid (the public API validates them).
    """
    opts = FavorOptions(causal=causal, scale=float(scale), kernel=kernel, m=int(w.shape[0]))
    return _FavorFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), w.detach(), opts)
