"""Launch configurations of the chunked FAVOR+ kernels, and the switch between the two FAVOR+
implementations (plain Python and torch).

``favor_impl``: ``"chunk"`` (:mod:`attn_kernels.favor_chunk`, the default) or ``"legacy"``
(:mod:`attn_kernels.favor`, the kernels that fuse the feature map into every pass). The tuner
times both and its table may pick either per launch shape (:func:`impl`).

Every chunked kernel launches with one config: the one the tuner forces, else the card's table
entry, else :data:`DEFAULTS` (chosen from ``ptxas`` results for sm_90, see docs/kernels.md),
else the first of :data:`CONFIGS` that :func:`valid` accepts. There is no autotuning at launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import tuning
from .launch import KernelConfig, LaunchShape, pad_pow2

CHUNK = 64  # positions per chunk (keys and queries of the causal form; rows of the feature pass)
IMPLS = ("chunk", "legacy")
DEFAULT_IMPL = "chunk"

# Terms of the 16-bit projection per input dtype: one product. Its logit error (about 2^-9 of a
# logit in bfloat16) is below the bound that the same-dtype PyTorch computation sets; the float32
# feature path (float32 inputs, float16 inputs when a gradient is wanted) takes one tf32x3 product.
N_SPLIT = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 0}


def feature_dtype(dtype: torch.dtype, grad: bool) -> torch.dtype:
    """The dtype of the features and states for inputs of ``dtype``: the input's 16-bit dtype,
    or float32 for float32 inputs and for float16 inputs whose gradient is wanted.

    float16 gradients are held to 3x the error of PyTorch's float32 computation (its float16 one
    overflows), which 16-bit features and states cannot meet with margin (simulated: 0.84 of the
    bound with all-float16 operands, 0.5 with float32 ones); bfloat16's own bound is loose.
    """
    if dtype == torch.float32 or (dtype == torch.float16 and grad):
        return torch.float32
    return dtype


@dataclass(frozen=True)
class ChunkConfig(KernelConfig):
    """A config of a chunked kernel: ``block_m`` the row (query) block, or the feature block of a
    state kernel; ``block_n`` the feature block, or the value block of a state kernel."""

    INNER = "F"


# Candidates per kernel, in order of preference. The feature pass and dK/dV take CHUNK rows; the
# causal query passes take one chunk per program. Left out after compiling them for sm_90 (Triton
# 3.6 and 3.9, see docs/kernels.md): 32-row tiles (mma.sync instead of wgmma) and 8 warps on 64
# rows for the kernels that project (both warpgroups computed the same projection).
CONFIGS: dict[str, tuple[ChunkConfig, ...]] = {
    "chunk_features": (ChunkConfig(64, 64, 4, 2), ChunkConfig(64, 32, 4, 2), ChunkConfig(64, 128, 8, 2)),
    "chunk_state": (
        ChunkConfig(64, 64, 4, 2),
        ChunkConfig(64, 32, 4, 2),
        ChunkConfig(64, 64, 4, 3),
        ChunkConfig(64, 128, 8, 2),
        ChunkConfig(128, 64, 8, 2),
    ),
    "chunk_fwd": (
        ChunkConfig(64, 32, 4, 2),
        ChunkConfig(64, 64, 4, 2),
        ChunkConfig(128, 64, 8, 2),
        ChunkConfig(128, 32, 8, 2),
    ),
    "chunk_dq": (ChunkConfig(64, 32, 4, 2), ChunkConfig(64, 64, 4, 2), ChunkConfig(128, 32, 8, 2)),
    "chunk_dk": (ChunkConfig(64, 32, 4, 2), ChunkConfig(64, 64, 4, 2)),
    "chunk_dv": (ChunkConfig(64, 64, 4, 2), ChunkConfig(64, 64, 8, 2), ChunkConfig(64, 32, 4, 2)),
    "chunk_state_bwd": (
        ChunkConfig(64, 64, 4, 2),
        ChunkConfig(64, 32, 4, 2),
        ChunkConfig(64, 64, 4, 3),
        ChunkConfig(64, 128, 8, 2),
    ),
}
STATE_KERNELS = ("chunk_state", "chunk_state_bwd")  # block_m: features, block_n: values
ROW_KERNELS = ("chunk_fwd", "chunk_dq")  # block_m: query rows

# Defaults where the first valid candidate is not the choice, per (kernel, float32 feature path,
# padded head dim, causal): from the sm_90 compile results of bfloat16 at 256 features (Triton
# 3.6 and 3.9, runtime-like integer specialisation; docs/kernels.md): no spills in either, fewest
# loop instructions per unit of work. Non-causal query passes take 128 rows on 8 warps (two
# warpgroups, half the loop instructions per row of 64 rows on 4 warps).
DEFAULTS: dict[tuple[str, bool, int, bool], ChunkConfig] = {
    ("chunk_fwd", False, 64, False): ChunkConfig(128, 64, 8, 2),
    ("chunk_fwd", False, 128, False): ChunkConfig(128, 64, 8, 2),
    ("chunk_dq", False, 64, False): ChunkConfig(128, 32, 8, 2),
    ("chunk_dq", False, 128, False): ChunkConfig(128, 32, 8, 2),
    ("chunk_dv", False, 128, False): ChunkConfig(64, 64, 8, 2),
    ("chunk_dv", False, 128, True): ChunkConfig(64, 64, 8, 2),
}


def valid(kernel: str, cfg: ChunkConfig, shape: LaunchShape) -> bool:
    """Whether ``cfg`` can run ``kernel`` at ``shape`` (tiles within the padded sizes; causal query
    blocks of exactly one chunk)."""
    m_pad, dv_pad = shape.m_pad, pad_pow2(shape.head_dim)
    if kernel in STATE_KERNELS:
        return cfg.block_m <= m_pad and cfg.block_n <= dv_pad
    if cfg.block_n > m_pad:
        return False
    if kernel in ROW_KERNELS:
        return cfg.block_m == CHUNK if shape.causal else cfg.block_m in (64, 128)
    return cfg.block_m == CHUNK


def candidates(kernel: str, shape: LaunchShape) -> list[ChunkConfig]:
    """The configs of ``kernel`` that can run ``shape``, the default first (never empty)."""
    kept = [c for c in CONFIGS[kernel] if valid(kernel, c, shape)]
    if not kept:  # feature or value blocks wider than the padded sizes: clip the first one
        first = CONFIGS[kernel][0]
        block_n = min(first.block_n, shape.m_pad if kernel not in STATE_KERNELS else pad_pow2(shape.head_dim))
        block_m = min(first.block_m, shape.m_pad) if kernel in STATE_KERNELS else first.block_m
        kept = [ChunkConfig(block_m, block_n, first.num_warps, first.num_stages)]
    default = DEFAULTS.get((kernel, shape.fp32, pad_pow2(shape.head_dim), shape.causal))
    if default is not None and default in kept:
        kept.remove(default)
        kept.insert(0, default)
    return kept


@functools.lru_cache(maxsize=512)
def _chosen(kernel: str, shape: LaunchShape, device: torch.device, generation: int) -> ChunkConfig:
    name = "favor_" + kernel
    cands = candidates(kernel, shape)
    cfg = tuning.forced_config(name, shape)  # also records the launch shape for the tuner
    if cfg is None and device.type == "cuda":
        cfg = tuning.lookup(name, shape, ChunkConfig, allowed=lambda c: c in cands)
    return cfg if cfg is not None else cands[0]  # type: ignore[return-value]


def config(kernel: str, shape: LaunchShape, device: torch.device) -> ChunkConfig:
    """The one config ``kernel`` launches with at ``shape`` on ``device``: forced by the tuner,
    else the card's table, else the default. Cached per shape, device and tuning generation."""
    return _chosen(kernel, shape, device, tuning.generation())


@functools.lru_cache(maxsize=256)
def _impl(shape: LaunchShape, device: torch.device, generation: int) -> str:
    choice = tuning.forced_config("favor_impl", shape)
    if choice is None and device.type == "cuda":
        choice = tuning.lookup("favor_impl", shape, tuning.ImplChoice)
    if isinstance(choice, tuning.ImplChoice) and choice.impl in IMPLS:
        return choice.impl
    return DEFAULT_IMPL


def impl(shape: LaunchShape, device: torch.device) -> str:
    """Which FAVOR+ implementation runs at ``shape`` on ``device``: forced by the tuner, else the
    card's table (``favor_impl``), else :data:`DEFAULT_IMPL`."""
    return _impl(shape, device, tuning.generation())


def impl_for(key: tuple) -> str:
    """:func:`impl` for a call: ``key = (D, Dv, dtype, causal, m, device)``, cached as it is."""
    return _impl_for(key, tuning.generation())


@functools.lru_cache(maxsize=256)
def _impl_for(key: tuple, generation: int) -> str:
    d, dv, dtype, causal, m, device = key
    return impl(LaunchShape(max(d, dv), dtype.itemsize, causal, m_pad=pad_pow2(m)), device)
