"""``attn-bench tune``: time each kernel's candidate configs on this GPU and write its table.

For every key of the plan (kernel, dtype, head dim, causal, band, N: :class:`TuneKey`), each
candidate config (:func:`candidates`, the heuristic default first) is first checked against the
float64 ground truth with the project's numerics gate (:func:`attn_bench.core.numerics.check`, on a
small problem of the same kind), then timed with ``triton.testing.do_bench`` on the key's problem,
the heuristic default in the same run. The fastest config that passed becomes the key's entry
(the default stays unless another is :data:`MIN_GAIN` faster), with the time ratio against the
default. The table (:class:`attn_kernels.tuning.Table`) is written after every key, so a run cut
short keeps what it measured; a run on a card that already has a table starts from it and
skips the keys whose entries are fresh.

The loop (:func:`tune`) takes the timer and the checker as a :class:`Runner` and the clock as
a function: :class:`CudaRunner` is the real one; the tests drive the loop with their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from attn_bench.core.variants import kernel_variant as variant_for
from attn_bench.device.tune_keys import (
    DEFAULT_FEATURES,
    PASS,
    TuneKey,
    candidates,
    heuristic_defaults,
    plan,
)
from attn_kernels import tuning
from attn_kernels.launch import KernelConfig

MIN_GAIN = 0.03  # a candidate replaces the default only when it is this much faster
CHECK_N = 1000  # sequence length of the numerics check (not a multiple of any tile)
HEADS = 16  # the problem timed: (1, HEADS, N, D), as in the gpu-quick sweep
# Errors after which the process's CUDA context is unusable: the run stops (what it wrote stays).
CONTEXT_LOST = ("CUDA error", "AcceleratorError", "illegal memory access", "device-side assert")


class Runner(Protocol):
    """What :func:`tune` measures with."""

    def check(self, key: TuneKey, cfg: KernelConfig) -> str | None:
        """None when ``key.kernel`` launched with ``cfg`` passes the numerics gate, else why not."""

    def time_ms(self, key: TuneKey, cfg: KernelConfig) -> float:
        """Milliseconds of the key's pass with ``key.kernel`` launched with ``cfg``."""


@dataclass
class Trial:
    config: KernelConfig
    ms: float | None = None
    error: str = ""


@dataclass
class TuneRun:
    """What :func:`tune` did: the table, the keys tuned, skipped (fresh already), not reached."""

    table: tuning.Table
    tuned: list[TuneKey] = field(default_factory=list)
    fresh: list[TuneKey] = field(default_factory=list)
    not_reached: list[TuneKey] = field(default_factory=list)
    failed: list[tuple[TuneKey, str]] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    stopped_by_budget: bool = False
    context_lost: str = ""  # the error after which no CUDA call could succeed any more


def choose(trials: Sequence[Trial], min_gain: float = MIN_GAIN) -> tuple[Trial, Trial] | None:
    """``(chosen, default)`` from the trials of one key (the default is the first), or None when
    the default itself did not pass or was not timed (then there is nothing to compare with)."""
    if not trials or trials[0].ms is None:
        return None
    default = trials[0]
    timed = [t for t in trials if t.ms is not None]
    best = min(timed, key=lambda t: t.ms)  # type: ignore[arg-type, return-value]
    assert best.ms is not None and default.ms is not None
    return (best if best.ms < (1.0 - min_gain) * default.ms else default), default


def pending(keys: Iterable[TuneKey], table: tuning.Table | None) -> list[TuneKey]:
    """The keys without a fresh, complete entry in ``table`` (an entry cut short by the budget
    is used at launch but tuned again)."""
    if table is None:
        return list(keys)
    hashes = {f: tuning.source_hash(f) for f in tuning.FAMILY_SOURCES}
    out = []
    for key in keys:
        e = table.entry(key.kernel, key.table_key)
        if e is None or e.get("source_hash") != hashes[key.family] or e.get("complete") is False:
            out.append(key)
    return out


def tune(
    keys: Sequence[TuneKey],
    runner: Runner,
    *,
    card: str,
    capability: tuple[int, int],
    budget_s: float,
    out_dirs: Sequence[Path] = (),
    table: tuning.Table | None = None,
    meta: dict | None = None,
    retune: bool = False,
    clock: Callable[[], float] = time.monotonic,
    echo: Callable[[str], None] = print,
    min_gain: float = MIN_GAIN,
) -> TuneRun:
    """Tune ``keys`` within ``budget_s`` seconds of ``clock`` and write the table into each of
    ``out_dirs`` after every key. Starts from ``table`` (this card's earlier table, if any) with
    its stale entries dropped, and skips the keys it already holds fresh unless ``retune``.

    A candidate is started only while budget is left, so the run ends at most one candidate
    (its compilation, check and timing) past ``budget_s``; a key cut short keeps the best of the
    candidates timed if the default was among them, marked ``complete: false`` (tuned again by
    the next run). A lost CUDA context (:data:`CONTEXT_LOST`) ends the run too."""
    if not 0 < budget_s < float("inf"):
        raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s}")
    t0 = clock()
    base = tuning.Table(card, meta=dict(meta or {}))
    if table is not None:
        stale = set(table.stale())
        for kernel, keyed in table.entries.items():
            for k, e in keyed.items():
                if (kernel, k) not in stale and kernel in tuning.KERNEL_FAMILY:
                    base.put(kernel, k, e)
    run = TuneRun(base)
    todo = list(keys) if retune else pending(keys, base)
    run.fresh = [k for k in keys if k not in todo]
    if run.fresh:
        echo(f"tune: {len(run.fresh)} of {len(keys)} keys already have a fresh entry; {len(todo)} to tune")
    hashes = {f: tuning.source_hash(f) for f in tuning.FAMILY_SOURCES}
    for i, key in enumerate(todo):
        if clock() - t0 >= budget_s:
            run.not_reached = todo[i:]
            run.stopped_by_budget = True
            break
        cands = candidates(key, capability)
        trials: list[Trial] = []
        for cfg in cands:
            if clock() - t0 >= budget_s:
                run.stopped_by_budget = True
                break
            trial = Trial(cfg)
            try:
                trial.error = runner.check(key, cfg) or ""
                if not trial.error:
                    trial.ms = float(runner.time_ms(key, cfg))
            except Exception as exc:  # one failing candidate must not end the run
                trial.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            trials.append(trial)
            if any(s in trial.error for s in CONTEXT_LOST):
                run.context_lost = f"{cfg}: {trial.error}"
                break
        if not trials:  # the budget ran out before this key's first candidate
            run.not_reached = todo[i:]
            break
        picked = choose(trials, min_gain)
        elapsed = clock() - t0
        if picked is None:
            why = trials[0].error if trials else "not reached"
            run.failed.append((key, f"heuristic default {cands[0]}: {why or 'not timed'}"))
            echo(f"tune [{i + 1}/{len(todo)}] {key}: no entry (default {cands[0]}: {why}) [{elapsed:.0f} s]")
        else:
            chosen, default = picked
            assert chosen.ms is not None and default.ms is not None
            entry = {
                "config": tuning.config_dict(chosen.config),
                "name": chosen.config.name,
                "ms": round(chosen.ms, 6),
                "default": default.config.name,
                "default_ms": round(default.ms, 6),
                "ratio": round(chosen.ms / default.ms, 4),
                "pass": PASS[key.kernel],
                "problem": {"dtype": str(key.dtype).removeprefix("torch."), "batch": 1, "heads": HEADS}
                | {"n": key.n, "head_dim": key.head_dim, "window": key.window, "features": key.features},
                "candidates": len(cands),
                "timed": sum(t.ms is not None for t in trials),
                "failed": {t.config.name: t.error for t in trials if t.error},
                "timings": {t.config.name: round(t.ms, 6) for t in trials if t.ms is not None},
                "complete": len(trials) == len(cands),
                "versions": (meta or {}).get("versions"),
                "source_hash": hashes[key.family],
            }
            run.table.put(key.kernel, key.table_key, entry)
            run.tuned.append(key)
            note = "" if len(trials) == len(cands) else f", budget reached after {len(trials)} of {len(cands)}"
            echo(
                f"tune [{i + 1}/{len(todo)}] {key}: {chosen.config} {entry['ratio']:.2f}x of default {default.config}"
                f" ({entry['timed']} timed, {len(entry['failed'])} failed{note}) [{elapsed:.0f}/{budget_s:.0f} s]"
            )
            run.paths = [run.table.write(d) for d in out_dirs]
        if run.stopped_by_budget or run.context_lost:
            run.not_reached = todo[i + 1 :]
            break
    if run.context_lost:
        echo(f"tune: stopped, the CUDA context is lost ({run.context_lost}); {len(run.not_reached)} key(s) left")
    if run.stopped_by_budget:
        echo(f"tune: budget of {budget_s:.0f} s reached; {len(run.not_reached)} key(s) not reached")
    if not run.paths and run.table.entries:
        run.paths = [run.table.write(d) for d in out_dirs]
    tuning.reset()
    return run


# ---------------------------------------------------------------------------------------------
# The real runner (CUDA)
# ---------------------------------------------------------------------------------------------


def kernel_variant(key: TuneKey):
    """The variant that drives ``key``'s kernels (:func:`attn_bench.core.variants.kernel_variant`)."""
    if key.family.startswith("favor"):  # both FAVOR+ implementations and the switch between them
        return variant_for("favor", {"num_features": key.features or DEFAULT_FEATURES})
    return variant_for(key.family, {"window": key.window} if key.window is not None else {})


class CudaRunner:
    """Checks with :func:`attn_bench.core.numerics.check` on a ``(1, 2, min(N, check_n), D)`` problem
    (output and, for a kernel timed with a backward, gradients) and times the key's pass on
    ``(1, HEADS, N, D)`` with ``triton.testing.do_bench`` (median of ``rep_ms``)."""

    def __init__(self, device: str = "cuda", warmup_ms: int = 25, rep_ms: int = 100, check_n: int = CHECK_N) -> None:
        self.device = torch.device(device)
        self.warmup_ms, self.rep_ms, self.check_n = warmup_ms, rep_ms, check_n
        self._inputs: dict[tuple, tuple] = {}

    def _qkv(self, key: TuneKey, n: int, heads: int, seed: int) -> tuple[torch.Tensor, ...]:
        ck = (key.dtype, key.head_dim, n, heads, seed)
        if ck not in self._inputs:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            if len(self._inputs) >= 2:  # the check's problem and the timed one: the latter can hold GiBs
                self._inputs.clear()
            self._inputs[ck] = tuple(
                torch.randn(1, heads, n, key.head_dim, device=self.device, dtype=key.dtype, generator=gen)
                for _ in range(4)
            )
        return self._inputs[ck]

    def _forced(self, key: TuneKey, cfg: KernelConfig) -> dict[str, KernelConfig]:
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else (0, 0)
        return heuristic_defaults(key, capability) | {key.kernel: cfg}

    def check(self, key: TuneKey, cfg: KernelConfig) -> str | None:
        from attn_bench.core.numerics import check

        variant = kernel_variant(key)
        q, k, v, _ = self._qkv(key, min(key.n, self.check_n), 2, seed=1)
        fn = lambda a, b, c: variant(a, b, c, causal=key.causal, backend="triton")
        with tuning.forced(self._forced(key, cfg)) as seen:
            res = check(fn, variant, q, k, v, key.causal, grads=PASS[key.kernel] != "fwd")
        if key.kernel not in {kernel for kernel, _ in seen}:
            raise RuntimeError(f"the check of {key} never launched {key.kernel}")
        return None if res.ok else res.message or "numerics gate failed"

    def time_ms(self, key: TuneKey, cfg: KernelConfig) -> float:
        from triton.testing import do_bench

        variant = kernel_variant(key)
        q, k, v, dout = self._qkv(key, key.n, HEADS, seed=2)
        mode = PASS[key.kernel]
        q, k, v = (t.detach().requires_grad_(mode != "fwd") for t in (q, k, v))
        fn = lambda: variant(q, k, v, causal=key.causal, backend="triton")
        with tuning.forced(self._forced(key, cfg)) as seen:
            if mode == "fwd":
                with torch.no_grad():
                    fn()  # compiles; the launch shape is checked below
                ms = do_bench(lambda: fn(), warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
            elif mode == "bwd":
                out = fn()
                step = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                step()
                ms = do_bench(step, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
            else:
                step = lambda: torch.autograd.grad(fn(), (q, k, v), dout)
                step()
                ms = do_bench(step, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        keys = {tuning.shape_key(kernel, shape) for kernel, shape in seen if kernel == key.kernel}
        if keys != {key.table_key}:  # the tuner's idea of the launch shape must be the kernels' own
            raise RuntimeError(f"{key.kernel} launched with key(s) {sorted(keys)}, expected {key.table_key}")
        return float(ms)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


__all__ = ["CudaRunner", "Runner", "TuneKey", "TuneRun", "candidates", "choose", "pending", "plan", "tune"]
