"""The machine's measured ceilings, and the check that no published rate exceeds them.

Attention's analytic FLOPs are matrix-product FLOPs, so no row can run them faster than the
machine multiplies matrices: a rate above the measured GEMM ceiling means the FLOP count or the
timing is wrong, and such a row is an error, not a result. The ceiling of a row is the best GEMM
rate of this process's device in the row's dtype or in float32 (CPU) / bfloat16 (CUDA, the fastest
dense dtype a row runs in), whichever is higher, measured the first time a row needs it (a
fraction of a second) and again before a row is refused, so that a ceiling taken while the
machine was busy does not refuse a row timed while it was quiet. A row must exceed it by
:data:`SLACK` to be refused.

The copy bandwidth is measured too, for the record (``metadata.json`` and the report); rows are
not gated on it, since a small problem runs from cache at more than memory bandwidth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

SLACK = 1.5
"""A row is refused when its rate is above this multiple of the ceiling (timing noise aside, no
row comes near it: SDPA on a CPU runs at about 0.9 of the GEMM rate)."""
CPU_GEMM_N = 1024
CUDA_GEMM_N = 4096
COPY_BYTES = 1 << 26  # 64 MiB each way on the CPU; 1 GiB on CUDA
BEST_OF = 5

_GEMM: dict[tuple[str, str], float] = {}  # (device, dtype) -> best FLOP/s seen in this process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int = BEST_OF, budget_s: float = 1.0) -> float:
    """The fastest of ``repeats`` calls of ``fn`` (after one warm-up), stopping early once
    ``budget_s`` is spent: a ceiling is a best case."""
    fn()
    _sync(device)
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def gemm_flops_per_s(device: torch.device | str, dtype: torch.dtype, *, fresh: bool = False) -> float:
    """The best square-matmul rate (FLOP/s) of ``device`` in ``dtype`` measured in this process;
    ``fresh`` measures again (the best of all measurements is kept)."""
    device = torch.device(device)
    key = (str(device), str(dtype))
    if fresh or key not in _GEMM:
        n = CUDA_GEMM_N if device.type == "cuda" else CPU_GEMM_N
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        with torch.no_grad():
            seconds = _best_seconds(lambda: torch.matmul(a, b), device)
        _GEMM[key] = max(_GEMM.get(key, 0.0), 2 * n**3 / seconds)
    return _GEMM[key]


def copy_bytes_per_s(device: torch.device | str) -> float:
    """The best copy bandwidth of ``device`` (bytes read + written per second)."""
    device = torch.device(device)
    n = (COPY_BYTES if device.type == "cpu" else 1 << 30) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), device)


def _ceiling_dtypes(device: torch.device, dtype: torch.dtype) -> list[torch.dtype]:
    fastest = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [fastest] if dtype == fastest else [fastest, dtype]


def flops_ceiling(device: torch.device | str, dtype: torch.dtype, *, fresh: bool = False) -> float:
    """The FLOP/s no row on ``device`` in ``dtype`` can exceed (see the module docstring)."""
    device = torch.device(device)
    return max(gemm_flops_per_s(device, d, fresh=fresh) for d in _ceiling_dtypes(device, dtype))


def rate_problem(tflops: float | None, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None if ``tflops`` (TFLOP/s) is possible on ``device`` in ``dtype``, else the reason."""
    if tflops is None or not tflops > 0:
        return None
    rate = tflops * 1e12
    if rate <= SLACK * flops_ceiling(device, dtype):
        return None
    ceiling = flops_ceiling(device, dtype, fresh=True)  # measured again, now: the machine may have been busy
    if rate <= SLACK * ceiling:
        return None
    return (
        f"impossible rate: {rate / 1e9:.4g} GFLOP/s is {rate / ceiling:.3g}x this machine's measured "
        f"matmul ceiling ({ceiling / 1e9:.4g} GFLOP/s); the FLOP count or the timing is wrong"
    )


@dataclass(frozen=True)
class Ceilings:
    """What a run records of its machine's ceilings (``metadata.json``)."""

    gemm_gflops: dict[str, float]
    copy_gb_s: float
    method: str

    def to_json(self) -> dict:
        return {"gemm_gflops": self.gemm_gflops, "copy_gb_s": self.copy_gb_s, "method": self.method}


def measure(device: torch.device | str, dtypes: list[torch.dtype]) -> Ceilings:
    """The GEMM ceiling of each of ``dtypes`` (and of the device's fastest) and the copy bandwidth."""
    device = torch.device(device)
    wanted = list(dict.fromkeys(d for dtype in dtypes for d in _ceiling_dtypes(device, dtype)))
    gemm = {str(d).removeprefix("torch."): round(gemm_flops_per_s(device, d) / 1e9, 1) for d in wanted}
    n = CUDA_GEMM_N if device.type == "cuda" else CPU_GEMM_N
    size = "1 GiB" if device.type == "cuda" else f"{COPY_BYTES >> 20} MiB"
    method = (
        f"best of {BEST_OF} timed calls after a warm-up, {torch.get_num_threads()} threads: "
        f"a {n}^3 torch.matmul per dtype, and a {size} float32 copy (bytes read + written)"
    )
    return Ceilings(gemm, round(copy_bytes_per_s(device) / 1e9, 1), method)
