"""Fused softmax attention in Triton: full, causal, sliding window and global tokens, fwd + bwd.

One kernel family in the shape of Triton's fused-attention tutorial and FlashAttention-2:

- ``_fwd_kernel``: one program per (query block, batch x head). Online softmax in float32 with
  ``exp2``; writes the output and the log-sum-exp (base 2) of every row for the backward.
- ``_bwd_dq_kernel``: the same programs and key ranges; recomputes the probabilities from the
  saved log-sum-exp and accumulates ``dq``.
- ``_bwd_dkdv_kernel``: one program per (key block, batch x kv head); walks the query blocks
  that see the key block, for every query head of the group (GQA by indexing: no K/V copy),
  and accumulates ``dk`` and ``dv`` in registers (deterministic, no atomics).

Which key blocks a query block visits (and the other way round for ``dk``/``dv``) is decided
on the host by :func:`query_block_schedule` / :func:`key_block_schedule`: a small int32 table
``(start, lo, hi, end)`` per program. The kernel runs ``[start, lo)`` and ``[hi, end)`` with
the mask and ``[lo, hi)``, the blocks that every row of the block sees entirely, without any
mask arithmetic. For a window ``(left, right)`` only the blocks meeting the band are listed,
so the work is ``O(N (left + right + BLOCK))``, not ``O(N^2)``::

                 key blocks ->
    query block  [m m u u u u m m . . . . .]     m: masked edge block (band border, causal
    m            [. m m u u u u m m . . . .]        diagonal, sequence end)
                 [. . m m u u u u m m . . .]     u: interior block, no mask arithmetic
                                                  .: never visited

Global tokens (Longformer) are split so that nothing is dense beyond ``g x N``, with ``g``
the number of global positions and ``V = causal & (band | global row | global column)``:

- band programs (every query block): the band loop above, then the global *keys* gathered by
  index with the mask ``~band & causal`` (so no key counts twice); they do not store the rows
  that are global.
- a second, "gathered" launch (``GATHERED=True``, half the query tile) over the global rows,
  gathered by index: every key, causal only.
- for ``dk``/``dv`` the same split transposed: band key blocks add the gathered global *rows*
  outside the band and do not store global keys; the gathered launch over the global keys
  sees every query row.

The row term ``delta = rowsum(dO * O)`` of the backward comes from a small kernel of its own.

A row with no visible key gets output 0 and log-sum-exp ``+inf``, so the backward's
recomputed probabilities are 0 there and every gradient of that row is 0.

float32 inputs use IEEE float32 ``tl.dot`` (``input_precision="ieee"``, no TF32), so the
float32 path is as accurate as PyTorch's float32 matmul; float16/bfloat16 inputs use the
tensor cores with float32 accumulation, and the probabilities are cast to the input dtype
before the ``P @ V`` product, as in FlashAttention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs without Triton still import the package
    triton = None
    tl = None

from . import interpreter_enabled, interpreter_range

MAX_HEAD_DIM = 256
MIN_HEAD_DIM = 1
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"


@dataclass(frozen=True)
class Candidate:
    """A launch configuration and the inputs it is meant for (16-bit or float32, head dims)."""

    config: KernelConfig
    elem_bytes: int
    max_head_dim: int


# Candidates in order of preference; the first one that ``keep`` accepts is launched. The
# tiles follow FlashAttention-2 / the Triton tutorial, shrunk until ``ptxas`` reports no
# spills in the forward for sm_80 and sm_90 in the specialisation with the most live state
# (tests/test_flash_compile.py prints the numbers), under Triton 3.6 as well as the newest
# release. float32 uses IEEE products on the CUDA cores, hence its small tiles: it is the
# accuracy path, 16-bit inputs are the fast path. Head dims above 128: one stage for 16-bit
# inputs (two stages barely pipelined anything there and spilled under Triton 3.6), two for
# float32 (one stage spilled on sm_90 under Triton 3.6).
FWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(KernelConfig(128, 64, 8, 3), 2, 64),
    Candidate(KernelConfig(128, 32, 8, 2), 2, 128),
    Candidate(KernelConfig(32, 32, 8, 1), 2, 256),
    Candidate(KernelConfig(32, 16, 8, 1), 4, 128),
    Candidate(KernelConfig(32, 16, 8, 2), 4, 256),
)
# The backward holds more tiles live (q, k, v, dO and two accumulators): smaller tiles.
BWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(KernelConfig(64, 32, 4, 2), 2, 64),
    Candidate(KernelConfig(32, 32, 4, 2), 2, 128),
    Candidate(KernelConfig(32, 32, 8, 1), 2, 256),
    Candidate(KernelConfig(16, 16, 4, 1), 4, 256),
)
# Under the interpreter: small tiles with block_m != block_n, so that tests at N <= 200 cover
# several blocks, edge blocks and interior blocks of both shapes.
INTERPRETER_CONFIG = KernelConfig(32, 16, 4, 1)
# The small kernel that computes the backward's row term delta: 4096 elements per tile
# (block_m = 4096 / padded Dv rows; block_n is unused).
DELTA_CONFIG = KernelConfig(64, 16, 4, 1)


def _delta_config(dv: int) -> KernelConfig:
    rows = max(16, min(128, 4096 // max(16, 1 << (dv - 1).bit_length())))
    return KernelConfig(rows, DELTA_CONFIG.block_n, DELTA_CONFIG.num_warps, DELTA_CONFIG.num_stages)


@dataclass(frozen=True)
class ConfigKey:
    """What the launch configuration is chosen on."""

    n: int  # max(Nq, Nk)
    head_dim: int  # max(D, Dv)
    elem_bytes: int  # 2 (float16/bfloat16) or 4 (float32)
    causal: bool
    window: int | None  # left + right + 1, None for full attention


def keep(candidate: Candidate, key: ConfigKey) -> bool:
    """Whether ``candidate`` may run ``key``: the predicate that prunes the candidate lists."""
    cfg = candidate.config
    if key.elem_bytes != candidate.elem_bytes or key.head_dim > candidate.max_head_dim:
        return False
    if key.window is not None and key.window <= 32 and cfg.block_n >= 64:
        return False  # a narrow band: most of a wide key tile would be masked
    return not (key.n <= 64 and cfg.block_m >= 128)  # a short sequence: one small tile suffices


def gathered_config(cfg: KernelConfig) -> KernelConfig:
    """Launch of the gathered global rows: half the query tile (gathered row indices cost
    registers that the band kernel does not need; the compile tests showed spills otherwise)."""
    return KernelConfig(max(16, cfg.block_m // 2), cfg.block_n, cfg.num_warps, cfg.num_stages)


def _select_gpu(key: ConfigKey, backward: bool) -> KernelConfig:
    for candidate in BWD_CANDIDATES if backward else FWD_CANDIDATES:
        if keep(candidate, key):
            return candidate.config
    raise AssertionError(f"no launch configuration for {key}")  # the lists end with catch-alls


def select_config(key: ConfigKey, backward: bool) -> KernelConfig:
    """The launch configuration for ``key`` (a fixed one under the interpreter: no autotuning)."""
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    return _select_gpu(key, backward)


def shipped_configs() -> list[tuple[str, KernelConfig, int, torch.dtype]]:
    """``(kernel, config, head dim, dtype)`` of every launch ``select_config`` can make on a GPU,
    at the largest head dim the config serves (the most live state); 16-bit configs are listed
    with bfloat16, the dtype the interpreter cannot check. The compile tests build each one."""
    out = []
    for kernels, candidates in ((("fwd",), FWD_CANDIDATES), (("bwd_dq", "bwd_dkdv"), BWD_CANDIDATES)):
        for c in candidates:
            dtype = torch.bfloat16 if c.elem_bytes == 2 else torch.float32
            out.extend((kernel, c.config, c.max_head_dim, dtype) for kernel in kernels)
    delta = _delta_config(MAX_HEAD_DIM)
    out.extend(("bwd_delta", delta, MAX_HEAD_DIM, dtype) for dtype in (torch.bfloat16, torch.float32))
    return out


# ---------------------------------------------------------------------------------------------
# Host-side block schedules (plain torch; unit-tested against masks.dense_mask)
# ---------------------------------------------------------------------------------------------


def _reach(window: tuple[int, int] | None, nq: int, nk: int) -> tuple[int, int]:
    """Window reach, with "no window" (and reaches wider than the sequences) as a finite bound."""
    big = nq + nk + 1
    if window is None:
        return big, big
    return min(window[0], big), min(window[1], big)


def _ranges(lo: Tensor, hi: Tensor, in_lo: Tensor, in_hi: Tensor, block: int) -> Tensor:
    """Schedule rows ``(start, lo, hi, end)`` from the partner range ``[lo, hi]`` (inclusive) and
    the interior ``[in_lo, in_hi]`` that every own position sees; blocks are aligned to ``block``."""
    empty = hi < lo
    start = torch.div(lo.clamp(min=0), block, rounding_mode="floor") * block
    end = hi + 1
    a = -torch.div(-in_lo.clamp(min=0), block, rounding_mode="floor") * block  # ceil to a block
    a = torch.maximum(a, start)
    b = torch.div(in_hi + 1, block, rounding_mode="floor") * block  # last whole block inside
    none = b <= a
    a = torch.where(none, end, a)
    b = torch.where(none, end, b)
    out = torch.stack([start, a, b, end], dim=1)
    out[empty] = 0
    return out.to(torch.int32)


def _gathered_blocks(global_idx: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """First and last position of each block of ``block`` sorted global positions."""
    g = global_idx.numel()
    firsts = global_idx[torch.arange(0, g, block)]
    lasts = global_idx[(torch.arange(0, g, block) + block - 1).clamp(max=g - 1)]
    return firsts, lasts


def query_block_schedule(
    nq: int,
    nk: int,
    block_m: int,
    block_n: int,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    global_idx: Tensor | None = None,
    global_block: int | None = None,
) -> Tensor:
    """Key ranges visited by each query program of the forward and ``dq`` kernels.

    Returns an int32 tensor ``(P, 4)`` of key indices ``(start, lo, hi, end)``: blocks of
    ``block_n`` keys from ``start`` (a multiple of ``block_n``) to ``end`` (exclusive), of
    which ``[lo, hi)`` are seen entirely by every row of the program. Programs
    ``0 .. ceil(nq / block_m) - 1`` are the query blocks (their band, causal applied);
    with ``global_idx`` (sorted positions of the global tokens, ``nq == nk``) the next
    ``ceil(g / global_block)`` programs (``global_block`` defaults to ``block_m``) are the
    gathered global rows, which see every key (causal applied). The band programs also visit
    the global keys, which are not listed here.
    """
    off = nk - nq
    left, right = _reach(window, nq, nk)
    big = nq + nk + 1
    m = torch.arange(0, nq, block_m, dtype=torch.long)
    p_lo = m + off
    p_hi = (m + block_m).clamp(max=nq) - 1 + off
    lefts = torch.full_like(m, left)
    rights = torch.full_like(m, right)
    if global_idx is not None and global_idx.numel():
        g_lo, g_hi = _gathered_blocks(global_idx.long().cpu(), global_block or block_m)
        p_lo = torch.cat([p_lo, g_lo + off])
        p_hi = torch.cat([p_hi, g_hi + off])
        lefts = torch.cat([lefts, torch.full_like(g_lo, big)])
        rights = torch.cat([rights, torch.full_like(g_lo, big)])
    lo = (p_lo - lefts).clamp(min=0)
    hi = (p_hi + rights).clamp(max=nk - 1)
    in_lo = p_hi - lefts
    in_hi = (p_lo + rights).clamp(max=nk - 1)
    if causal:
        hi = torch.minimum(hi, p_hi)
        in_hi = torch.minimum(in_hi, p_lo)
    return _ranges(lo, hi, in_lo, in_hi, block_n)


def key_block_schedule(
    nq: int,
    nk: int,
    block_m: int,
    block_n: int,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    global_idx: Tensor | None = None,
) -> Tensor:
    """Query ranges visited by each key program of the ``dk``/``dv`` kernel.

    The transpose of :func:`query_block_schedule`: an int32 tensor ``(P, 4)`` of query indices
    ``(start, lo, hi, end)`` in blocks of ``block_m`` rows, ``[lo, hi)`` seeing every key of the
    program. Programs ``0 .. ceil(nk / block_n) - 1`` are the key blocks (the rows whose band
    meets them); with ``global_idx`` the next ``ceil(g / block_n)`` programs are the gathered
    global keys, seen by every row (causal applied). The key-block programs also visit the
    global rows, which are not listed here.
    """
    off = nk - nq
    left, right = _reach(window, nq, nk)
    big = nq + nk + 1
    n = torch.arange(0, nk, block_n, dtype=torch.long)
    j_lo = n
    j_hi = (n + block_n).clamp(max=nk) - 1
    lefts = torch.full_like(n, left)
    rights = torch.full_like(n, right)
    if global_idx is not None and global_idx.numel():
        g_lo, g_hi = _gathered_blocks(global_idx.long().cpu(), block_n)
        j_lo = torch.cat([j_lo, g_lo])
        j_hi = torch.cat([j_hi, g_hi])
        lefts = torch.cat([lefts, torch.full_like(g_lo, big)])
        rights = torch.cat([rights, torch.full_like(g_lo, big)])
    # Row i (position p = i + off) sees key j in the band iff j - left <= ... : p in [j - right, j + left].
    lo = (j_lo - rights - off).clamp(min=0)
    hi = (j_hi + lefts - off).clamp(max=nq - 1)
    in_lo = j_hi - rights - off
    in_hi = (j_lo + lefts - off).clamp(max=nq - 1)
    if causal:
        lo = torch.maximum(lo, j_lo - off)
        in_lo = torch.maximum(in_lo, j_hi - off)
    return _ranges(lo, hi, in_lo, in_hi, block_m)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:
    # Loops over runtime bounds (schedule rows, head groups, global tokens) use ``_range``: the
    # loop ``range`` compiles to, and under the interpreter one that Triton 3.6 can run too.
    _range = interpreter_range if interpreter_enabled() else tl.range

    @triton.jit
    def _visible(p, j, valid, left, right, CAUSAL: tl.constexpr, MODE: tl.constexpr):
        """Mask of the broadcast positions ``p`` (query) and ``j`` (key).

        MODE 1: inside the band; MODE 2: outside the band (global rows / keys, so that nothing
        counts twice). Causal applies in both.
        """
        rel = j - p
        band = (rel >= -left) & (rel <= right)
        if MODE == 1:  # noqa: SIM108 - constexpr branches read better in kernels
            vis = band & valid
        else:
            vis = (~band) & valid
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
    def _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        pos_q,
        start,
        end,
        n_valid,
        IDX,
        left,
        right,
        qk_scale,
        CAUSAL: tl.constexpr,
        MODE: tl.constexpr,
        GATHER: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HEAD_D: tl.constexpr,
        HEAD_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """Online softmax over key tiles ``[start, end)``; MODE 0 runs without any mask."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        for n in _range(start, end, BLOCK_N):
            cols, valid = _positions(n, offs_n, n_valid, IDX, GATHER)
            kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :]
            if MODE == 0:
                kt = _load_interior(kt_ptrs, offs_d[:, None] < HEAD_D, HEAD_D < BLOCK_D)
            else:
                kt = tl.load(kt_ptrs, mask=valid[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            if MODE == 0:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = m_new
            else:
                vis = _visible(pos_q[:, None], cols[None, :], valid[None, :], left, right, CAUSAL, MODE)
                s = tl.where(vis, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows so far
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if MODE == 0:
                v = _load_interior(v_ptrs, offs_dv[None, :] < HEAD_DV, HEAD_DV < BLOCK_DV)
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
        HAS_GLOBAL: tl.constexpr,
        GATHERED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HEAD_D: tl.constexpr,
        HEAD_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        hk = (h // GROUPS).to(tl.int64)
        h = h.to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        if GATHERED:  # the global rows, gathered by index: they see every key (causal applies)
            t = pid * BLOCK_M + offs_m
            row_valid = t < NG
            rows = tl.load(GIDX + t, mask=row_valid, other=0)
            left = NK + NQ + 1
            right = NK + NQ + 1
        else:
            rows = pid * BLOCK_M + offs_m
            row_valid = rows < NQ
            left = LEFT
            right = RIGHT
        pos_q = rows + (NK - NQ)

        q = tl.load(
            q_base + rows[:, None] * stride_qm + offs_d[None, :],
            mask=row_valid[:, None] & (offs_d[None, :] < HEAD_D),
            other=0.0,
        )
        start = tl.load(SCHED + pid * 4)
        lo = tl.load(SCHED + pid * 4 + 1)
        hi = tl.load(SCHED + pid * 4 + 2)
        end = tl.load(SCHED + pid * 4 + 3)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos_q, start, lo, NK, GIDX,
            left, right, qk_scale, CAUSAL, 1, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos_q, lo, hi, NK, GIDX,
            left, right, qk_scale, CAUSAL, 0, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos_q, hi, end, NK, GIDX,
            left, right, qk_scale, CAUSAL, 1, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
        )  # fmt: skip
        store_mask = row_valid
        if HAS_GLOBAL:
            # Band programs add the global keys outside the band and leave the global rows to the
            # gathered launch.
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos_q, 0, NG, NG, GIDX,
                left, right, qk_scale, CAUSAL, 2, True, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
            )  # fmt: skip
            # Global rows are stored by the programs that gather them.
            row_flag = tl.load(GFLAG + rows, mask=row_valid, other=0).to(tl.int32)
            store_mask = row_valid & (row_flag == 0)

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
        end,
        n_valid,
        IDX,
        left,
        right,
        qk_scale,
        CAUSAL: tl.constexpr,
        MODE: tl.constexpr,
        GATHER: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HEAD_D: tl.constexpr,
        HEAD_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """``dq += dS @ K`` over key tiles ``[start, end)`` (scale applied by the caller)."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        for n in _range(start, end, BLOCK_N):
            cols, valid = _positions(n, offs_n, n_valid, IDX, GATHER)
            kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
            vt_ptrs = v_base + cols[None, :] * stride_vn + offs_dv[:, None]
            if MODE == 0:
                kt = _load_interior(kt_ptrs, offs_d[:, None] < HEAD_D, HEAD_D < BLOCK_D)
                vt = _load_interior(vt_ptrs, offs_dv[:, None] < HEAD_DV, HEAD_DV < BLOCK_DV)
            else:
                kt = tl.load(kt_ptrs, mask=valid[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
                vt = tl.load(vt_ptrs, mask=valid[None, :] & (offs_dv[:, None] < HEAD_DV), other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if MODE != 0:
                vis = _visible(pos_q[:, None], cols[None, :], valid[None, :], left, right, CAUSAL, MODE)
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
        HAS_GLOBAL: tl.constexpr,
        GATHERED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HEAD_D: tl.constexpr,
        HEAD_DV: tl.constexpr,
        PREC: tl.constexpr,
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

        if GATHERED:  # the global rows, gathered by index: they see every key (causal applies)
            t = pid * BLOCK_M + offs_m
            row_valid = t < NG
            rows = tl.load(GIDX + t, mask=row_valid, other=0)
            left = NK + NQ + 1
            right = NK + NQ + 1
        else:
            rows = pid * BLOCK_M + offs_m
            row_valid = rows < NQ
            left = LEFT
            right = RIGHT
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
        start = tl.load(SCHED + pid * 4)
        lo = tl.load(SCHED + pid * 4 + 1)
        hi = tl.load(SCHED + pid * 4 + 2)
        end = tl.load(SCHED + pid * 4 + 3)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, start, lo, NK, GIDX,
            left, right, qk_scale, CAUSAL, 1, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, lo, hi, NK, GIDX,
            left, right, qk_scale, CAUSAL, 0, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, hi, end, NK, GIDX,
            left, right, qk_scale, CAUSAL, 1, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
        )  # fmt: skip
        store_mask = row_valid
        if HAS_GLOBAL:
            dq = _dq_inner(
                dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, pos_q, 0, NG, NG, GIDX,
                left, right, qk_scale, CAUSAL, 2, True, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PREC,
            )  # fmt: skip
            # Global rows are stored by the programs that gather them.
            row_flag = tl.load(GFLAG + rows, mask=row_valid, other=0).to(tl.int32)
            store_mask = row_valid & (row_flag == 0)
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :]
        tl.store(
            dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=store_mask[:, None] & (offs_d[None, :] < HEAD_D)
        )

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
        end,
        n_valid,
        row_off,
        IDX,
        left,
        right,
        qk_scale,
        CAUSAL: tl.constexpr,
        MODE: tl.constexpr,
        GATHER: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HEAD_D: tl.constexpr,
        HEAD_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """``dv += P^T dO`` and ``dk += dS^T Q`` over query tiles ``[start, end)`` of one head."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        for m in _range(start, end, BLOCK_M):
            rows, valid = _positions(m, offs_m, n_valid, IDX, GATHER)
            q_ptrs = q_base + rows[:, None] * stride_qm + offs_d[None, :]
            do_ptrs = do_base + rows[:, None] * stride_dom + offs_dv[None, :]
            if MODE == 0:
                q = _load_interior(q_ptrs, offs_d[None, :] < HEAD_D, HEAD_D < BLOCK_D)
                do = _load_interior(do_ptrs, offs_dv[None, :] < HEAD_DV, HEAD_DV < BLOCK_DV)
                lse = tl.load(LSE + stats_base + rows)
                delta = tl.load(DELTA + stats_base + rows)
            else:
                q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
                do = tl.load(do_ptrs, mask=valid[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
                lse = tl.load(LSE + stats_base + rows, mask=valid, other=float("inf"))
                delta = tl.load(DELTA + stats_base + rows, mask=valid, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
            pt = tl.exp2(st - lse[None, :])
            if MODE != 0:
                vis = _visible(rows[None, :] + row_off, pos_k[:, None], valid[None, :], left, right, CAUSAL, MODE)
                pt = tl.where(vis, pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
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
        HAS_GLOBAL: tl.constexpr,
        GATHERED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HEAD_D: tl.constexpr,
        HEAD_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        bhk = tl.program_id(1)
        b = (bhk // HK).to(tl.int64)
        hk = (bhk % HK).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)

        if GATHERED:  # the global keys, gathered by index: every row sees them (causal applies)
            t = pid * BLOCK_N + offs_n
            col_valid = t < NG
            cols = tl.load(GIDX + t, mask=col_valid, other=0)
            left = NK + NQ + 1
            right = NK + NQ + 1
        else:
            cols = pid * BLOCK_N + offs_n
            col_valid = cols < NK
            left = LEFT
            right = RIGHT
        row_off = NK - NQ

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
        start = tl.load(SCHED + pid * 4)
        lo = tl.load(SCHED + pid * 4 + 1)
        hi = tl.load(SCHED + pid * 4 + 2)
        end = tl.load(SCHED + pid * 4 + 3)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for g in _range(GROUPS):
            h = hk * GROUPS + g
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            stats_base = (b * H + h) * NQ
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, start, lo,
                NQ, row_off, GIDX, left, right, qk_scale, CAUSAL, 1, False, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D,
                HEAD_DV, PREC,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, lo, hi,
                NQ, row_off, GIDX, left, right, qk_scale, CAUSAL, 0, False, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D,
                HEAD_DV, PREC,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, hi, end,
                NQ, row_off, GIDX, left, right, qk_scale, CAUSAL, 1, False, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D,
                HEAD_DV, PREC,
            )  # fmt: skip
            if HAS_GLOBAL:
                # Key-block programs add the global rows outside the band (row_off is 0 here).
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_base, do_base, stats_base, LSE, DELTA, stride_qm, stride_dom, cols, 0, NG,
                    NG, row_off, GIDX, left, right, qk_scale, CAUSAL, 2, True, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D,
                    HEAD_DV, PREC,
                )  # fmt: skip
        store_mask = col_valid
        if HAS_GLOBAL:
            # Global cols are stored by the programs that gather them.
            col_flag = tl.load(GFLAG + cols, mask=col_valid, other=0).to(tl.int32)
            store_mask = col_valid & (col_flag == 0)
        dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
        dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :]
        tl.store(
            dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask[:, None] & (offs_d[None, :] < HEAD_D)
        )
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask[:, None] & (offs_dv[None, :] < HEAD_DV))


# ---------------------------------------------------------------------------------------------
# Host side: options, launches, autograd
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlashOptions:
    """Non-tensor options of one call (plus the resolved global positions).

    ``window`` is ``(left, right)`` with causal already folded in, or None for full attention;
    ``global_idx`` holds the sorted global positions (int32, on the device) or None.
    """

    causal: bool
    scale: float
    window: tuple[int, int] | None = None
    global_idx: Tensor | None = field(default=None, compare=False)
    global_flag: Tensor | None = field(default=None, compare=False)

    @property
    def num_global(self) -> int:
        return 0 if self.global_idx is None else int(self.global_idx.numel())


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# Precision of tl.dot: IEEE float32 products for float32 inputs (no TF32, so float32 is as
# accurate as PyTorch's float32 matmul); for float16/bfloat16 inputs the setting has no effect
# (their products are exact in the float32 accumulator).
DOT_PRECISION = "ieee"


def _precision(dtype: torch.dtype) -> str:
    return DOT_PRECISION


def _config_key(q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> ConfigKey:
    window = None if opts.window is None else opts.window[0] + opts.window[1] + 1
    d = max(q.shape[-1], v.shape[-1])
    return ConfigKey(max(q.shape[2], k.shape[2]), d, q.element_size(), opts.causal, window)


def _global_args(opts: FlashOptions, device: torch.device) -> tuple[Tensor, Tensor, int]:
    if opts.num_global:
        assert opts.global_idx is not None and opts.global_flag is not None
        return opts.global_idx, opts.global_flag, opts.num_global
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    return dummy, dummy.to(torch.int8), 0


def _last_dim_unit(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=128)
def _cached_schedule(
    keys: bool, nq: int, nk: int, bm: int, bn: int, causal: bool, window: tuple[int, int] | None, device: str
) -> Tensor:
    fn = key_block_schedule if keys else query_block_schedule
    return fn(nq, nk, bm, bn, causal=causal, window=window).to(device)


def _schedule(keys: bool, nq: int, nk: int, cfg: KernelConfig, opts: FlashOptions, device: torch.device) -> Tensor:
    """The schedule on ``device``; cached per shape when there are no global tokens."""
    if not opts.num_global:
        return _cached_schedule(keys, nq, nk, cfg.block_m, cfg.block_n, opts.causal, opts.window, str(device))
    if keys:
        sched = key_block_schedule(
            nq, nk, cfg.block_m, cfg.block_n, causal=opts.causal, window=opts.window, global_idx=opts.global_idx
        )
    else:
        sched = query_block_schedule(
            nq, nk, cfg.block_m, cfg.block_n, causal=opts.causal, window=opts.window, global_idx=opts.global_idx,
            global_block=gathered_config(cfg).block_m,
        )  # fmt: skip
    return sched.to(device)


def _launches(
    sched: Tensor, n_band: int, has_global: bool, block: int, gathered_block: int
) -> list[tuple[Tensor, int, bool, bool, int]]:
    """``(schedule rows, programs, HAS_GLOBAL, GATHERED, tile)`` of the band launch and, with
    global tokens, of the gathered launch (a separate specialisation keeps the band kernel lean)."""
    out = [(sched[:n_band], n_band, has_global, False, block)]
    if has_global and sched.shape[0] > n_band:
        out.append((sched[n_band:], sched.shape[0] - n_band, False, True, gathered_block))
    return out


def _forward(q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> tuple[Tensor, Tensor]:
    bsz, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = select_config(_config_key(q, k, v, opts), backward=False)
    gidx, gflag, ng = _global_args(opts, q.device)
    gblock = gathered_config(cfg).block_m
    sched = _schedule(False, nq, nk, cfg, opts, q.device)
    out = torch.empty(bsz, h, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, h, nq, dtype=torch.float32, device=q.device)
    left, right = _reach(opts.window, nq, nk)
    n_band = triton.cdiv(nq, cfg.block_m)
    for rows, programs, has_global, gathered, block_m in _launches(sched, n_band, ng > 0, cfg.block_m, gblock):
        _fwd_kernel[(programs, bsz * h)](
            q, k, v, out, lse, rows, gidx, gflag,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            h, h // hk, nq, nk, ng, left, right, opts.scale * _LOG2E,
            CAUSAL=opts.causal, HAS_GLOBAL=has_global, GATHERED=gathered, BLOCK_M=block_m,
            BLOCK_N=cfg.block_n, BLOCK_D=_block_d(d), BLOCK_DV=_block_d(dv), HEAD_D=d, HEAD_DV=dv,
            PREC=_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return out, lse


def _backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, opts: FlashOptions
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dout = _last_dim_unit(dout)
    cfg = select_config(_config_key(q, k, v, opts), backward=True)
    gidx, gflag, ng = _global_args(opts, q.device)
    left, right = _reach(opts.window, nq, nk)
    delta = torch.empty(bsz, h, nq, dtype=torch.float32, device=q.device)
    dcfg = _delta_config(dv)
    _bwd_delta_kernel[(triton.cdiv(nq, dcfg.block_m), bsz * h)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        h, nq, BLOCK_M=dcfg.block_m, BLOCK_DV=_block_d(dv), HEAD_DV=dv,
        num_warps=dcfg.num_warps, num_stages=dcfg.num_stages,
    )  # fmt: skip
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dvv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    common = dict(
        CAUSAL=opts.causal, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(d),
        BLOCK_DV=_block_d(dv), HEAD_D=d, HEAD_DV=dv, PREC=_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    qk_scale = opts.scale * _LOG2E

    gblock = gathered_config(cfg).block_m
    sched_q = _schedule(False, nq, nk, cfg, opts, q.device)
    n_band = triton.cdiv(nq, cfg.block_m)
    for rows, programs, has_global, gathered, block_m in _launches(sched_q, n_band, ng > 0, cfg.block_m, gblock):
        _bwd_dq_kernel[(programs, bsz * h)](
            q, k, v, dout, dq, lse, delta, rows, gidx, gflag,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            h, h // hk, nq, nk, ng, left, right, opts.scale, qk_scale,
            HAS_GLOBAL=has_global, GATHERED=gathered, BLOCK_M=block_m, **common,
        )  # fmt: skip
    sched_k = _schedule(True, nq, nk, cfg, opts, q.device)
    n_band = triton.cdiv(nk, cfg.block_n)
    for cols, programs, has_global, gathered, _ in _launches(sched_k, n_band, ng > 0, cfg.block_n, cfg.block_n):
        _bwd_dkdv_kernel[(programs, bsz * hk)](
            q, k, v, dout, dk, dvv, lse, delta, cols, gidx, gflag,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dvv.stride(0), dvv.stride(1), dvv.stride(2),
            h, hk, h // hk, nq, nk, ng, left, right, opts.scale, qk_scale,
            HAS_GLOBAL=has_global, GATHERED=gathered, BLOCK_M=cfg.block_m, **common,
        )  # fmt: skip
    return dq, dk, dvv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> Tensor:  # type: ignore[override]
        q, k, v = (_last_dim_unit(t) for t in (q, k, v))
        out, lse = _forward(q, k, v, opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.opts)
        return dq, dk, dv, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    window: tuple[int, int] | None = None,
    global_mask: Tensor | None = None,
) -> Tensor:
    """Fused softmax attention (inputs already validated by the public API).

    Args:
        q: ``(B, H, Nq, D)``; k: ``(B, Hk, Nk, D)``; v: ``(B, Hk, Nk, Dv)``, ``H % Hk == 0``,
            float16 / bfloat16 / float32, any strides, on CUDA (or CPU under the interpreter).
        causal: bottom-right causal mask (query ``i`` sees key ``j`` iff ``j <= i + Nk - Nq``).
        scale: softmax scale.
        window: ``(left, right)`` band with causal already folded in, or None (full attention).
        global_mask: bool ``(N,)`` of global positions (``Nq == Nk``), used with a window.

    Returns ``(B, H, Nq, Dv)`` in the dtype of ``q``; rows without a visible key are 0.
    """
    gidx = gflag = None
    if window is not None and global_mask is not None:
        positions = global_mask.nonzero().flatten()
        if positions.numel():
            gidx = positions.to(device=q.device, dtype=torch.int32).contiguous()
            gflag = global_mask.to(device=q.device, dtype=torch.int8).contiguous()
    if window is not None:
        window = (int(window[0]), int(window[1]))
    opts = FlashOptions(bool(causal), float(scale), window, gidx, gflag)
    return _FlashAttention.apply(q, k, v, opts)


def unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused kernels cannot run ``dtype`` / ``head_dim`` (Triton and device already checked)."""
    if triton is None:
        return "Triton is not importable"
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(t).removeprefix("torch.") for t in SUPPORTED_DTYPES)
        return f"the Triton softmax kernels support {names}, not {dtype}"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"the Triton softmax kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 tl.dot gives wrong results under the Triton interpreter; use a CUDA device"
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    return None


__all__ = [
    "FlashOptions",
    "Candidate",
    "ConfigKey",
    "KernelConfig",
    "flash_attention",
    "gathered_config",
    "key_block_schedule",
    "query_block_schedule",
    "select_config",
    "shipped_configs",
    "unsupported_reason",
]


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
) -> tuple[object, dict[str, str], dict[str, object]]:
    """``(fn, signature, constexprs)`` of one kernel specialisation, for ``kernels.aot.compile_for``.

    ``kernel`` is ``"fwd"``, ``"bwd_dq"``, ``"bwd_dkdv"`` or ``"bwd_delta"``; the default flags
    (causal, global tokens) give the specialisation with the most live state.
    """
    fn = {
        "fwd": _fwd_kernel,
        "bwd_dq": _bwd_dq_kernel,
        "bwd_dkdv": _bwd_dkdv_kernel,
        "bwd_delta": _bwd_delta_kernel,
    }[kernel]
    sig = dict.fromkeys(_KERNEL_POINTERS[kernel], "*" + _TRITON_TYPES[dtype])
    bd = _block_d(head_dim)
    if kernel == "bwd_delta":
        sig.update(DELTA="*fp32", H="i32", NQ="i32")
        sig.update((name, "i32") for name in fn.arg_names if name.startswith("stride_"))
        return fn, sig, dict(BLOCK_M=cfg.block_m, BLOCK_DV=bd, HEAD_DV=head_dim)
    sig.update(LSE="*fp32", SCHED="*i32", GIDX="*i32", GFLAG="*i8")
    if kernel != "fwd":
        sig["DELTA"] = "*fp32"
    for name in fn.arg_names:
        if name.startswith("stride_") or name in ("H", "HK", "GROUPS", "NQ", "NK", "NG", "LEFT", "RIGHT"):
            sig[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
    constexprs: dict[str, object] = dict(
        CAUSAL=causal, HAS_GLOBAL=has_global and not gathered, GATHERED=gathered, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_DV=bd, HEAD_D=head_dim, HEAD_DV=head_dim, PREC=_precision(dtype),
    )  # fmt: skip
    return fn, sig, constexprs
