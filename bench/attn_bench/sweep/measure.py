"""One sweep config measured: the variant built, inputs made, the numerics gate run, then time
and memory of the pass (``fwd``, ``fwd_bwd``; ``decode`` goes to :mod:`attn_bench.decode.run`).
Every failure becomes a row with a status and a reason."""

from __future__ import annotations

import dataclasses
import math
import time

import torch

import attention_variants as av
from attn_bench.baselines.registry import dense_bytes, make_target
from attn_bench.baselines.target import Unsupported
from attn_bench.core.ceilings import rate_problem
from attn_bench.core.config import BenchConfig, BenchResult, RunSettings
from attn_bench.core.measure import Timing, is_oom, make_inputs, measure_time, pass_flops, peak_memory
from attn_bench.core.numerics import check_target

# Added to every output when nonzero: fault injection for the harness's own tests (see core/worker.py).
PERTURB = 0.0


def with_timing(res: BenchResult, timed: list[Timing]) -> BenchResult:
    """``res`` with the noise record of its (last) timing: spread, load, re-measurements, ``noisy``
    (its reason joins the note)."""
    if not timed or res.status != "ok":
        return res
    t = timed[-1]
    note = "; ".join(x for x in (res.note, f"noisy: {t.why}" if t.noisy else "") if x)
    return dataclasses.replace(res, **t.result_fields(), note=note)


def run_config(cfg: BenchConfig, settings: RunSettings) -> BenchResult:
    """Measure ``cfg``; every failure becomes a row with a status and a reason. A row whose rate
    is above the machine's measured matmul ceiling is an ``error`` with the reason, its speed
    figures left out (:mod:`attn_bench.core.ceilings`): a wrong FLOP count or timing is never published."""
    res = _measure(cfg, settings)
    if res.status != "ok":
        return res
    problem = rate_problem(res.tflops, cfg.device, getattr(torch, cfg.dtype))
    if problem is None:
        return res
    speed = ("time_ms", "time_ms_p10", "time_ms_p90", "tflops", "tokens_per_s", "peak_mem_bytes", "repeats")
    return dataclasses.replace(res, status="error", error=problem, **dict.fromkeys(speed))


def _measure(cfg: BenchConfig, settings: RunSettings) -> BenchResult:
    t0 = time.perf_counter()

    def result(status: str, **kw) -> BenchResult:
        return BenchResult(cfg, status, elapsed_s=round(time.perf_counter() - t0, 3), **kw)

    try:
        variant = av.get_variant(cfg.variant, **cfg.variant_options())
    except (TypeError, ValueError) as exc:
        return result("error", error=f"{type(exc).__name__}: {exc}")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return result("unsupported", error="CUDA is not available on this machine")
    lacks = variant.lacks("causal" if cfg.causal else "non_causal")  # what the variant declares it computes
    if lacks is not None:
        return result("unsupported", error=lacks)
    if cfg.pass_ == "decode":
        from attn_bench.decode.run import run_decode

        timed: list[Timing] = []

        def decode_time_fn(fn, device, s) -> tuple[float, float, float, int]:
            timed.append(measure_time(fn, device, s))
            return timed[-1].median_ms, timed[-1].p10_ms, timed[-1].p90_ms, timed[-1].repeats

        try:
            return with_timing(run_decode(cfg, settings, variant, decode_time_fn, result), timed)
        except Unsupported as exc:
            return result("unsupported", error=str(exc))
        except Exception as exc:
            if is_oom(exc):
                return result("oom", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return result("error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
    grad = cfg.pass_ == "fwd_bwd"
    dtype = getattr(torch, cfg.dtype)
    elem = torch.finfo(dtype).bits // 8
    need = dense_bytes(variant, cfg.backend, cfg.batch, cfg.heads, cfg.seq_len, elem, grad)
    limit = settings.mem_limit_gb * 2**30
    if need > limit:
        return result(
            "oom",
            error=f"not run: needs about {need / 2**30:.1f} GiB for dense N x N tensors, over the "
            f"{settings.mem_limit_gb:g} GiB limit (--mem-limit-gb)",
        )
    try:
        q, k, v, dout = make_inputs(cfg, settings.seed, grad)
        q.requires_grad_(grad)
        k.requires_grad_(grad)
        v.requires_grad_(grad)
        target = make_target(variant, cfg.backend, q, k, v, cfg.causal)
        if PERTURB:
            fn0 = target.fn
            target = dataclasses.replace(target, fn=lambda a, b, c: fn0(a, b, c) + PERTURB)
        # FLOPs of what actually runs: a baseline of the Performer computes full attention.
        flops = pass_flops(target.truth.flops(q, k, v, causal=cfg.causal), target.truth, cfg.pass_)
        inputs = (q, k, v)

        if grad:

            def call():
                out = target.fn(q, k, v)
                return torch.autograd.grad(out, inputs, dout)
        else:

            def call():
                with torch.no_grad():
                    return target.fn(q, k, v)

        # FlexAttention compiles on its first call of a shape, Triton kernels on their first call
        # of a specialisation (FAVOR+ also autotunes): that first call is timed on its own as
        # ``compile_s``. (Elsewhere the numerics check and the timer's block-size estimate warm up.)
        compile_s = None
        if cfg.backend == "flex" or dev.type == "cuda":
            tc = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            compile_s = round(time.perf_counter() - tc, 3)

        check = check_target(
            target,
            q.detach(),
            k.detach(),
            v.detach(),
            cfg.causal,
            grads=grad,
            check_elems=settings.check_elems,
        )
        common = dict(
            backend_used=target.backend_used,
            flops=flops,
            max_err=check.max_err,
            grad_err=check.grad_err,
            err_bound=check.bound,
            approx_err=check.approx_err,
            semantic_dev=check.semantic_dev,
            checked_rows=check.rows,
            compile_s=compile_s,
        )
        if not check.ok:
            return result("wrong", error=check.message, **common)
        timing = measure_time(call, dev, settings)
        med = timing.median_ms
        peak = peak_memory(call, dev)
        tflops = flops / (med * 1e-3) / 1e12 if med > 0 else math.nan
        return with_timing(result("ok", peak_mem_bytes=peak, tflops=tflops, note=check.message, **common), [timing])
    except Unsupported as exc:
        return result("unsupported", error=str(exc))
    except NotImplementedError as exc:
        return result("unsupported", error=f"NotImplementedError: {exc}")
    except Exception as exc:
        if is_oom(exc):
            return result("oom", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return result("error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
