"""The ``decode`` pass of a sweep: per-token cost of generation from a variant's incremental state.

A ``decode`` row with ``seq_len = L`` fills the variant's state with an L-token prompt (timed once:
``prefill_ms``), then times one generated token at a time (``step``: ``time_ms`` median and p10/p90
over many tokens; ``tokens_per_s = B / time``). ``peak_mem_bytes`` is the state the decoder holds
(the KV cache, the window's ring buffer, the Performer's recurrent state), not a transient peak.

Backends: the project's (``torch``, ``triton``, ``auto``) step through the incremental state
(``triton``: the split-KV and fused Performer step kernels of :mod:`attn_kernels.decode`; its prefill
runs the forward kernels). The baselines and peers read the whole cache with one query
(``Nq = 1``) and the variant's mask: ``sdpa`` (what a decoder without state pays) and, on CUDA,
``flash_attn`` (``flash_attn_func``, bottom-right aligned), ``flash_attn_kvcache``
(``flash_attn_with_kvcache``, the decoding kernel of flash-attn, over the cache that holds the
new token; window as ``window_size=(W, 0)``, GQA natively) and ``xformers``; their held memory
is the K and V they read. Before timing, the first generated
token's output is checked against the float64 ground truth of that query over all the keys
(:func:`attn_bench.core.numerics.check`), so a wrong state is a ``wrong`` row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import attention_variants as av
from attn_bench.baselines.registry import make_target
from attn_bench.baselines.target import Unsupported
from attn_bench.core.config import BenchConfig, BenchResult, RunSettings

STATE_BACKENDS = ("torch", "triton", "auto")


def run_decode(
    cfg: BenchConfig,
    settings: RunSettings,
    variant: av.AttentionVariant,
    time_fn: Callable,
    result: Callable[..., BenchResult],
) -> BenchResult:
    from attn_bench.core.measure import make_inputs
    from attn_bench.core.numerics import check

    if not cfg.causal:
        return result("unsupported", error="decoding is causal: a decode row needs causal=true")
    dev = torch.device(cfg.device)
    from attn_bench.baselines.registry import baseline_names

    stateless = cfg.backend in baseline_names()
    if cfg.backend not in STATE_BACKENDS and not stateless:
        return result(
            "unsupported",
            error=f"no incremental state on backend {cfg.backend!r} (decode runs torch, triton, auto and baselines)",
        )
    if not stateless:
        reason = variant.lacks("decode")  # what the variant declares (a softmax under a mask: a KV cache)
        if reason is None and cfg.backend != "auto":
            reason = variant.unsupported_reason(cfg.backend, dev, getattr(torch, cfg.dtype), cfg.head_dim)
        if reason is not None:
            raise Unsupported(reason)
    prompt = BenchConfig(**{**cfg.__dict__, "seq_len": cfg.seq_len + 1})
    q, k, v, _ = make_inputs(prompt, settings.seed, False)
    n = cfg.seq_len
    q1, k1, v1 = q[:, :, n:], k[:, :, n:], v[:, :, n:]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    with torch.no_grad():
        if stateless:
            target = make_target(variant, cfg.backend, q1, k, v, True)
            truth, ground_truth = target.truth, target.ground_truth
            first = target.fn(q1, k, v)
            prefill_ms = None
            held = k.nbytes + v.nbytes

            def call():
                return target.fn(q1, k, v)
        else:
            backend = cfg.backend
            truth, ground_truth = variant, None
            sync()
            t0 = time.perf_counter()
            try:
                _, state = variant.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n], backend=backend)
            except NotImplementedError as exc:  # e.g. a plug-in variant without a decode state
                raise Unsupported(f"no incremental state: {exc}") from None
            sync()
            prefill_ms = (time.perf_counter() - t0) * 1e3
            first, state = variant.step(q1, k1, v1, state, backend=backend)

            def call():
                # Each timed call generates one more token: the context grows by the repeats (a few
                # hundred at most), which is small against the context lengths measured.
                return variant.step(q1, k1, v1, state, backend=backend)[0]

            held = state.nbytes

        # What actually ran is checked against its own truth: a baseline of the Performer computes
        # exact attention, a peer may have documented semantics of its own.
        checked = check(
            lambda a, b, c: first,
            truth,
            q1,
            k,
            v,
            True,
            grads=False,
            check_elems=settings.check_elems,
            ground_truth=ground_truth,
        )
    # Stateless lines read the whole cache; a state's step does what its variant says it does.
    flops = truth.flops(q1, k, v, causal=True) if stateless else variant.decode_flops(q1, k1, v1, context=n)
    common = dict(
        backend_used=cfg.backend if cfg.backend != "auto" else variant.resolve_backend("auto", q1, v1),
        flops=flops,
        max_err=checked.max_err,
        err_bound=checked.bound,
        approx_err=checked.approx_err,
        semantic_dev=checked.semantic_dev,
        checked_rows=checked.rows,
        prefill_ms=prefill_ms,
    )
    if not checked.ok:
        return result("wrong", error=checked.message, **common)
    with torch.no_grad():
        med, p10, p90, reps = time_fn(call, dev, settings)
    return result(
        "ok",
        time_ms=med,
        time_ms_p10=p10,
        time_ms_p90=p90,
        repeats=reps,
        peak_mem_bytes=int(held),
        tflops=flops / (med * 1e-3) / 1e12 if med > 0 else None,
        tokens_per_s=cfg.batch / (med * 1e-3) if med > 0 else None,
        note=checked.message,
        **common,
    )
