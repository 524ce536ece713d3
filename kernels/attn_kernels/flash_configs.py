"""Launch configurations and block schedules of the fused softmax kernels (plain Python and torch).

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

With global tokens the schedules also list the programs of the gathered global rows (keys);
see :mod:`attn_kernels.flash_attention` for how the launches split the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import tuning
from .env import interpreter_enabled
from .launch import KernelConfig, LaunchShape, pad_pow2

MAX_HEAD_DIM = 256
MIN_HEAD_DIM = 1
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Precision of tl.dot: IEEE float32 products for float32 inputs (no TF32, so float32 is as
# accurate as PyTorch's float32 matmul); for float16/bfloat16 inputs the setting has no effect
# (their products are exact in the float32 accumulator).
DOT_PRECISION = "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PREC`` constexpr of the kernels for inputs of ``dtype``."""
    return DOT_PRECISION


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------


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
# More candidates that ``attn-bench tune`` times on sm_90 and newer (never a heuristic default):
# the wider key tiles and deeper pipelines of the Hopper anchors (FlexAttention's and Triton
# tutorial 06's 128 x 64 with 3-4 stages). Each forward here compiles without spills for sm_90
# in the plain, global-token and key-padding specialisations at its largest head dim (the
# ptxas figures of tests/test_tuning.py). Key tiles of 128 spilled in every tile tried
# (M64/M128, 4/8 warps, D 64/128), M128-N64-w8-s3 by 48 B with global tokens at D 128, so they
# are left out. Backward spills are only timed against the defaults, as the compile test does.
TUNE_FWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(KernelConfig(128, 64, 8, 4), 2, 128),
    Candidate(KernelConfig(128, 32, 8, 3), 2, 128),
    Candidate(KernelConfig(64, 64, 8, 3), 2, 128),
    Candidate(KernelConfig(64, 64, 4, 3), 2, 64),
    Candidate(KernelConfig(64, 64, 4, 4), 2, 64),
)
TUNE_BWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(KernelConfig(128, 32, 8, 2), 2, 128),
    Candidate(KernelConfig(64, 32, 4, 3), 2, 128),
    Candidate(KernelConfig(64, 32, 8, 2), 2, 128),
    Candidate(KernelConfig(64, 64, 4, 2), 2, 64),
)
# Under the interpreter: small tiles with block_m != block_n, so that tests at N <= 200 cover
# several blocks, edge blocks and interior blocks of both shapes.
INTERPRETER_CONFIG = KernelConfig(32, 16, 4, 1)
# The small kernel that computes the backward's row term delta: 4096 elements per tile
# (block_m = 4096 / padded Dv rows; block_n is unused).
DELTA_CONFIG = KernelConfig(64, 16, 4, 1)


def delta_config(dv: int) -> KernelConfig:
    """Launch of the delta kernel for value head dim ``dv``: about 4096 elements per tile."""
    rows = max(16, min(128, 4096 // pad_pow2(dv)))
    return KernelConfig(rows, DELTA_CONFIG.block_n, DELTA_CONFIG.num_warps, DELTA_CONFIG.num_stages)


def keep(candidate: Candidate, shape: LaunchShape) -> bool:
    """Whether ``candidate`` may run ``shape``: the predicate that prunes the candidate lists."""
    cfg = candidate.config
    if shape.elem_bytes != candidate.elem_bytes or shape.head_dim > candidate.max_head_dim:
        return False
    if shape.window is not None and shape.window <= 32 and cfg.block_n >= 64:
        return False  # a narrow band: most of a wide key tile would be masked
    return not (shape.n <= 64 and cfg.block_m >= 128)  # a short sequence: one small tile suffices


def gathered_config(cfg: KernelConfig) -> KernelConfig:
    """Launch of the gathered global rows: half the query tile (gathered row indices cost
    registers that the band kernel does not need; the compile tests showed spills otherwise)."""
    return KernelConfig(max(16, cfg.block_m // 2), cfg.block_n, cfg.num_warps, cfg.num_stages)


def _select_gpu(shape: LaunchShape, backward: bool) -> KernelConfig:
    for candidate in BWD_CANDIDATES if backward else FWD_CANDIDATES:
        if keep(candidate, shape):
            return candidate.config
    raise AssertionError(f"no launch configuration for {shape}")  # the lists end with catch-alls


def select_config(shape: LaunchShape, backward: bool) -> KernelConfig:
    """The launch configuration for ``shape``: a fixed one under the interpreter; on a GPU the
    card's tuning table entry (:mod:`attn_kernels.tuning`) or else the first kept candidate."""
    kernel = "flash_bwd" if backward else "flash_fwd"
    forced = tuning.forced_config(kernel, shape)
    if forced is not None:
        return forced
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    allowed = lambda cfg: cfg in tune_candidates(shape, backward, (99, 0))  # any card's candidates
    return tuning.lookup(kernel, shape, allowed=allowed) or _select_gpu(shape, backward)


def tune_candidates(shape: LaunchShape, backward: bool, capability: tuple[int, int]) -> list[KernelConfig]:
    """The configs ``attn-bench tune`` times for ``shape`` on a GPU of ``capability``: the heuristic
    default first, then every other kept candidate, the Hopper/Blackwell ones included from sm_90."""
    extra = (TUNE_BWD_CANDIDATES if backward else TUNE_FWD_CANDIDATES) if capability >= (9, 0) else ()
    out = [_select_gpu(shape, backward)]
    for c in (*(BWD_CANDIDATES if backward else FWD_CANDIDATES), *extra):
        if keep(c, shape) and c.config not in out:
            out.append(c.config)
    return out


def shipped_configs() -> list[tuple[str, KernelConfig, int, torch.dtype]]:
    """``(kernel, config, head dim, dtype)`` of every launch the heuristic ``select_config`` can
    make on a GPU, at the largest head dim the config serves (the most live state); 16-bit configs
    are listed with bfloat16, the dtype the interpreter cannot check. The compile tests build each
    one (the sm_90 tuning candidates: tests/test_tuning.py)."""
    out = []
    for kernels, candidates in ((("fwd",), FWD_CANDIDATES), (("bwd_dq", "bwd_dkdv"), BWD_CANDIDATES)):
        for c in candidates:
            dtype = torch.bfloat16 if c.elem_bytes == 2 else torch.float32
            out.extend((kernel, c.config, c.max_head_dim, dtype) for kernel in kernels)
    delta = delta_config(MAX_HEAD_DIM)
    out.extend(("bwd_delta", delta, MAX_HEAD_DIM, dtype) for dtype in (torch.bfloat16, torch.float32))
    return out


# ---------------------------------------------------------------------------------------------
# Host-side block schedules (plain torch; unit-tested against masks.dense_mask)
# ---------------------------------------------------------------------------------------------


def band_reach(window: tuple[int, int] | None, nq: int, nk: int) -> tuple[int, int]:
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
    left, right = band_reach(window, nq, nk)
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
    left, right = band_reach(window, nq, nk)
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
