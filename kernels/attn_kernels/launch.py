"""The launch layer shared by the kernel families (fused softmax, FAVOR+).

- :class:`KernelConfig`: the tiles and launch options of one launch; :class:`LaunchShape`: what
  a family's ``keep`` predicate chooses its configs on.
- :func:`launch`: runs a kernel with the first of its kept configs (under the interpreter, or
  when only one is kept) or autotunes over them, at most :func:`autotune_cap` of them.
- :class:`LaunchOptions`: the non-tensor options every call carries; :func:`pad_pow2`: the
  padding of head dims and feature counts; :data:`loop_range`: the loop over runtime bounds
  that the kernels use.

Importable without Triton (the block schedules and configs are plain Python): only
:func:`launch` and :func:`autotuner` need it.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .env import AUTOTUNE_ENV, DIRECT_LAUNCH_ENV, interpreter_enabled, interpreter_range

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs without Triton still import the package
    triton = None
    tl = None

# Loops over runtime bounds (schedule rows, segments, head groups, global tokens) use this: the
# loop ``range`` compiles to, and under the interpreter one that Triton 3.6 can run too.
loop_range = interpreter_range if tl is None or interpreter_enabled() else tl.range


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel launch.

    ``block_m``: rows per program; ``block_n``: the step of the program's inner loop (key or query
    tiles of the softmax kernels; subclasses may name it otherwise, see ``INNER``).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    INNER: ClassVar[str] = "N"  # letter of the inner tile in ``name``

    @property
    def name(self) -> str:
        return f"M{self.block_m}-{self.INNER}{self.block_n}-w{self.num_warps}-s{self.num_stages}"

    def __str__(self) -> str:
        return self.name

    def tiles(self, row: str | None = "BLOCK_M", inner: str | None = "BLOCK_N") -> dict[str, int]:
        """The constexprs this config sets: ``block_m`` as ``row``, ``block_n`` as ``inner``
        (a kernel that takes no such tile passes None for it)."""
        out = {} if inner is None else {inner: self.block_n}
        if row is not None:
            out[row] = self.block_m
        return out


@dataclass(frozen=True)
class LaunchShape:
    """What a kernel family chooses its launch configs on; fields a family ignores keep their defaults."""

    head_dim: int  # max(D, Dv), not padded
    elem_bytes: int  # 2 (float16 / bfloat16) or 4 (float32)
    causal: bool
    n: int = 0  # softmax kernels: max(Nq, Nk)
    window: int | None = None  # softmax kernels: left + right + 1 of the band, None for full attention
    m_pad: int = 0  # FAVOR+ kernels: the random features, padded

    @property
    def fp32(self) -> bool:
        return self.elem_bytes == 4


@dataclass(frozen=True)
class LaunchSample:
    """A concrete launch, for compiling kernels ahead of time with the launcher's specialisation.

    Triton specialises each integer argument on its value (1 becomes a constant, multiples of 16
    get a divisibility hint), so the compiled code depends on the launch: the kernels'
    ``aot_spec`` functions give every integer argument its value in this launch. Contiguous
    ``(B, H, N, D)`` tensors, ``N = seq_len`` queries and keys, ``features`` random features
    (FAVOR+), ``num_global`` global tokens where a specialisation has them, decoding steps of
    ``new_tokens`` tokens after ``seq_len`` cached ones, and a GPU of ``sms`` SMs where the host
    sizes its grid to fill it.
    """

    batch: int = 2
    heads: int = 16
    kv_heads: int = 16
    seq_len: int = 4096
    features: int = 256
    num_global: int = 16
    new_tokens: int = 1
    sms: int = 132  # H100 SXM

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "kv_heads", "seq_len", "features", "new_tokens", "sms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if isinstance(self.num_global, bool) or not isinstance(self.num_global, int) or self.num_global < 0:
            raise ValueError(f"num_global must be an int >= 0, got {self.num_global!r}")

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def contiguous_strides(*shape: int) -> tuple[int, ...]:
    """The strides (in elements) of a contiguous tensor of ``shape``."""
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= size
    return tuple(reversed(out))


@dataclass(frozen=True)
class LaunchOptions:
    """Non-tensor options of one attention call, passed to the autograd function as one object."""

    causal: bool
    scale: float


def pad_pow2(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16 (the smallest ``tl.dot`` operand side)."""
    return max(16, 1 << (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0`` (``triton.cdiv`` without importing Triton)."""
    return -(-a // b)


@functools.cache
def autotune_cap() -> int | None:
    """At most this many configs are autotuned per kernel (``ATTN_TRITON_AUTOTUNE_MAX``; None: all).

    Each tried config is one compilation: a benchmark run on a time budget caps them (the first
    kept configs are the ones the ``ptxas`` calibration prefers). Read once per process (set it
    before the first launch; :func:`attn_kernels.refresh_environment` reads it again)."""
    text = os.environ.get(AUTOTUNE_ENV, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


_AUTOTUNED: dict[tuple, Any] = {}


def autotuner(
    fn: Any,
    configs: Sequence[KernelConfig],
    flags: Mapping[str, object],
    *,
    row: str | None = "BLOCK_M",
    inner: str | None = "BLOCK_N",
    tune_keys: Sequence[str] = (),
) -> Any:
    """``triton.autotune`` of ``fn`` over ``configs``, built once per (kernel, configs, tiles, flags).

    ``flags`` are the constexprs of the call site (each call site gets its own autotuner);
    ``tune_keys`` the arguments whose values start a new tuning (those ``fn`` does not take are
    dropped).
    """
    cache_key = (fn, tuple(configs), row, inner, tuple(sorted((k, str(v)) for k, v in flags.items())))
    tuned = _AUTOTUNED.get(cache_key)
    if tuned is None:
        tconfigs = [triton.Config(c.tiles(row, inner), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
        keys = [k for k in tune_keys if k in fn.arg_names]
        tuned = _AUTOTUNED[cache_key] = triton.autotune(configs=tconfigs, key=keys)(fn)
    return tuned


def launch(
    fn: Any,
    configs: Sequence[KernelConfig],
    grid: Callable[[Mapping[str, Any]], tuple[int, ...]],
    args: tuple,
    *,
    row: str | None = "BLOCK_M",
    inner: str | None = "BLOCK_N",
    tune_keys: Sequence[str] = (),
    **constexprs: Any,
) -> Any:
    """Launch ``fn(*args, **constexprs)`` with the tiles and options of ``configs``; returns the
    compiled kernel where one config ran directly (for a :class:`DirectLaunch`), else None.

    ``configs`` are the kept configs in order of preference (at most :func:`autotune_cap` are
    used). The first one runs directly under the interpreter or when it is the only one;
    otherwise they are autotuned (so a kernel launched with several must only store: the tuner
    reruns it). ``grid`` maps the constexprs of a launch (the tiles included) to the grid; ``row``
    and ``inner`` name the constexprs that take ``block_m`` and ``block_n``.
    """
    cap = autotune_cap()
    if interpreter_enabled() or len(configs) == 1 or cap == 1:
        cfg = configs[0]
        meta = {**constexprs, **cfg.tiles(row, inner)}
        return fn[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tuned = autotuner(fn, list(configs)[:cap], constexprs, row=row, inner=inner, tune_keys=tune_keys)
    tuned[grid](*args, **constexprs)
    return None


@functools.cache
def direct_launch_enabled() -> bool:
    """Whether :class:`DirectLaunch` handles may replace Triton's launch path (``ATTN_TRITON_DIRECT_LAUNCH=0``
    turns them off; read once per process, :func:`attn_kernels.refresh_environment` reads it again)."""
    return os.environ.get(DIRECT_LAUNCH_ENV, "1").strip() != "0" and _direct_launch_supported()


def _direct_launch_supported() -> bool:
    """The compiled kernel's ``run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata,
    enter_hook, exit_hook, *bound_args)`` form this module calls is the one of Triton 3.4 and later
    (``triton.knobs``); older releases keep the JIT launch path."""
    return triton is not None and hasattr(triton, "knobs")


def _hook_set(hook: Any) -> bool:
    """Whether a Triton launch hook would do something (Triton 3.6+ keeps an empty ``HookChain``)."""
    return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))


def current_stream(device: int) -> int:
    """The raw handle of the current CUDA stream of ``device``, as Triton's launcher takes it."""
    return triton.runtime.driver.active.get_current_stream(device)


class DirectLaunch:
    """A compiled Triton kernel launched without the JIT's per-call work (binding and specialising
    the arguments, the cache-key lookup, the launch-metadata dict).

    Made from the kernel a first, ordinary launch returned, for one call site at one
    specialisation: the caller keys its handles by everything Triton specialises on (the shapes,
    strides and dtypes that give the integer arguments their values, the 16-byte alignment of
    every pointer, the constexprs and the config), so a handle is only used where the JIT would
    pick the same compiled kernel. ``args`` are the launch's positional arguments; the
    constexprs (and defaults) follow in the kernel's parameter order, as the JIT passes them.
    Falls back (returns False) where a profiler hook is set.
    """

    __slots__ = ("device", "fn", "kernel", "tail")

    def __init__(self, fn: Any, kernel: Any, n_args: int, meta: Mapping[str, Any], device: int) -> None:
        params = list(inspect.signature(fn.fn).parameters.values())  # the kernel's Python function
        tail = []
        for param in params[n_args:]:
            if param.name in meta:
                tail.append(meta[param.name])
            elif param.default is not inspect.Parameter.empty:
                tail.append(param.default)
            else:
                raise TypeError(f"{param.name!r} of the kernel has no value")
        self.fn, self.kernel, self.tail, self.device = fn, kernel, tuple(tail), device

    def __call__(self, grid: tuple[int, ...], args: tuple) -> bool:
        """Launch on the current stream of the handle's device; False (nothing launched) where
        Triton's launch hooks are set, so the caller takes the JIT path."""
        knobs = triton.knobs.runtime
        if _hook_set(knobs.launch_enter_hook) or _hook_set(knobs.launch_exit_hook):
            return False
        kernel = self.kernel
        stream = current_stream(self.device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        run, function, packed = kernel.run, kernel.function, kernel.packed_metadata
        run(grid[0], g1, g2, stream, function, packed, None, None, None, *args, *self.tail)
        return True


__all__ = [
    "DirectLaunch",
    "KernelConfig",
    "LaunchOptions",
    "LaunchSample",
    "LaunchShape",
    "autotune_cap",
    "autotuner",
    "cdiv",
    "contiguous_strides",
    "direct_launch_enabled",
    "launch",
    "loop_range",
    "pad_pow2",
]
