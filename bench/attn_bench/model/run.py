"""``attn-bench model``: the variants inside whole Hugging Face Transformers models.

A run is a :class:`ModelConfig`: an architecture (``llama``: a Llama-style decoder,
``LlamaForCausalLM``; ``bert``: a BERT encoder with its masked-LM head, ``BertForMaskedLM``),
its sizes, random weights (no downloads), an attention implementation, N and a pass. Its row is
the config plus what one pass of the whole model costs: median time, tokens/s, peak memory, and
the numerics gate of its logits.

Attention implementations (Transformers' ``attn_implementation``):
- ``sdpa``: Transformers' own, the baseline;
- ``av_<name>``: each registered variant (the project's and a plug-in's), registered by
  :mod:`attention_variants.hf`; a variant that does not compute what the architecture needs
  (causal for Llama, bidirectional for BERT) gives ``unsupported`` rows;
- ``skip``: "attention skipped": returns ``q + k + v`` (heads of k and v repeated for GQA), so
  that every projection stays in the graph and the attention's own cost is nearly nothing. A
  row's share of time in attention is ``1 - t_skip / t`` against the ``skip`` row of the same
  model, N and pass (computed by the report).

Numerics gate (before timing): on the first ``gate_len`` tokens, the logits of the model with the
implementation under test are compared with the same weights run in float64 with the attention
the implementation stands for computed by :func:`attn_bench.core.numerics.softmax_by_rows` (softmax
variants: full attention for ``sdpa`` and ``av_full``, the window's mask for the sliding window)
or by the variant's float64 ``reference`` (the Performer). The bound follows FlashAttention's
rule, loosened for a whole model: ``max_err <= GATE_FACTOR * naive_err + GATE_ATOL[dtype] *
max|truth|``, where ``naive_err`` is the error of the same model with that ground-truth attention
computed in the row's dtype. A row that fails is ``wrong`` and gets no timings. ``skip_err``, the
distance of the logits with attention skipped from the truth, says how much attention moves the
logits: a bound far below it means the gate would catch an attention that computes the wrong thing.
``sdpa_diff`` is the distance of the row's logits from the same model's with Transformers' ``sdpa``
in the row's dtype: for ``av_full`` a direct agreement check, for the sliding window and the
Performer how far the model's output moves from exact full attention.

Rows at a larger N of a line that ran out of memory or time are not run (``oom`` / ``skipped``,
with the reason); rows not started within ``--budget-s`` are ``skipped``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attn_bench.core.config import RunSettings
from attn_bench.core.lifecycle import pool_lifecycle
from attn_bench.core.machine import now
from attn_bench.core.results import (
    METADATA,
    WORKER_LOG,
    _read_metadata,
    prepare_run_dir,
    remove_stale_temp_files,
    write_metadata,
)
from attn_bench.model.config import (
    RESULTS,
    SKIP_IMPL,
    ModelConfig,
    ModelResult,
    impl_variant,
    read_model_results,
    unsupported_reason,
    write_model_results,
)
from attn_bench.model.hf import build_model, gate, register_implementations


def time_model(cfg: ModelConfig, settings: RunSettings, progress: Callable[..., None] | None = None) -> ModelResult:
    """Build the model, gate it, then time one pass and measure its peak memory."""
    import torch

    from attn_bench.core.measure import is_oom, peak_memory, time_fn
    from attn_bench.sweep import measure

    t0 = time.perf_counter()

    def result(status: str, **kw: Any) -> ModelResult:
        return ModelResult(cfg, status, elapsed_s=round(time.perf_counter() - t0, 3), **kw)

    def tick(step: int, what: str) -> None:
        if progress is not None:
            progress(step, 3, what)

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return result("error", error="CUDA is not available on this machine")
    why = register_implementations()
    if why is not None and impl_variant(cfg.impl) is not None:
        return result("error", error=why)
    params = None
    try:
        model = build_model(cfg, settings.seed)
        params = sum(p.numel() for p in model.parameters())
        gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        ids = torch.randint(cfg.vocab, (cfg.batch, cfg.seq_len), generator=gen).to(dev)
        checked: dict[str, Any] = {}
        if cfg.impl != SKIP_IMPL:
            tick(0, "numerics gate")
            perturb, measure.PERTURB = measure.PERTURB, 0.0  # fault injection for the harness's tests
            checked = gate(model, cfg, ids[:, : min(cfg.seq_len, cfg.gate_len)], perturb=perturb)
            if not checked.pop("ok"):
                msg = f"logits max_err {checked['max_err']:.3g} > bound {checked['err_bound']:.3g}"
                return result("wrong", error=msg, params=params, **checked)
        if cfg.pass_ == "fwd":

            def call():
                with torch.no_grad():
                    return model(input_ids=ids).logits
        else:
            model.train()  # no dropout in these configs; train mode as a training step has

            def call():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                # Gradients are dropped at the end of the pass, so that each pass (and its peak
                # memory) starts from the weights alone and counts the gradients it makes.
                model.zero_grad(set_to_none=True)
                return loss.detach()

        tick(1, "timing")
        med, p10, p90, reps = time_fn(call, dev, settings)
        tick(2, "peak memory")
        peak = peak_memory(call, dev)
        tokens = cfg.batch * cfg.seq_len
        return result(
            "ok",
            time_ms=med,
            time_ms_p10=p10,
            time_ms_p90=p90,
            repeats=reps,
            tokens_per_s=tokens / (med * 1e-3) if med > 0 else None,
            peak_mem_bytes=float(peak),
            params=params,
            **checked,
        )
    except Exception as exc:
        if is_oom(exc):
            return result("oom", error=f"{type(exc).__name__}: {str(exc)[:300]}", params=params)
        return result("error", error=f"{type(exc).__name__}: {str(exc)[:500]}", params=params)


def run_model_row(msg: dict, settings: RunSettings, progress: Callable[..., None]) -> dict:
    """The worker job (``attn_bench.model.run:run_model_row``): a config's ``asdict`` in, its row out."""
    cfg = ModelConfig(**{**msg, "options": tuple(map(tuple, msg["options"]))})
    return time_model(cfg, settings, progress).to_row()


# -- the run loop ---------------------------------------------------------------------------------


def _blocked(cfg: ModelConfig, failed: dict[tuple, tuple[int, str]]) -> ModelResult | None:
    """A row not run because its line failed at a smaller N (out of memory or time)."""
    hit = failed.get(cfg.line_key())
    if hit is None or hit[0] >= cfg.seq_len:
        return None
    n, status = hit
    if status == "oom":
        return ModelResult(cfg, "oom", error=f"not run: this line ran out of memory at N={n}")
    return ModelResult(cfg, "skipped", error=f"not run: this line's N={n} ran out of time ({status})")


def run_models(
    configs: list[ModelConfig],
    out: Path,
    settings: RunSettings,
    *,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
    budget_s: float | None = None,
) -> list[ModelResult]:
    """Run ``configs`` one by one in a worker process (skipping those already in ``out/results.csv``
    when ``resume``), rewriting ``results.csv`` atomically after each. Returns all rows."""
    from attn_bench.core.lifecycle import MIN_CONFIG_S
    from attn_bench.core.worker import WorkerPool, WorkerStartError

    prepare_run_dir(out, (c.device for c in configs), resume=resume)
    remove_stale_temp_files(out, (RESULTS, METADATA))
    path = out / RESULTS
    results = read_model_results(path) if resume else []
    done = {r.config.key() for r in results}
    todo = [c for c in configs if c.key() not in done]
    failed: dict[tuple, tuple[int, str]] = {}
    for r in results:
        if r.status in ("oom", "timeout") and not r.error.startswith("not run"):
            prev = failed.get(r.config.line_key())
            if prev is None or r.config.seq_len < prev[0]:
                failed[r.config.line_key()] = (r.config.seq_len, r.status)
    meta = dict(meta or {})
    old = _read_metadata(out) if resume else {}
    meta["started"] = old.get("started", now())
    if resume:
        meta["resumes"] = [*old.get("resumes", []), {"started": now(), "previous_status": old.get("status")}]
    meta.update(settings=dataclasses.asdict(settings), configs=len(configs), status="running", kind="model")
    meta["budget_s"] = budget_s
    write_metadata(out, meta)
    bar = _ModelProgress(len(todo), enabled=progress)
    pool = WorkerPool(
        settings,
        str(out / WORKER_LOG),
        job="attn_bench.model.run:run_model_row",
        result_cls=ModelResult,
        on_progress=bar.step,
    )
    t_start = time.perf_counter()
    with pool_lifecycle(pool, out, meta, results), bar:
        for cfg in todo:
            left = None if budget_s is None else budget_s - (time.perf_counter() - t_start)
            res = _blocked(cfg, failed)
            reason = unsupported_reason(cfg)
            if res is None and reason is not None:
                res = ModelResult(cfg, "unsupported", error=reason)
            if res is None and left is not None and left < MIN_CONFIG_S:
                res = ModelResult(cfg, "skipped", error=f"not run: the --budget-s of {budget_s:g} s was spent")
            if res is None:
                bar.start(cfg.label())
                res = pool.run(cfg, timeout_s=left)
                if res.status in ("oom", "timeout"):
                    failed.setdefault(cfg.line_key(), (cfg.seq_len, res.status))
            results.append(res)
            write_model_results(path, results)
            bar.advance(f"{cfg.label()}: {res.status} {_summary(res)}")
            if pool.gave_up:
                raise WorkerStartError(f"{res.error} ({pool.start_failures} failed starts in a row)")
    return results


def _summary(res: ModelResult) -> str:
    if res.status == "ok":
        return f"{res.time_ms:.1f} ms, {res.tokens_per_s:.0f} tokens/s"
    return res.error[:120]


class _ModelProgress:
    """Two rich bars: rows done, and the phases of the row in flight."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.progress = self.rows = self.phase = None

    def __enter__(self) -> _ModelProgress:
        if self.enabled:
            from attn_bench.core.progress import progress_bar

            self.progress = progress_bar()  # the label last: a narrow terminal cuts it, not the count
            self.progress.__enter__()
            self.rows = self.progress.add_task("rows", total=self.total)
            self.phase = self.progress.add_task("phase", total=3)
        return self

    def start(self, label: str) -> None:
        if self.progress is not None:
            self.progress.update(self.rows, description=label)
            self.progress.reset(self.phase, total=3, description="starting")

    def step(self, step: int, steps: int, what: str) -> None:
        if self.progress is not None:
            self.progress.update(self.phase, completed=step, total=steps, description=what)

    def advance(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
            self.progress.advance(self.rows)
        else:  # a log: one line per row
            print(message, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
