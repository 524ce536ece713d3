"""The Triton kernels of the chunked FAVOR+ attention (launched by :mod:`attn_kernels.favor_chunk`,
whose docstring gives the algorithm, the frames of the shifted features and the buffers).

Conventions shared by every kernel here:

- Logits are in base 2 (``log2(e)`` is folded into the projection on the host) and the features
  are ``exp2(logit - shift)`` (``kernel="softmax"``) or ``relu(logit) + 1e-3`` (``"relu"``, no
  shift; ``SOFTMAX`` is False).
- Features and states are stored in ``FEAT``, the element type of the feature buffer: the
  input's 16-bit dtype, or float32 (the accuracy path). Products of features take ``FEAT``
  operands and accumulate in float32 (:func:`_dot`; float32 operands use ``tf32x3``).
- Shifts are whole numbers (``ceil`` of a maximum), so moving a value from one shift to
  another multiplies it by a power of two: exact in every float format unless it underflows.
- ``_NO_KEY`` is the shift of a feature that no real key has reached yet: a finite number, so
  shift differences never meet ``inf - inf``.
- Rows (keys, queries) are addressed by position ``p``; a query row is ``i = p - OFF`` (bottom-right
  causal alignment), ``CHUNK`` positions make a chunk.
- Per-feature float32 vectors come in pairs, ``(rows, 2, M_PAD)``: the chunk statistics ``cs`` of
  the key features (0: the chunk's shift ``c``, 1: the sum of its features) and the statistics
  ``st`` of a state (0: the normaliser sums ``z``, 1: the frame ``F``; :func:`_stat`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import loop_range as _range

_NO_KEY = tl.constexpr(-1.0e30)
_RELU_EPS = tl.constexpr(1e-3)  # attention_variants.performer.RELU_EPS

# ---------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, FP32: tl.constexpr):
    """``acc + a @ b`` in float32: 16-bit operands on tensor cores, float32 ones as ``tf32x3``."""
    if FP32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _load_rows(ptr, rows, row_ok, cols, NCOLS: tl.constexpr):
    """``(R, C)`` block of a contiguous ``(.., rows, NCOLS)`` matrix at ``ptr``; 0 outside."""
    mask = row_ok[:, None] & (cols[None, :] < NCOLS)
    return tl.load(ptr + rows[:, None].to(tl.int64) * NCOLS + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _project(x, wt_ptr, f0, D_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_F: tl.constexpr, N_SPLIT: tl.constexpr):
    """``x @ Wt[:, f0:f0+BLOCK_F]``: ``(R, BLOCK_F)`` float32 logits of the rows ``x (R, D_PAD)``.

    ``wt_ptr``: ``(max(N_SPLIT, 1), D_PAD, M_PAD)`` terms adding up to ``Wt``, in the input dtype
    (``N_SPLIT`` products) or, ``N_SPLIT == 0``, one float32 term (one ``tf32x3`` product).
    """
    offs = tl.arange(0, D_PAD)[:, None] * M_PAD + (f0 + tl.arange(0, BLOCK_F))[None, :]
    if N_SPLIT == 0:
        u = tl.dot(x.to(tl.float32), tl.load(wt_ptr + offs), input_precision="tf32x3")
    else:
        u = tl.dot(x, tl.load(wt_ptr + offs))
        for i in tl.static_range(1, N_SPLIT):
            u = tl.dot(x, tl.load(wt_ptr + i * D_PAD * M_PAD + offs), acc=u)
    return u


@triton.jit
def _stat(ptr, row, WHICH: tl.constexpr, offs, M_PAD: tl.constexpr):
    """Entry ``WHICH`` (0 or 1) of row ``row`` of a ``(rows, 2, M_PAD)`` float32 statistics array."""
    return tl.load(ptr + (row * 2 + WHICH) * M_PAD + offs)


@triton.jit
def _put_stat(ptr, row, WHICH: tl.constexpr, offs, value, M_PAD: tl.constexpr):
    tl.store(ptr + (row * 2 + WHICH) * M_PAD + offs, value)


@triton.jit
def _real_keys(kpm_ptr, bhk, HK, NK, rows, row_ok, HAS_PAD: tl.constexpr):
    """``row_ok`` less the padded keys of key head ``bhk`` (``kpm_ptr``: int8 ``(B, NK)``, 1 = real)."""
    if HAS_PAD:
        flag = tl.load(kpm_ptr + (bhk // HK).to(tl.int64) * NK + rows, mask=row_ok, other=0)
        row_ok = row_ok & (flag != 0)
    return row_ok


# ---------------------------------------------------------------------------------------------
# Key features (forward and backward)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _key_features_kernel(
    k_ptr,
    wt_ptr,
    phi_ptr,
    cs_ptr,
    kpm_ptr,
    NK,
    NT,
    HK,
    half2,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr,
    N_SPLIT: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Features of one chunk of keys, each key projected once: ``phi (BHk, NT*CHUNK, M_PAD)``, and
    the chunk statistics ``cs (BHk, NT, 2, M_PAD)``: the shift and the sum of the stored features
    over the chunk (which the state kernel adds up instead of reducing the features itself).

    Softmax: the chunk's own shift per feature, ``c[t, f] = ceil(max_j logit[j, f])`` over its real
    keys (``_NO_KEY`` where it has none), so every feature column peaks in ``(1/2, 1]``; relu: no
    shift (0). Padded keys, keys past ``NK`` and features past ``M`` get 0.
    """
    t = tl.program_id(0)
    bhk = tl.program_id(1)
    rows = t * CHUNK + tl.arange(0, CHUNK)
    ok = _real_keys(kpm_ptr, bhk, HK, NK, rows, rows < NK, HAS_PAD=HAS_PAD)
    offs_d = tl.arange(0, D_PAD)
    x = _load_rows(k_ptr + bhk.to(tl.int64) * NK * D, rows, ok, offs_d, D)
    if SOFTMAX:
        xf = x.to(tl.float32)
        xsq = tl.sum(xf * xf, 1) * half2
    chunk = bhk.to(tl.int64) * NT + t
    phi_base = phi_ptr + chunk * CHUNK * M_PAD
    for f0 in range(0, M_PAD, BLOCK_F):
        u = _project(x, wt_ptr, f0, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
        offs_f = f0 + tl.arange(0, BLOCK_F)
        keep = ok[:, None] & (offs_f[None, :] < M)
        if SOFTMAX:
            lg = tl.where(keep, u - xsq[:, None], float("-inf"))
            c = tl.maximum(tl.ceil(tl.max(lg, 0)), _NO_KEY)
            phi = tl.exp2(lg - c[None, :])
        else:
            phi = tl.where(keep, tl.maximum(u, 0.0) + _RELU_EPS, 0.0)
            c = tl.zeros([BLOCK_F], tl.float32)
        phi = phi.to(phi_ptr.dtype.element_ty)
        tl.store(phi_base + tl.arange(0, CHUNK)[:, None] * M_PAD + offs_f[None, :], phi)
        _put_stat(cs_ptr, chunk, 0, offs_f, c, M_PAD)
        _put_stat(cs_ptr, chunk, 1, offs_f, tl.sum(phi.to(tl.float32), 0), M_PAD)


# ---------------------------------------------------------------------------------------------
# States: phi^T [Y] over chunks (keys forward, query side backward)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _state_kernel(
    x_ptr,
    stats_ptr,
    y_ptr,
    w_ptr,
    h_ptr,
    st_ptr,
    NY,
    OFF,
    NT,
    T_SPLIT,
    N_SPLIT_T,
    G,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    KEYS: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr,
    FP32: tl.constexpr,
):
    """``h = sum_p x[p]^T y[p - OFF]`` (``BLOCK_K x BLOCK_V`` in float32 registers) and
    ``z = sum_p x[p] w[p]`` over chunks of positions, for one block of features and values.

    ``KEYS``: ``x`` the key features, ``y = V``, ``w = 1``; ``stats_ptr``: their chunk statistics
    (shifts, and the feature sums that make ``z``). The state keeps the running maximum of the
    shifts as its frame ``F`` (``h`` rescaled when it rises, each chunk's features brought down
    to it). Otherwise ``x = psi`` of the ``G`` query heads of the key head, ``y = dO``, ``w =
    delta`` (by position, ``w_ptr``); ``stats_ptr``: the key states' statistics, whose frame
    ``F_t`` the queries of chunk ``t`` are in; causal, chunks run backwards and the state follows
    the frames down.

    ``CAUSAL``: chunk ``t`` stores the state of the chunks before it (keys) or after it (queries)
    in slot ``t`` (``h`` in ``FEAT``, statistics ``st`` in float32: ``z`` and, keys, ``F``). Not
    causal: split ``s`` of ``N_SPLIT_T`` adds up chunks ``[s T_SPLIT, (s+1) T_SPLIT)`` and stores
    float32 partial sums in slot ``s`` for :func:`_combine_kernel`.
    """
    kb = tl.program_id(0)
    vb = tl.program_id(1)
    pid = tl.program_id(2)
    bhk = pid // N_SPLIT_T
    sp = pid % N_SPLIT_T
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_t = tl.arange(0, CHUNK)
    h = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    z = tl.zeros([BLOCK_K], tl.float32)
    fr = tl.full([BLOCK_K], _NO_KEY, tl.float32)
    t_lo = sp * T_SPLIT
    n_t = tl.minimum(NT - t_lo, T_SPLIT)
    reverse = (not KEYS) and CAUSAL
    frames = SOFTMAX and CAUSAL and (not KEYS)
    for it in _range(0, n_t):
        t = t_lo + it
        if reverse:
            t = NT - 1 - it
        chunk = bhk.to(tl.int64) * NT + t
        if KEYS and SOFTMAX:  # the running frame: F = max(F, c_t)
            c = _stat(stats_ptr, chunk, 0, offs_k, M_PAD)
            f_new = tl.maximum(fr, c)
            alpha = tl.exp2(fr - f_new)
            h = h * alpha[:, None]
            z = z * alpha
            fr = f_new
            scale = tl.exp2(c - f_new)
        if frames:  # the key chunk's frame, falling as t falls
            f_new = _stat(stats_ptr, chunk, 1, offs_k, M_PAD)
            alpha = tl.exp2(f_new - tl.maximum(fr, f_new))
            h = h * alpha[:, None]
            z = z * alpha
            fr = f_new
        if CAUSAL:
            h_off = (chunk * M_PAD + offs_k[:, None]) * DV_PAD + offs_v[None, :]
            tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty))
            if vb == 0:
                _put_stat(st_ptr, chunk, 0, offs_k, z, M_PAD)
                _put_stat(st_ptr, chunk, 1, offs_k, fr, M_PAD)
        pos = t * CHUNK + offs_t
        rows = pos - OFF
        ok = (rows >= 0) & (rows < NY)
        for g in _range(0, G):
            bx = (bhk * G + g).to(tl.int64)
            xs = tl.load(
                x_ptr + (bx * NT * CHUNK + pos[None, :]) * M_PAD + offs_k[:, None], mask=ok[None, :], other=0.0
            )
            ys = _load_rows(y_ptr + bx * NY * DV, rows, ok, offs_v, DV).to(xs.dtype)
            if KEYS:
                zc = _stat(stats_ptr, chunk, 1, offs_k, M_PAD)
            if KEYS and SOFTMAX:
                h += _dot(xs, ys, tl.zeros([BLOCK_K, BLOCK_V], tl.float32), FP32) * scale[:, None]
                z += zc * scale
            else:
                h = _dot(xs, ys, h, FP32)
                if KEYS:
                    z += zc
                else:
                    wgt = tl.load(w_ptr + bx * NT * CHUNK + pos, mask=ok, other=0.0)
                    z += tl.sum(xs.to(tl.float32) * wgt[None, :], 1)
    if not CAUSAL:
        slot = bhk.to(tl.int64) * N_SPLIT_T + sp
        tl.store(h_ptr + (slot * M_PAD + offs_k[:, None]) * DV_PAD + offs_v[None, :], h)
        if vb == 0:
            _put_stat(st_ptr, slot, 0, offs_k, z, M_PAD)
            _put_stat(st_ptr, slot, 1, offs_k, fr, M_PAD)


@triton.jit
def _combine_kernel(
    hp_ptr,
    pst_ptr,
    h_ptr,
    st_ptr,
    N_SPLIT_T,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """The non-causal total of the partial states of :func:`_state_kernel` (``hp`` and the partial
    statistics ``pst``): ``h`` in ``FEAT``, and its statistics: ``z`` and (``SHIFT``: key states)
    the frame ``F = max_s F_s``."""
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, DV_PAD)
    base = bhk.to(tl.int64) * N_SPLIT_T
    fr = tl.full([BLOCK_K], _NO_KEY, tl.float32)
    if SHIFT:
        for s in _range(0, N_SPLIT_T):
            fr = tl.maximum(fr, _stat(pst_ptr, base + s, 1, offs_k, M_PAD))
    h = tl.zeros([BLOCK_K, DV_PAD], tl.float32)
    z = tl.zeros([BLOCK_K], tl.float32)
    for s in _range(0, N_SPLIT_T):
        hs = tl.load(hp_ptr + ((base + s) * M_PAD + offs_k[:, None]) * DV_PAD + offs_v[None, :])
        zs = _stat(pst_ptr, base + s, 0, offs_k, M_PAD)
        if SHIFT:
            alpha = tl.exp2(_stat(pst_ptr, base + s, 1, offs_k, M_PAD) - fr)
            hs = hs * alpha[:, None]
            zs = zs * alpha
        h += hs
        z += zs
    out = bhk.to(tl.int64) * M_PAD + offs_k
    tl.store(h_ptr + out[:, None] * DV_PAD + offs_v[None, :], h.to(h_ptr.dtype.element_ty))
    _put_stat(st_ptr, bhk.to(tl.int64), 0, offs_k, z, M_PAD)
    _put_stat(st_ptr, bhk.to(tl.int64), 1, offs_k, fr, M_PAD)


# ---------------------------------------------------------------------------------------------
# Forward: the output of a block of queries
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    q_ptr,
    wt_ptr,
    phi_ptr,
    cs_ptr,
    h_ptr,
    st_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    NQ,
    NK,
    OFF,
    T0,
    NT,
    G,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    N_SPLIT: tl.constexpr,
    SOFTMAX: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32: tl.constexpr,
):
    """``out = (phi(q) h + tril(phi(q) phi(K_t)^T) V_t) / (phi(q) z + rowsum(tril(...)))`` for one
    block of queries, each query projected once; ``lse = log2`` of the normaliser with the query
    shift added (``+inf`` for a row that sees no key).

    Causal: block ``pid`` is chunk ``t = pid + T0`` of positions (``BLOCK_M == CHUNK``; ``t < 0``
    only when ``NQ > NK``: rows that see no key), its state is slot ``t`` (keys of the chunks
    before it, frame ``F_t``) and its own key chunk enters under the mask ``j <= p``. Not causal:
    ``BLOCK_M`` rows and the one total state. The query shift is the row maximum of
    ``logit + F``, tracked online across feature blocks; the diagonal chunk's features, stored in
    their chunk's own shift, are matched by scaling the query side by ``exp2(c_t - F_t)``.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    bhk = bh // G
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    if CAUSAL:
        t = pid + T0
        pos = t * CHUNK + tl.arange(0, BLOCK_M)
        slot = bhk.to(tl.int64) * NT + tl.maximum(t, 0)
        rows = pos - OFF
    else:
        pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = bhk.to(tl.int64)
        rows = pos
    q_ok = (rows >= 0) & (rows < NQ)
    qx = _load_rows(q_ptr + bh.to(tl.int64) * NQ * D, rows, q_ok, offs_d, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    if CAUSAL:
        kpos = t * CHUNK + tl.arange(0, CHUNK)
        k_in = (kpos >= 0) & (kpos < NK)
        att = tl.zeros([BLOCK_M, CHUNK], tl.float32)
    for f0 in range(0, M_PAD, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        u = _project(qx, wt_ptr, f0, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
        if SOFTMAX:
            fr = _stat(st_ptr, slot, 1, offs_f, M_PAD)
            lg = tl.where((offs_f < M)[None, :], u + fr[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(lg, 1))
            alpha = tl.exp2(m_i - m_new)
            pq = tl.exp2(lg - m_new[:, None])
            m_i = m_new
            acc = acc * alpha[:, None]
            den = den * alpha
            if CAUSAL:
                att = att * alpha[:, None]
        else:
            pq = tl.where((offs_f < M)[None, :], tl.maximum(u, 0.0) + _RELU_EPS, 0.0)
        p1 = pq.to(h_ptr.dtype.element_ty)
        hb = tl.load(h_ptr + (slot * M_PAD + offs_f[:, None]) * DV_PAD + offs_v[None, :])
        acc = _dot(p1, hb, acc, FP32)
        den += tl.sum(p1.to(tl.float32) * _stat(st_ptr, slot, 0, offs_f, M_PAD)[None, :], 1)
        if CAUSAL:
            if SOFTMAX:
                cl = _stat(cs_ptr, slot, 0, offs_f, M_PAD)
                p2 = (pq * tl.exp2(cl - fr)[None, :]).to(h_ptr.dtype.element_ty)
            else:
                p2 = p1
            kf = tl.load(
                phi_ptr + (bhk.to(tl.int64) * NT * CHUNK + kpos[None, :]) * M_PAD + offs_f[:, None],
                mask=k_in[None, :],
                other=0.0,
            )
            att = _dot(p2, kf, att, FP32)
    if CAUSAL:
        vis = (kpos[None, :] <= pos[:, None]) & k_in[None, :]
        pa = tl.where(vis, att, 0.0).to(h_ptr.dtype.element_ty)
        den += tl.sum(pa.to(tl.float32), 1)
        vx = _load_rows(v_ptr + bhk.to(tl.int64) * NK * DV, kpos, k_in, offs_v, DV).to(pa.dtype)
        acc = _dot(pa, vx, acc, FP32)
    has_key = den > 0.0
    out = acc / tl.where(has_key, den, 1.0)[:, None]
    lse = tl.log2(tl.where(has_key, den, 1.0))
    if SOFTMAX:
        lse += m_i
    lse = tl.where(has_key, lse, float("inf"))
    o_mask = q_ok[:, None] & (offs_v[None, :] < DV)
    o_off = (bh.to(tl.int64) * NQ + rows[:, None]) * DV + offs_v[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptr + bh.to(tl.int64) * NQ + rows, lse, mask=q_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_kernel(
    q_ptr,
    do_ptr,
    o_ptr,
    lse_ptr,
    wt_ptr,
    w_ptr,
    phi_ptr,
    cs_ptr,
    h_ptr,
    st_ptr,
    v_ptr,
    dq_ptr,
    psi_ptr,
    delta_ptr,
    NQ,
    NK,
    OFF,
    T0,
    NT,
    NPOS,
    G,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    N_SPLIT: tl.constexpr,
    SOFTMAX: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32: tl.constexpr,
):
    """``dQ`` of one block of queries (the blocking of :func:`_fwd_kernel`), each query projected once.

    With ``psi_i = phi(q_i) / den_i`` from the saved ``lse`` (in the frame of the block's state) and
    ``delta_i = dO_i . O_i``::

        dphi_i = h dO_i - delta_i z + sum_j [j <= p_i] (dO_i . v_j - delta_i) phi(k_j)
        dQ_i   = (psi_i * dphi_i) Ws                       (softmax; relu: [logit > 0] dphi_i / den_i)

    Also stores ``psi`` (in ``FEAT``) and ``delta`` by position (``NPOS`` per head; rows without a
    query get 0) for the key side.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    bhk = bh // G
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    if CAUSAL:
        t = pid + T0
        pos = t * CHUNK + tl.arange(0, BLOCK_M)
        slot = bhk.to(tl.int64) * NT + tl.maximum(t, 0)
        rows = pos - OFF
    else:
        pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = bhk.to(tl.int64)
        rows = pos
    q_ok = (rows >= 0) & (rows < NQ)
    qx = _load_rows(q_ptr + bh.to(tl.int64) * NQ * D, rows, q_ok, offs_d, D)
    dox = _load_rows(do_ptr + bh.to(tl.int64) * NQ * DV, rows, q_ok, offs_v, DV)
    ox = _load_rows(o_ptr + bh.to(tl.int64) * NQ * DV, rows, q_ok, offs_v, DV)
    delta = tl.sum(dox.to(tl.float32) * ox.to(tl.float32), 1)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * NQ + rows, mask=q_ok, other=float("inf"))
    feat = h_ptr.dtype.element_ty
    do_f = dox.to(feat)
    if CAUSAL:
        kpos = t * CHUNK + tl.arange(0, CHUNK)
        k_in = (kpos >= 0) & (kpos < NK)
        vx = _load_rows(v_ptr + bhk.to(tl.int64) * NK * DV, kpos, k_in, offs_v, DV).to(feat)
        gv = _dot(do_f, tl.trans(vx), tl.zeros([BLOCK_M, CHUNK], tl.float32), FP32)
        vis = (kpos[None, :] <= pos[:, None]) & k_in[None, :]
        datt = tl.where(vis, gv - delta[:, None], 0.0).to(feat)
    inv_den = tl.exp2(-lse)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    psi_base = psi_ptr + bh.to(tl.int64) * NPOS * M_PAD
    p_ok = (pos >= 0) & (pos < NPOS)
    for f0 in range(0, M_PAD, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        u = _project(qx, wt_ptr, f0, D_PAD, M_PAD, BLOCK_F, N_SPLIT=N_SPLIT)
        if SOFTMAX:
            fr = _stat(st_ptr, slot, 1, offs_f, M_PAD)
            psi = tl.exp2(tl.where((offs_f < M)[None, :], u + fr[None, :] - lse[:, None], float("-inf")))
        else:
            psi = tl.where((offs_f < M)[None, :], tl.maximum(u, 0.0) + _RELU_EPS, 0.0) * inv_den[:, None]
        psi_f = psi.to(feat)
        tl.store(psi_base + pos[:, None].to(tl.int64) * M_PAD + offs_f[None, :], psi_f, mask=p_ok[:, None])
        hb = tl.load(h_ptr + (slot * M_PAD + offs_f[:, None]) * DV_PAD + offs_v[None, :])
        zb = _stat(st_ptr, slot, 0, offs_f, M_PAD)
        dphi = _dot(do_f, tl.trans(hb), tl.zeros([BLOCK_M, BLOCK_F], tl.float32), FP32) - delta[:, None] * zb[None, :]
        if CAUSAL:
            kf = tl.load(
                phi_ptr + (bhk.to(tl.int64) * NT * CHUNK + kpos[:, None]) * M_PAD + offs_f[None, :],
                mask=k_in[:, None],
                other=0.0,
            )
            intra = _dot(datt, kf, tl.zeros([BLOCK_M, BLOCK_F], tl.float32), FP32)
            if SOFTMAX:
                intra = intra * tl.exp2(_stat(cs_ptr, slot, 0, offs_f, M_PAD) - fr)[None, :]
            dphi += intra
        if SOFTMAX:  # noqa: SIM108
            dl = psi_f.to(tl.float32) * dphi
        else:
            dl = tl.where(u > 0.0, dphi, 0.0) * inv_den[:, None]
        wb = tl.load(w_ptr + offs_f[:, None] * D_PAD + offs_d[None, :])
        dq = _dot(dl.to(feat), wb, dq, FP32)
    tl.store(delta_ptr + bh.to(tl.int64) * NPOS + pos, tl.where(q_ok, delta, 0.0), mask=p_ok)
    dq_mask = q_ok[:, None] & (offs_d[None, :] < D)
    dq_off = (bh.to(tl.int64) * NQ + rows[:, None]) * D + offs_d[None, :]
    tl.store(dq_ptr + dq_off, dq.to(dq_ptr.dtype.element_ty), mask=dq_mask)


@triton.jit
def _key_chunk_features(
    phi_ptr,
    cs_ptr,
    st_ptr,
    chunk,
    slot,
    f0,
    M_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    """``(raw, scaled)``: the stored features of key chunk ``chunk``, features ``[f0, f0 + BLOCK_F)``,
    and, float32, the same in the frame of state ``slot`` (times ``exp2(c - F)``; relu: unscaled)."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    raw = tl.load(phi_ptr + (chunk * CHUNK + tl.arange(0, CHUNK)[:, None]) * M_PAD + offs_f[None, :])
    scaled = raw.to(tl.float32)
    if SOFTMAX:
        shift = _stat(cs_ptr, chunk, 0, offs_f, M_PAD) - _stat(st_ptr, slot, 1, offs_f, M_PAD)
        scaled = scaled * tl.exp2(shift)[None, :]
    return raw, scaled


@triton.jit
def _dk_kernel(
    k_ptr,
    v_ptr,
    phi_ptr,
    cs_ptr,
    st_ptr,
    r_ptr,
    rst_ptr,
    w_ptr,
    psi_ptr,
    do_ptr,
    delta_ptr,
    dk_ptr,
    kpm_ptr,
    NQ,
    NK,
    OFF,
    NT,
    NPOS,
    HK,
    scale,
    G: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr,
    SOFTMAX: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """``dK`` of one chunk of keys of key head ``bhk``, summed over its ``G`` query heads.

    With the query-side state ``R = sum_i psi_i dO_i^T``, ``r = sum_i psi_i delta_i`` over the
    queries that see the whole chunk (the chunks after it when causal, slot ``t``; all queries
    otherwise), in the frame ``F`` of the chunk::

        dphi_j = R v_j - r + sum_i [j <= p_i] (dO_i . v_j - delta_i) psi_i
        dK_j   = (phi(k_j) * dphi_j) Ws - scale k_j sum(phi(k_j) * dphi_j)     (relu: [phi > eps] dphi_j Ws)

    The diagonal chunk's query features are read, not recomputed.
    """
    t = tl.program_id(0)
    bhk = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    offs_v = tl.arange(0, DV_PAD)
    kpos = t * CHUNK + tl.arange(0, CHUNK)
    k_ok = _real_keys(kpm_ptr, bhk, HK, NK, kpos, kpos < NK, HAS_PAD=HAS_PAD)
    chunk = bhk.to(tl.int64) * NT + t
    if CAUSAL:  # noqa: SIM108 - constexpr branches read better in kernels
        slot = chunk
    else:
        slot = bhk.to(tl.int64)
    feat = r_ptr.dtype.element_ty
    vx = _load_rows(v_ptr + bhk.to(tl.int64) * NK * DV, kpos, kpos < NK, offs_v, DV).to(feat)
    dk = tl.zeros([CHUNK, D_PAD], tl.float32)
    rs = tl.zeros([CHUNK], tl.float32)
    if CAUSAL:
        rows = kpos - OFF
        q_ok = (rows >= 0) & (rows < NQ)
        vis = (kpos[:, None] <= kpos[None, :]) & q_ok[None, :]  # (keys, queries)
        if G == 1:  # one query head: its dO . v is the same for every feature block
            dox = _load_rows(do_ptr + bhk.to(tl.int64) * NQ * DV, rows, q_ok, offs_v, DV).to(feat)
            dlt = tl.load(delta_ptr + bhk.to(tl.int64) * NPOS + kpos, mask=q_ok, other=0.0)
            gv = _dot(vx, tl.trans(dox), tl.zeros([CHUNK, CHUNK], tl.float32), FP32)
            datt1 = tl.where(vis, gv - dlt[None, :], 0.0).to(feat)
    for f0 in range(0, M_PAD, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        kraw, kf32 = _key_chunk_features(phi_ptr, cs_ptr, st_ptr, chunk, slot, f0, M_PAD, CHUNK, BLOCK_F, SOFTMAX)
        rb = tl.load(r_ptr + (slot * M_PAD + offs_f[:, None]) * DV_PAD + offs_v[None, :])
        rz = _stat(rst_ptr, slot, 0, offs_f, M_PAD)
        dphi = _dot(vx, tl.trans(rb), tl.zeros([CHUNK, BLOCK_F], tl.float32), FP32) - rz[None, :]
        if CAUSAL:
            for g in range(0, G):
                bh = (bhk * G + g).to(tl.int64)
                if G == 1:
                    datt = datt1
                else:
                    dox = _load_rows(do_ptr + bh * NQ * DV, rows, q_ok, offs_v, DV).to(feat)
                    dlt = tl.load(delta_ptr + bh * NPOS + kpos, mask=q_ok, other=0.0)
                    gv = _dot(vx, tl.trans(dox), tl.zeros([CHUNK, CHUNK], tl.float32), FP32)
                    datt = tl.where(vis, gv - dlt[None, :], 0.0).to(feat)
                ps = tl.load(
                    psi_ptr + (bh * NPOS + kpos[:, None]) * M_PAD + offs_f[None, :], mask=q_ok[:, None], other=0.0
                )
                dphi = _dot(datt, ps, dphi, FP32)
        if SOFTMAX:
            dl = kf32 * dphi
            rs += tl.sum(dl, 1)
        else:
            eps = tl.full([1], _RELU_EPS, tl.float32).to(feat).to(tl.float32)
            dl = tl.where(kraw.to(tl.float32) > eps[None, :], dphi, 0.0)
        wb = tl.load(w_ptr + offs_f[:, None] * D_PAD + offs_d[None, :])
        dk = _dot(dl.to(feat), wb, dk, FP32)
    if SOFTMAX:
        kx = _load_rows(k_ptr + bhk.to(tl.int64) * NK * D, kpos, kpos < NK, offs_d, D).to(tl.float32)
        dk -= scale * kx * rs[:, None]
    dk = tl.where(k_ok[:, None], dk, 0.0)
    dk_mask = (kpos < NK)[:, None] & (offs_d[None, :] < D)
    dk_off = (bhk.to(tl.int64) * NK + kpos[:, None]) * D + offs_d[None, :]
    tl.store(dk_ptr + dk_off, dk.to(dk_ptr.dtype.element_ty), mask=dk_mask)


@triton.jit
def _dv_kernel(
    phi_ptr,
    cs_ptr,
    st_ptr,
    r_ptr,
    psi_ptr,
    do_ptr,
    dv_ptr,
    kpm_ptr,
    NQ,
    NK,
    OFF,
    NT,
    NPOS,
    HK,
    G: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr,
    SOFTMAX: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """``dV`` of one chunk of keys of key head ``bhk``, summed over its ``G`` query heads (the
    states of :func:`_dk_kernel`)::

        dV_j = R^T phi(k_j) + sum_i [j <= p_i] (psi_i . phi(k_j)) dO_i
    """
    t = tl.program_id(0)
    bhk = tl.program_id(1)
    offs_v = tl.arange(0, DV_PAD)
    kpos = t * CHUNK + tl.arange(0, CHUNK)
    k_ok = _real_keys(kpm_ptr, bhk, HK, NK, kpos, kpos < NK, HAS_PAD=HAS_PAD)
    chunk = bhk.to(tl.int64) * NT + t
    if CAUSAL:  # noqa: SIM108
        slot = chunk
    else:
        slot = bhk.to(tl.int64)
    feat = r_ptr.dtype.element_ty
    dv = tl.zeros([CHUNK, DV_PAD], tl.float32)
    for f0 in range(0, M_PAD, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        _, kf32 = _key_chunk_features(phi_ptr, cs_ptr, st_ptr, chunk, slot, f0, M_PAD, CHUNK, BLOCK_F, SOFTMAX)
        rb = tl.load(r_ptr + (slot * M_PAD + offs_f[:, None]) * DV_PAD + offs_v[None, :])
        dv = _dot(kf32.to(feat), rb, dv, FP32)
    if CAUSAL:
        rows = kpos - OFF
        q_ok = (rows >= 0) & (rows < NQ)
        vis = (kpos[:, None] <= kpos[None, :]) & q_ok[None, :]  # (keys, queries)
        for g in range(0, G):  # (psi_i . phi(k_j)) over all features, then times dO_i
            bh = (bhk * G + g).to(tl.int64)
            att = tl.zeros([CHUNK, CHUNK], tl.float32)
            for f0 in range(0, M_PAD, BLOCK_F):
                offs_f = f0 + tl.arange(0, BLOCK_F)
                _, kf32 = _key_chunk_features(phi_ptr, cs_ptr, st_ptr, chunk, slot, f0, M_PAD, CHUNK, BLOCK_F, SOFTMAX)
                ps = tl.load(
                    psi_ptr + (bh * NPOS + kpos[None, :]) * M_PAD + offs_f[:, None], mask=q_ok[None, :], other=0.0
                )
                att = _dot(kf32.to(feat), ps, att, FP32)
            att = tl.where(vis, att, 0.0).to(feat)
            dox = _load_rows(do_ptr + bh * NQ * DV, rows, q_ok, offs_v, DV).to(feat)
            dv = _dot(att, dox, dv, FP32)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    dv_mask = (kpos < NK)[:, None] & (offs_v[None, :] < DV)
    dv_off = (bhk.to(tl.int64) * NK + kpos[:, None]) * DV + offs_v[None, :]
    tl.store(dv_ptr + dv_off, dv.to(dv_ptr.dtype.element_ty), mask=dv_mask)
