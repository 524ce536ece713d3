"""Measuring one config: numerics gate, time, peak memory, FLOPs. Runs inside the worker process.

Time: ``torch.utils.benchmark.Timer.blocked_autorange`` on CPU (all intra-op threads; at least
``min_repeats`` timed calls), ``triton.testing.do_bench`` quantiles on CUDA. Both after a warm-up
call (which, for ``flex``, compiles; its wall time is recorded as ``compile_s``).

Noise: the spread of a row's timed calls, ``(p90 - p10) / median``, and the machine's load while
they ran (other processes' share of the CPUs, the load average; on CUDA the SM clock and other
processes on the card) are recorded with the time. A row whose spread is over
``RunSettings.noisy_spread``, or (CPU) that other processes shared over ``RunSettings.busy_share``
of its CPUs, or (CUDA) that shared its card with another process, is measured again, up to
``RunSettings.remeasure`` times; if it stays so it is ``noisy``, and the report leaves it out of
fits (exponents, crossovers).

Peak memory, in a separate pass after timing, as bytes allocated *beyond the inputs* during one
call (inputs exist before the pass starts and are not counted; outputs and gradients are):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  allocated bytes before the call.
- CPU: the PyTorch profiler with ``profile_memory=True``. Every allocation and free by
  PyTorch's CPU allocator during the call is an event with a signed size; the peak of their
  running sum, in time order, is the peak. It sees tensors PyTorch allocates (including
  autograd's saved tensors and the backward's temporaries), not memory a library allocates
  behind PyTorch's back (e.g. oneDNN/BLAS scratch buffers) nor the Python heap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import attention_variants as av
from attn_bench.core.config import BenchConfig, RunSettings

CPU_MEMORY_METHOD = "torch.profiler(profile_memory=True): peak of the running sum of CPU allocator events"

CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the inputs"

# A call at least this long (s) is timed one call per measurement, its first call included (the
# numerics check has already run it once).
LONG_CALL_S = 0.5


def pass_flops(fwd_flops: int, variant: av.AttentionVariant, pass_: str) -> int:
    """Analytic FLOPs of a pass (``fwd`` or ``fwd_bwd``) from the forward FLOPs, with the variant's
    declared ``backward_flops_ratio``."""
    if pass_ == "fwd":
        return int(fwd_flops)
    return round(fwd_flops * (1.0 + variant.backward_flops_ratio))


def time_fn(fn: Callable[[], object], device: torch.device, settings: RunSettings) -> tuple[float, float, float, int]:
    """``(median_ms, p10_ms, p90_ms, repeats)`` of ``fn()`` with the ecosystem's timers."""
    if device.type == "cuda":
        import triton.testing

        med, p10, p90 = triton.testing.do_bench(fn, quantiles=[0.5, 0.1, 0.9])
        return float(med), float(p10), float(p90), 0
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    first = timer.timeit(1).times[0]  # warm-up, and tells a long call from a short one
    if first >= LONG_CALL_S:
        # Long calls: one call per measurement (blocked_autorange would spend a discarded warm-up
        # call on estimating a block size of 1); stop at min_repeats or after max_timed_s.
        times = [first]
        while len(times) < settings.min_repeats and (len(times) < 2 or sum(times) < settings.max_timed_s):
            times.extend(timer.timeit(1).times)
    else:
        times = list(timer.blocked_autorange(min_run_time=settings.min_run_time).times)
        while len(times) < settings.min_repeats:
            times.extend(timer.timeit(1).times)
    arr = np.asarray(times) * 1e3
    return float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90)), len(times)


@dataclass(frozen=True)
class Timing:
    """A row's time (median, p10, p90 in ms, over ``repeats`` calls; 0 on CUDA, where do_bench
    decides), its ``spread`` ((p90 - p10) / median), the load while it was timed, the number of
    times it was measured again, and ``noisy`` with the reason (``why``) when it stayed disturbed."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    spread: float
    other_cpu: float | None = None  # other processes' share of this process's CPUs (0..1)
    load_avg: float | None = None  # 1-minute load average after the timing
    gpu_clock_mhz: float | None = None  # SM clock right after the timing (CUDA)
    gpu_others: int | None = None  # other processes on the card (CUDA)
    remeasured: int = 0
    noisy: bool = False
    why: str = ""

    def result_fields(self) -> dict:
        """The :class:`~attn_bench.core.config.BenchResult` fields of this timing."""
        return dict(
            time_ms=self.median_ms,
            time_ms_p10=self.p10_ms,
            time_ms_p90=self.p90_ms,
            repeats=self.repeats,
            spread=self.spread,
            noisy=self.noisy,
            remeasured=self.remeasured,
            other_cpu=self.other_cpu,
            load_avg=self.load_avg,
            gpu_clock_mhz=self.gpu_clock_mhz,
            gpu_others=self.gpu_others,
        )


def disturbance(t: Timing, device: torch.device, settings: RunSettings) -> str:
    """Why a timing cannot be taken as the row's behaviour (empty when it can): its spread, or
    the load of other processes (CPU: their share of the CPUs; CUDA: another process on the card)."""
    why = []
    if not t.spread <= settings.noisy_spread:  # NaN counts as over
        why.append(f"spread {t.spread:.2f} > {settings.noisy_spread:g}")
    if device.type != "cuda" and t.other_cpu is not None and t.other_cpu > settings.busy_share:
        why.append(f"other processes used {t.other_cpu:.0%} of the CPUs (> {settings.busy_share:.0%})")
    if device.type == "cuda" and t.gpu_others:
        why.append(f"{t.gpu_others} other process(es) on the GPU")
    return "; ".join(why)


def _over(t: Timing, device: torch.device, settings: RunSettings) -> float:
    """How far a timing is over its thresholds (at most 1: within them), to keep the least disturbed."""
    over = [t.spread / settings.noisy_spread if not math.isnan(t.spread) else math.inf]
    if device.type == "cuda":
        over.append(2.0 if t.gpu_others else 0.0)
    elif t.other_cpu is not None:
        over.append(t.other_cpu / settings.busy_share)
    return max(over)


def _timed_once(fn: Callable[[], object], device: torch.device, settings: RunSettings) -> Timing:
    from attn_bench.core.load import cpu_sample, gpu_state, load_average, other_cpu_share

    before = cpu_sample()
    med, p10, p90, reps = time_fn(fn, device, settings)
    after = cpu_sample()
    clock, others = gpu_state(device) if device.type == "cuda" else (None, None)
    spread = (p90 - p10) / med if med > 0 else math.nan
    return Timing(med, p10, p90, reps, spread, other_cpu_share(before, after), load_average(), clock, others)


def measure_time(fn: Callable[[], object], device: torch.device, settings: RunSettings) -> Timing:
    """Time ``fn`` (:func:`time_fn`) with the load; measure again while :func:`disturbance` finds
    a reason, up to ``settings.remeasure`` times. Keeps the least disturbed measurement (the
    smallest of spread and load, each over its threshold); ``noisy`` when even that is disturbed."""

    best = None
    for attempt in range(1 + max(0, settings.remeasure)):
        t = _timed_once(fn, device, settings)
        if best is None or _over(t, device, settings) < _over(best, device, settings):
            best = t
        why = disturbance(best, device, settings)
        if not why:
            return dataclasses.replace(best, remeasured=attempt)
    assert best is not None
    return dataclasses.replace(best, remeasured=max(0, settings.remeasure), noisy=True, why=why)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated beyond what already exists while ``fn()`` runs (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return int(torch.cuda.max_memory_allocated(device) - base)
    return cpu_peak_memory(fn)


def cpu_peak_memory(fn: Callable[[], object]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return int(peak)


def make_inputs(cfg: BenchConfig, seed: int, requires_grad: bool):
    """Standard normal q, k, v (and dout), drawn on the config's device (a CPU draw of 64k-token
    inputs costs seconds per row on a GPU machine), reproducible from ``seed``."""
    dev = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    shape_q = (cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.kv_heads, cfg.seq_len, cfg.head_dim)

    def draw(shape):
        return torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    q, k, v = draw(shape_q), draw(shape_kv), draw(shape_kv)
    dout = draw(shape_q) if requires_grad else None
    return q, k, v, dout


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "defaultcpuallocator" in text
