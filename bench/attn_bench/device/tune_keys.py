"""The plan of ``attn-bench tune``: which kernels, at which launch shapes (:class:`TuneKey`), with
which candidate configs, and the pass each is timed in.

Three kernel families: the fused softmax kernels (``flash_*``), the chunked FAVOR+ kernels
(``favor_chunk_*``, :mod:`attn_kernels.favor_chunk`) and the legacy FAVOR+ kernels
(``favor_key_max`` ... ``favor_bwd_dkv``, :mod:`attn_kernels.favor`), plus ``favor_impl``: the switch
between the two FAVOR+ implementations, whose candidates are the implementations themselves
(each with its own default configs), timed forward and backward. It comes first in the plan, so a
device check's short tuning budget measures both FAVOR+ implementations before anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention_variants import masks
from attn_kernels import favor_chunk_configs, favor_configs, flash_configs, tuning
from attn_kernels.launch import KernelConfig, LaunchShape, pad_pow2

FLASH_KERNELS = ("flash_fwd", "flash_bwd")
LEGACY_KERNELS = ("favor_key_max", "favor_state", "favor_fwd", "favor_bwd_dq", "favor_bwd_dkv")
CHUNK_KERNELS = tuple("favor_" + k for k in favor_chunk_configs.CONFIGS)
FAVOR_KERNELS = ("favor_impl", *CHUNK_KERNELS, *LEGACY_KERNELS)
KERNELS = ("favor_impl", *FLASH_KERNELS, *CHUNK_KERNELS, *LEGACY_KERNELS)
# The pass each kernel is timed in: its own where it can be isolated; the legacy FAVOR+ state
# kernel runs in the forward and the backward, so it is timed in both, as is the FAVOR+ switch.
PASS = {"flash_fwd": "fwd", "flash_bwd": "bwd", "favor_key_max": "fwd", "favor_state": "fwd_bwd"}
PASS |= {"favor_fwd": "fwd", "favor_bwd_dq": "bwd", "favor_bwd_dkv": "bwd", "favor_impl": "fwd_bwd"}
PASS |= {
    k: "fwd" if k in ("favor_chunk_features", "favor_chunk_state", "favor_chunk_fwd") else "bwd" for k in CHUNK_KERNELS
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_DTYPES = ("bfloat16",)
DEFAULT_HEAD_DIMS = (128, 64)
DEFAULT_NS = (16384, 4096, 1024)
DEFAULT_WINDOWS = (None, 256)  # softmax kernels: full attention and the sweeps' band
DEFAULT_FEATURES = 256


@dataclass(frozen=True)
class TuneKey:
    """One table key to tune: ``kernel`` (see :data:`KERNELS`) at inputs of ``dtype``, head dim
    ``head_dim``, sequence length ``n``; ``window`` the sliding-window size ``w`` of the softmax
    kernels (None: full attention), ``features`` the random features of the FAVOR+ kernels."""

    kernel: str
    dtype: torch.dtype
    head_dim: int
    causal: bool
    n: int
    window: int | None = None
    features: int | None = None

    @property
    def family(self) -> str:
        return tuning.KERNEL_FAMILY[self.kernel]

    def shape(self) -> LaunchShape:
        """The launch shape the kernels see for this key's problem (the chunked FAVOR+ kernels:
        their feature dtype's width, float32 for float16 inputs timed with a backward)."""
        eb = torch.finfo(self.dtype).bits // 8
        if self.family == "favor_chunk":
            eb = favor_chunk_configs.feature_dtype(self.dtype, grad=PASS[self.kernel] != "fwd").itemsize
        if self.family.startswith("favor"):
            return LaunchShape(self.head_dim, eb, self.causal, m_pad=pad_pow2(self.features or DEFAULT_FEATURES))
        band = None
        if self.window is not None:  # as the sliding-window backend folds causal in and clamps
            left, right = masks.clamp_reach(*masks.window_bounds(self.window, self.causal), self.n, self.n)
            band = left + right + 1
        return LaunchShape(self.head_dim, eb, self.causal, n=self.n, window=band)

    @property
    def table_key(self) -> str:
        return tuning.shape_key(self.kernel, self.shape())

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        extra = f" w={self.window}" if self.window is not None else f" m={self.features}" if self.features else ""
        return f"{self.kernel} {dt} D={self.head_dim} {'causal' if self.causal else 'non-causal'}{extra} N={self.n}"


def plan(
    kernels: Sequence[str] = KERNELS,
    dtypes: Sequence[torch.dtype] = tuple(DTYPES[d] for d in DEFAULT_DTYPES),
    head_dims: Sequence[int] = DEFAULT_HEAD_DIMS,
    ns: Sequence[int] = DEFAULT_NS,
    windows: Sequence[int | None] = DEFAULT_WINDOWS,
    features: int = DEFAULT_FEATURES,
) -> list[TuneKey]:
    """The keys to tune, most important first (a run cut short loses the last): by head dim,
    then kernel, band, causal flag and N in the orders given. Keys that map to the same table
    entry are tuned once (the first wins: float16 and bfloat16 share the 16-bit entries, the
    FAVOR+ entries do not depend on N)."""
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"kernels must be among {', '.join(KERNELS)}, got {', '.join(unknown)}")
    for name, values in (("head_dims", head_dims), ("ns", ns)):
        if not values or any(not isinstance(x, int) or x < 1 for x in values):
            raise ValueError(f"{name} must be positive ints, got {list(values)}")
    keys: list[TuneKey] = []
    seen: set[tuple[str, str]] = set()
    for d in head_dims:
        for kernel in kernels:
            favor = tuning.KERNEL_FAMILY[kernel].startswith("favor")
            for dtype in dtypes:
                for window in (None,) if favor else windows:
                    for causal in (False, True):
                        for n in ns:
                            key = TuneKey(kernel, dtype, d, causal, n, window, features if favor else None)
                            if (kernel, key.table_key) not in seen:
                                seen.add((kernel, key.table_key))
                                keys.append(key)
    return keys


def candidates(key: TuneKey, capability: tuple[int, int]) -> list[KernelConfig | tuning.ImplChoice]:
    """The configs timed for ``key`` on a GPU of ``capability``, the heuristic default first
    (``favor_impl``: the implementations, the default one first)."""
    shape = key.shape()
    if key.family == "flash":
        return list(flash_configs.tune_candidates(shape, key.kernel == "flash_bwd", capability))
    if key.family == "favor_impl":
        impls = sorted(favor_chunk_configs.IMPLS, key=lambda i: i != favor_chunk_configs.DEFAULT_IMPL)
        return [tuning.ImplChoice(i) for i in impls]
    if key.family == "favor_chunk":
        return list(favor_chunk_configs.candidates(key.kernel.removeprefix("favor_"), shape))
    return list(favor_configs.heuristic_configs(key.kernel.removeprefix("favor_"), shape))


def heuristic_defaults(key: TuneKey, capability: tuple[int, int]) -> dict[str, KernelConfig | tuning.ImplChoice]:
    """The default config of every kernel of ``key``'s family at its shape on a GPU of
    ``capability`` (what runs today); a FAVOR+ kernel's defaults also force its implementation, so
    the kernel timed is the one that runs."""
    if key.family == "flash":
        shape = key.shape()
        return {k: flash_configs._select_gpu(shape, k == "flash_bwd", capability) for k in FLASH_KERNELS}
    out: dict[str, KernelConfig | tuning.ImplChoice] = {}
    if key.family in ("favor", "favor_impl"):
        shape = TuneKey(LEGACY_KERNELS[0], key.dtype, key.head_dim, key.causal, key.n, features=key.features).shape()
        out |= {k: favor_configs.heuristic_configs(k.removeprefix("favor_"), shape)[0] for k in LEGACY_KERNELS}
    if key.family in ("favor_chunk", "favor_impl"):
        for k in CHUNK_KERNELS:
            shape = TuneKey(k, key.dtype, key.head_dim, key.causal, key.n, features=key.features).shape()
            out[k] = favor_chunk_configs.candidates(k.removeprefix("favor_"), shape)[0]
    if key.family != "favor_impl":
        out["favor_impl"] = tuning.ImplChoice("chunk" if key.family == "favor_chunk" else "legacy")
    return out


def impl_choices(table: tuning.Table) -> dict[str, dict]:
    """Per ``favor_impl`` key of ``table``: the implementation chosen and the time of each one
    timed (ms, forward and backward), for the device check's summary."""
    out = {}
    for key, entry in sorted(table.entries.get("favor_impl", {}).items()):
        out[key] = {"chosen": entry.get("name"), "timings": dict(entry.get("timings") or {})}
    return out
