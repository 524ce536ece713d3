"""Constants and launch configurations of the fused FAVOR+ kernels (plain Python and torch).

A list of configs per kernel, pruned by :func:`keep` for the launch shape; on a GPU the card's
tuning table entry runs when there is one (:mod:`attn_kernels.tuning`), else the kept configs are
autotuned (at most ``ATTN_TRITON_AUTOTUNE_MAX`` of them); under the interpreter the first kept
one runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import tuning
from .launch import KernelConfig, LaunchShape, pad_pow2

RELU_EPS = 1e-3  # the ``+ 1e-3`` of the relu feature map (attention_variants.performer.RELU_EPS)
CHUNK = 64  # chunk length of the causal kernels (positions)
BLOCK_ROWS = 64  # rows per program of the non-causal kernels
MAX_FEATURES = 1024
MAX_HEAD_DIM = 128
# Rows whose normaliser falls below this get their backward psi = phi / den computed with this
# floor instead (a damped gradient) so the query-side states cannot overflow float32.
DEN_FLOOR = 1e-30
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Terms of the split projection per input dtype (0: float32 and three-TF32 products). Two bfloat16
# terms carry 16 bits of Ws: a logit error near 1e-4, far below bfloat16's own rounding.
N_SPLIT = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 2}


def precisions(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs fixing the product precisions for inputs of ``dtype`` (see :mod:`attn_kernels.favor`)."""
    # float16 takes tf32x3 too: its backward subtracts near-equal products (dO S^T - delta z) whose
    # TF32 rounding put dQ 1.4-1.7x over the bound on an H200; bfloat16's own rounding hides it.
    return {"N_SPLIT": N_SPLIT[dtype], "DOT_PREC": "tf32" if dtype == torch.bfloat16 else "tf32x3"}


@dataclass(frozen=True)
class FeatureConfig(KernelConfig):
    """A :class:`~attn_kernels.launch.KernelConfig` whose inner tile is a block of random features.

    ``block_m``: rows per program (queries of ``fwd`` and ``bwd_dq``, keys of ``bwd_dkv``; a
    divisor of ``CHUNK`` when causal); the ``key_max`` and ``state`` kernels take their rows from
    the algorithm (``BLOCK_ROWS`` / ``CHUNK``) and ignore it. ``block_n``, also ``block_f``:
    features per step.
    """

    INNER = "F"

    @property
    def block_f(self) -> int:
        return self.block_n


CONFIGS: dict[str, tuple[FeatureConfig, ...]] = {
    "key_max": (FeatureConfig(64, 64, 4, 2), FeatureConfig(64, 32, 4, 2), FeatureConfig(64, 32, 8, 2)),
    "state": (
        FeatureConfig(64, 64, 4, 2),
        FeatureConfig(64, 32, 4, 2),
        FeatureConfig(64, 32, 8, 1),
        FeatureConfig(64, 16, 8, 1),
    ),
    # Left out after running every config alone on an H200 (Triton 3.6, head dim 64, 256 features,
    # tests/test_favor_gpu.py::test_every_config): fwd M64-F16-w8-s2 reads shared memory out of
    # bounds with float32 inputs; bwd_dq and bwd_dkv M64-F32-w8-s1 return garbage (relative error
    # 1e20 and more) for bfloat16 and fault when causal. The interpreter cannot see either.
    "fwd": (
        FeatureConfig(64, 32, 4, 2),
        FeatureConfig(64, 64, 8, 2),
        FeatureConfig(32, 32, 8, 2),
        FeatureConfig(32, 32, 4, 2),
        FeatureConfig(16, 16, 8, 1),
    ),
    "bwd_dq": (FeatureConfig(32, 32, 8, 1), FeatureConfig(16, 16, 4, 1)),
    "bwd_dkv": (FeatureConfig(32, 32, 8, 1), FeatureConfig(16, 16, 8, 1)),
}
# The constexpr that takes ``block_m``, for the kernels that take one.
ROW_BLOCK = {"fwd": "BLOCK_M", "bwd_dq": "BLOCK_M", "bwd_dkv": "BLOCK_N"}
# Autotuning keys (those among a kernel's arguments): the padded sizes. The flags are constexprs
# fixed per call site, and each call site gets its own autotuner.
TUNE_KEYS = ("D_PAD", "DV_PAD", "M_PAD")


def keep(kernel: str, cfg: FeatureConfig, shape: LaunchShape) -> bool:
    """Whether ``cfg`` is worth launching for ``shape`` (calibrated on ``ptxas -v`` for sm_80/sm_90).

    A feature block wider than the padded features only wastes work. The register model: the
    rows a program holds (its row block, plus the diagonal chunk of ``CHUNK`` keys when causal)
    times the padded head dim, per warp, must fit a budget that float32 inputs halve (their
    three-TF32 products split every operand); float32 inputs also keep feature blocks to 32.
    """
    if cfg.block_f > shape.m_pad:
        return False
    rows = cfg.block_m if kernel in ROW_BLOCK else BLOCK_ROWS
    if shape.causal and kernel in ROW_BLOCK:
        if CHUNK % cfg.block_m or cfg.block_f > 32:
            return False
        rows += CHUNK
    if shape.fp32 and cfg.block_f > (16 if kernel == "state" else 32):
        return False
    budget = 512 if shape.fp32 else 1024
    return rows * pad_pow2(shape.head_dim) // cfg.num_warps <= budget


def kept_configs(kernel: str, shape: LaunchShape) -> list[FeatureConfig]:
    """The configs to launch ``kernel`` with: the one the tuner forces or the card's table holds,
    else :func:`heuristic_configs` (never empty)."""
    name = "favor_" + kernel
    chosen = tuning.forced_config(name, shape)
    if chosen is None:
        chosen = tuning.lookup(name, shape, FeatureConfig, allowed=lambda c: c in heuristic_configs(kernel, shape))
    if chosen is not None:
        return [chosen]  # type: ignore[list-item]
    return heuristic_configs(kernel, shape)


def heuristic_configs(kernel: str, shape: LaunchShape) -> list[FeatureConfig]:
    """The configs of ``kernel`` that :func:`keep` accepts, in list order (never empty)."""
    kept = [c for c in CONFIGS[kernel] if keep(kernel, c, shape)]
    if not kept:  # the narrowest config (most warps), its feature block clipped to m_pad
        narrow = min(CONFIGS[kernel], key=lambda c: (c.block_m, c.block_f, -c.num_warps))
        kept = [replace(narrow, block_n=min(narrow.block_f, shape.m_pad))]
    return kept
