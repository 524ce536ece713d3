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

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

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
class FlashConfig(KernelConfig):
    """A :class:`~attn_kernels.launch.KernelConfig` of the softmax kernels.

    ``tma``: the forward loads its key and value tiles through TMA descriptors (Hopper's tensor
    memory accelerator, sm_90+) instead of pointer tiles: no address arithmetic, fewer registers.
    A launch whose tensors a descriptor cannot describe (a stride that is not a multiple of
    16 bytes) runs the first kept config without it (:func:`pointer_config`).

    ``bwd``, how a backward config launches (:data:`BWD_MODES`): ``""`` the dq kernel and the
    dk/dv kernel with the same tiles (``block_m`` query rows, ``block_n`` keys); ``"split"`` the
    dk/dv kernel with these tiles and the dq kernel with them transposed (:func:`dq_config`), so
    that a 32 x 128 config gives each kernel 128 rows of its own (the M of every product: wgmma
    on sm_90); ``"atomic"`` one kernel per key block that also adds ``dS K`` into a float32 dQ
    with atomics (5 products per tile pair instead of 7), or the ``"split"`` launches when
    PyTorch's deterministic algorithms are on.
    """

    tma: bool = False
    bwd: str = ""

    def __post_init__(self) -> None:
        if self.bwd not in BWD_MODES:
            raise ValueError(f"bwd must be one of {BWD_MODES}, got {self.bwd!r}")

    @property
    def name(self) -> str:
        return super().name + ("-tma" if self.tma else "") + (f"-{self.bwd}" if self.bwd else "")


BWD_MODES = ("", "split", "atomic")


def dq_config(cfg: FlashConfig) -> FlashConfig:
    """The config the dq kernel launches with for the backward config ``cfg``: the same tiles, or
    for ``"split"`` and ``"atomic"`` the tiles transposed (``block_n`` query rows, ``block_m`` keys)."""
    if not cfg.bwd:
        return cfg
    return FlashConfig(cfg.block_n, cfg.block_m, cfg.num_warps, cfg.num_stages)


SM90 = (9, 0)


@dataclass(frozen=True)
class Candidate:
    """A launch configuration and the inputs it is meant for: 16-bit or float32, head dims up to
    ``max_head_dim``, GPUs of compute capability ``min_capability`` or newer, and with
    ``full_only`` full attention only (a band, and with it global tokens, takes another)."""

    config: FlashConfig
    elem_bytes: int
    max_head_dim: int
    min_capability: tuple[int, int] = (0, 0)
    full_only: bool = False


# Candidates in order of preference; the first one that ``keep`` accepts is launched. The
# tiles follow FlashAttention-2 / the Triton tutorial, shrunk until ``ptxas`` reports no
# spills in the forward for sm_80 and sm_90 in the specialisation with the most live state
# (tests/test_flash_compile.py prints the numbers), under Triton 3.6 as well as the newest
# release. float32 uses IEEE products on the CUDA cores, hence its small tiles: it is the
# accuracy path, 16-bit inputs are the fast path. Head dims above 128: one stage for 16-bit
# inputs (two stages barely pipelined anything there and spilled under Triton 3.6), two for
# float32 (one stage spilled on sm_90 under Triton 3.6).
#
# sm_90 (16 bits, head dims up to 128): 128 x 128 tiles whose keys and values come by TMA, the
# shape of Triton's tutorial 06 on Hopper: wgmma only, about 4 instructions per key and warp in
# the interior loop, no spill (tests/test_flash_gates.py); full attention only, since with
# global tokens it spills. A band takes 64 x 64 tiles on 4 warps up to NARROW_BAND keys (a
# 128-row block would visit 64 more keys per row of the band) and 128 x 64 beyond.
NARROW_BAND = 1024
FWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(FlashConfig(128, 128, 8, 2, tma=True), 2, 128, SM90, full_only=True),
    Candidate(FlashConfig(64, 64, 4, 3, tma=True), 2, 128, SM90),
    Candidate(FlashConfig(128, 64, 8, 3, tma=True), 2, 128, SM90),
    Candidate(FlashConfig(128, 64, 8, 3), 2, 64),
    Candidate(FlashConfig(128, 32, 8, 2), 2, 128),
    Candidate(FlashConfig(32, 32, 8, 1), 2, 256),
    Candidate(FlashConfig(32, 16, 8, 1), 4, 128),
    Candidate(FlashConfig(32, 16, 8, 2), 4, 256),
)
# The backward holds more tiles live (q, k, v, dO and two accumulators): smaller tiles. On sm_90
# (16 bits, head dims up to 128) the dk/dv programs own 128 keys and step over 32 queries, the
# dq programs own 128 queries and step over 32 keys ("split": both kernels on wgmma).
BWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(FlashConfig(32, 128, 8, 3, bwd="split"), 2, 128, SM90),
    Candidate(FlashConfig(64, 32, 4, 2), 2, 64),
    Candidate(FlashConfig(32, 32, 4, 2), 2, 128),
    Candidate(FlashConfig(32, 32, 8, 1), 2, 256),
    Candidate(FlashConfig(16, 16, 4, 1), 4, 256),
)
# More candidates that ``attn-bench tune`` times on sm_90 and newer (never a heuristic default):
# the wider key tiles and deeper pipelines of the Hopper anchors (FlexAttention's and Triton
# tutorial 06's 128 x 64 with 3-4 stages), and the pointer-load forwards of earlier releases
# beside the TMA ones. Each forward here compiles without spills for sm_90 in the plain,
# global-token and key-padding specialisations at its largest head dim (the ptxas figures of
# tests/test_tuning.py), but M128-N64-w8-s4 under Triton 3.9. Backward spills are only timed
# against the defaults, as the compile test does.
TUNE_FWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(FlashConfig(128, 128, 8, 3, tma=True), 2, 128, SM90, full_only=True),
    Candidate(FlashConfig(128, 64, 8, 4), 2, 128, SM90),
    Candidate(FlashConfig(128, 32, 8, 3), 2, 128, SM90),
    Candidate(FlashConfig(64, 64, 8, 3), 2, 128, SM90),
    Candidate(FlashConfig(64, 64, 4, 3), 2, 64, SM90),
    Candidate(FlashConfig(64, 64, 4, 4), 2, 64, SM90),
)
TUNE_BWD_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(FlashConfig(16, 128, 8, 3, bwd="atomic"), 2, 128, SM90),
    Candidate(FlashConfig(32, 128, 8, 2, bwd="atomic"), 2, 128, SM90),
    Candidate(FlashConfig(128, 32, 8, 2), 2, 128, SM90),
    Candidate(FlashConfig(64, 32, 4, 3), 2, 128, SM90),
    Candidate(FlashConfig(64, 32, 8, 2), 2, 128, SM90),
    Candidate(FlashConfig(64, 64, 4, 2), 2, 64, SM90),
)
# Under the interpreter: small tiles with block_m != block_n, so that tests at N <= 200 cover
# several blocks, edge blocks and interior blocks of both shapes.
INTERPRETER_CONFIG = FlashConfig(32, 16, 4, 1)
# The small kernel that computes the backward's row term delta: 4096 elements per tile
# (block_m = 4096 / padded Dv rows; block_n is unused).
DELTA_CONFIG = KernelConfig(64, 16, 4, 1)


def delta_config(dv: int) -> KernelConfig:
    """Launch of the delta kernel for value head dim ``dv``: about 4096 elements per tile."""
    rows = max(16, min(128, 4096 // pad_pow2(dv)))
    return KernelConfig(rows, DELTA_CONFIG.block_n, DELTA_CONFIG.num_warps, DELTA_CONFIG.num_stages)


def keep(candidate: Candidate, shape: LaunchShape, capability: tuple[int, int] = (8, 0)) -> bool:
    """Whether ``candidate`` may run ``shape`` on a GPU of ``capability``: the predicate that
    prunes the candidate lists."""
    cfg = candidate.config
    if shape.elem_bytes != candidate.elem_bytes or shape.head_dim > candidate.max_head_dim:
        return False
    if capability < candidate.min_capability or (candidate.full_only and shape.window is not None):
        return False
    if shape.window is not None and shape.window <= 32 and cfg.block_n >= 64:
        return False  # a narrow band: most of a wide key tile would be masked
    if cfg.tma and cfg.block_m < 128 and not (shape.window is not None and shape.window <= NARROW_BAND):
        return False  # the 64-row TMA tiles are the narrow bands'
    return not (shape.n <= 64 and cfg.block_m >= 128)  # a short sequence: one small tile suffices


@functools.lru_cache(maxsize=128)
def gathered_config(cfg: FlashConfig) -> FlashConfig:
    """Launch of the gathered global rows: half the query tile (gathered row indices cost
    registers that the band kernel does not need; the compile tests showed spills otherwise)."""
    return dataclasses.replace(cfg, block_m=max(16, cfg.block_m // 2))


def _candidates(backward: bool, capability: tuple[int, int], tune: bool) -> tuple[Candidate, ...]:
    main = BWD_CANDIDATES if backward else FWD_CANDIDATES
    extra = (TUNE_BWD_CANDIDATES if backward else TUNE_FWD_CANDIDATES) if tune and capability >= SM90 else ()
    return main + extra


def _select_gpu(shape: LaunchShape, backward: bool, capability: tuple[int, int] = (8, 0)) -> FlashConfig:
    for candidate in _candidates(backward, capability, tune=False):
        if keep(candidate, shape, capability):
            return candidate.config
    raise AssertionError(f"no launch configuration for {shape}")  # the lists end with catch-alls


def earlier_config(shape: LaunchShape, backward: bool) -> FlashConfig:
    """The config ``shape`` launched before the sm_90 ones: an sm_80 card's, which every card ran
    until then (a tuning candidate on every card, so a run times it beside the new default)."""
    return _select_gpu(shape, backward, (8, 0))


def pointer_config(shape: LaunchShape, backward: bool, capability: tuple[int, int]) -> FlashConfig:
    """The first kept config that loads without TMA descriptors: what a launch runs when its
    tensors do not suit a descriptor."""
    for candidate in _candidates(backward, capability, tune=False):
        if not candidate.config.tma and keep(candidate, shape, capability):
            return candidate.config
    raise AssertionError(f"no launch configuration for {shape}")


def select_config(shape: LaunchShape, backward: bool, capability: tuple[int, int] = (8, 0)) -> FlashConfig:
    """The launch configuration for ``shape`` on a GPU of ``capability``: a fixed one under the
    interpreter; on a GPU the card's tuning table entry (:mod:`attn_kernels.tuning`) or else the
    first kept candidate."""
    kernel = "flash_bwd" if backward else "flash_fwd"
    forced = tuning.forced_config(kernel, shape)
    if forced is not None:
        return forced  # type: ignore[return-value]
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    allowed = lambda cfg: cfg in tune_candidates(shape, backward, (99, 0))  # any card's candidates
    tuned = tuning.lookup(kernel, shape, FlashConfig, allowed=allowed)
    return tuned or _select_gpu(shape, backward, capability)  # type: ignore[return-value]


def tune_candidates(shape: LaunchShape, backward: bool, capability: tuple[int, int]) -> list[FlashConfig]:
    """The configs ``attn-bench tune`` times for ``shape`` on a GPU of ``capability``: the heuristic
    default first, then every other kept candidate, the Hopper/Blackwell ones included from sm_90
    (today's defaults and the earlier releases' stay among them, so a run measures old and new)."""
    out = [_select_gpu(shape, backward, capability)]
    for c in _candidates(backward, capability, tune=True):
        if keep(c, shape, capability) and c.config not in out:
            out.append(c.config)
    return out


class Shipped(NamedTuple):
    """One launch the heuristic can make (:func:`shipped_configs`)."""

    kernel: str  # "fwd", "bwd_dq", "bwd_dkdv", "bwd_delta"
    config: KernelConfig
    head_dim: int  # the largest head dim the config serves (the most live state)
    dtype: torch.dtype  # bfloat16 for the 16-bit configs (the dtype the interpreter cannot check)
    archs: tuple[int, ...]  # (80, 90), or (90,) for the sm_90 ones
    full_only: bool  # never launched with a band (nor with global tokens)


def shipped_configs() -> list[Shipped]:
    """Every launch the heuristic ``select_config`` can make on a GPU. A backward config lists the
    dq kernel at its own tiles (:func:`dq_config`). The compile tests build each one (the sm_90
    tuning candidates: tests/test_tuning.py)."""
    out = []
    for backward, candidates in ((False, FWD_CANDIDATES), (True, BWD_CANDIDATES)):
        for c in candidates:
            dtype = torch.bfloat16 if c.elem_bytes == 2 else torch.float32
            archs = (90,) if c.min_capability >= SM90 else (80, 90)
            kernels = (("bwd_dq", dq_config(c.config)), ("bwd_dkdv", c.config)) if backward else (("fwd", c.config),)
            out += [Shipped(k, cfg, c.max_head_dim, dtype, archs, c.full_only) for k, cfg in kernels]
    delta = delta_config(MAX_HEAD_DIM)
    out += [Shipped("bwd_delta", delta, MAX_HEAD_DIM, dt, (80, 90), False) for dt in (torch.bfloat16, torch.float32)]
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
