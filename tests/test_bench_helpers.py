"""Unit tests of the harness's helpers: FLOPs, exponent fits, crossovers, presets, rows, the gate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import attention_variants as av
from attn_bench.baselines.registry import make_target
from attn_bench.core.config import BenchConfig, BenchResult, expand, load_presets
from attn_bench.core.measure import cpu_peak_memory, pass_flops
from attn_bench.core.numerics import check_target
from attn_bench.core.results import atomic_write, read_results, write_results
from attn_bench.sweep.analysis import compare_runs, crossover, exponents, fit_exponent


def test_fit_exponent_recovers_power_law() -> None:
    n = np.array([256, 1024, 4096, 16384])
    assert fit_exponent(n, 3e-6 * n**2) == pytest.approx(2.0)
    assert fit_exponent(n, 5.0 * n) == pytest.approx(1.0)
    assert math.isnan(fit_exponent([1024], [1.0]))
    assert math.isfinite(fit_exponent(n, [1.0, float("nan"), 4.0, 16.0]))  # NaN points are dropped


def test_crossover() -> None:
    n = [256, 1024, 4096, 16384]
    # ratio eff/full: 4, 1, 0.25, 1/16 -> crosses exactly at 1024... strictly faster from 4096,
    # interpolated crossing where log-ratio hits 0 between 1024 (ratio 1) and 4096: at 1024.
    kind, value = crossover(n, [4.0, 2.0, 1.0, 1.0], [1.0, 2.0, 4.0, 16.0])
    assert kind == "at" and value == pytest.approx(1024.0)
    kind, value = crossover(n, [4.0, 4.0, 2.0, 1.0], [1.0, 2.0, 4.0, 16.0])  # ratios 4, 2, .5, 1/16
    assert kind == "at" and 1024 < value < 4096
    assert crossover(n, [0.5] * 4, [1.0] * 4) == ("below", 256.0)
    kind, value = crossover(n, [2.0] * 4, [1.0] * 4)
    assert kind == "none" and math.isnan(value)
    # Faster in the middle but slower again at the end: not a crossover.
    assert crossover(n, [2.0, 0.5, 0.5, 2.0], [1.0] * 4)[0] == "none"


def test_exponents_table() -> None:
    rows = []
    for variant, p in (("full", 2.0), ("sliding_window", 1.0)):
        for n in (1024, 2048, 4096, 8192):
            rows.append(
                {
                    "device": "cpu",
                    "dtype": "float32",
                    "batch": 1,
                    "heads": 4,
                    "kv_heads": 4,
                    "head_dim": 64,
                    "causal": False,
                    "variant": variant,
                    "window": 128 if variant == "sliding_window" else -1,
                    "num_features": -1,
                    "backend": "torch",
                    "pass": "fwd",
                    "seq_len": n,
                    "status": "ok",
                    "time_ms": 1e-3 * n**p,
                    "peak_mem_bytes": 100 * n,
                }
            )
    tab = exponents(pd.DataFrame(rows)).set_index("line")
    assert tab.loc["full / torch", "time exp (all)"] == pytest.approx(2.0)
    assert tab.loc["sliding_window w=128 / torch", "time exp (top 3)"] == pytest.approx(1.0)
    assert tab.loc["sliding_window w=128 / torch", "mem exp (top 3)"] == pytest.approx(1.0)


def test_compare_flags_regressions() -> None:
    base = {"device": "cpu", "dtype": "float32", "batch": 1, "heads": 4, "kv_heads": 4, "head_dim": 64}
    base |= {"causal": False, "variant": "full", "window": -1, "num_features": -1, "backend": "torch", "pass": "fwd"}
    old = pd.DataFrame(
        [{**base, "seq_len": n, "status": "ok", "time_ms": 1.0, "peak_mem_bytes": 1, "max_err": 0.0} for n in (1, 2, 3)]
    )
    new = old.copy()
    new.loc[0, "time_ms"] = 1.05  # within 10%
    new.loc[1, "time_ms"] = 1.5  # regression
    new.loc[2, ["status", "time_ms"]] = ["error", float("nan")]  # broke
    cmp = compare_runs(new, old, 0.10).set_index("seq_len")
    assert list(cmp["regression"]) == [False, True, True]


def test_pass_and_mask_aware_flops() -> None:
    shape = (1, 4, 4096, 64)
    full = av.FullAttention().flops(shape, shape, shape)
    assert full == 2 * 4 * 4096 * 4096 * 128
    causal = av.FullAttention().flops(shape, shape, shape, causal=True)
    assert causal == pytest.approx(full / 2, rel=1e-3)
    sw = av.SlidingWindowAttention(window=128).flops(shape, shape, shape)
    assert sw < full / 10  # counts the band only
    assert pass_flops(full, av.FullAttention(), "fwd") == full
    assert pass_flops(full, av.FullAttention(), "fwd_bwd") == round(3.5 * full)
    assert pass_flops(full, av.PerformerAttention(), "fwd_bwd") == 3 * full


def test_presets_are_valid() -> None:
    presets = load_presets()
    assert {"cpu-quick", "cpu-full", "gpu"} <= set(presets)
    quick = expand(presets["cpu-quick"].groups)
    assert max(c.seq_len for c in quick) >= 16384 and min(c.seq_len for c in quick) <= 256
    assert {c.pass_ for c in quick} == {"fwd", "fwd_bwd"}
    # Dense backends are capped where their N x N matrices would not fit.
    assert max(c.seq_len for c in quick if c.backend == "reference") <= 4096
    gpu = expand(presets["gpu"].groups)
    assert {c.dtype for c in gpu} == {"bfloat16"} and {64, 128} <= {c.head_dim for c in gpu}
    assert max(c.seq_len for c in gpu) == 65536 and {c.causal for c in gpu} == {False, True}
    # Options apply to their own variant only, so keys stay canonical.
    assert all(c.option("window") is None for c in quick if c.variant != "sliding_window")
    assert all(c.option("num_features") is None for c in quick if c.variant != "performer")


def test_expand_overrides_and_dedup() -> None:
    groups = [{"variants": ["full"], "backends": ["torch"], "seq_lens": [64, 64, 128]}]
    cfgs = expand(groups, {"passes": ["fwd", "fwd_bwd"], "seq_lens": None})
    assert len(cfgs) == 4


def test_results_round_trip(tmp_path) -> None:
    cfg = BenchConfig("sliding_window", "torch", 1024, causal=True, pass_="fwd_bwd", options=(("window", 128),))
    res = [
        BenchResult(cfg, "ok", backend_used="torch", time_ms=1.5, time_ms_p10=1.4, time_ms_p90=1.7, flops=10),
        BenchResult(
            BenchConfig("performer", "triton", 64, options=(("num_features", 16),)), "unsupported", error="no, x"
        ),
    ]
    write_results(tmp_path / "r.csv", res)
    assert read_results(tmp_path / "r.csv") == res
    atomic_write(tmp_path / "r.csv", "x\n")
    assert (tmp_path / "r.csv").read_text() == "x\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_gate_catches_wrong_output() -> None:
    q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    variant = av.SlidingWindowAttention(window=7)
    target = make_target(variant, "torch", q, k, v, True)
    res = check_target(target, q, k, v, True, grads=True)
    assert res.ok and res.grad_err is not None and res.max_err <= res.bound
    bad = target.__class__(lambda a, b, c: target.fn(a, b, c) + 1e-3, target.truth, "torch", False)
    assert not check_target(bad, q, k, v, True).ok
    # Long inputs: a sample of rows over the whole sequence is checked, each exactly.
    part = check_target(target, q, k, v, True, check_elems=2 * 100 * 10)
    assert part.ok and part.rows == 10 and part.grad_err is None


def test_sdpa_baseline_matches_variant() -> None:
    q, k, v = (torch.randn(1, 2, 130, 16, dtype=torch.float64) for _ in range(3))
    for variant in (av.FullAttention(), av.SlidingWindowAttention(window=(5, 2))):
        for causal in (False, True):
            target = make_target(variant, "sdpa", q, k, v, causal)
            torch.testing.assert_close(target.fn(q, k, v), variant.reference(q, k, v, causal=causal))


def test_cpu_peak_memory_sees_allocations() -> None:
    n = 1 << 20

    def alloc():
        a = torch.ones(n)  # 4 MiB
        b = torch.ones(n)  # 4 MiB, both alive
        return a + b  # 4 MiB more

    assert cpu_peak_memory(alloc) >= 3 * 4 * n


def test_time_fn_short_and_long_calls() -> None:
    import time

    from attn_bench.core.config import RunSettings
    from attn_bench.core.measure import time_fn

    cpu = torch.device("cpu")
    med, p10, p90, reps = time_fn(lambda: torch.ones(64).sum(), cpu, RunSettings(min_run_time=0.01, min_repeats=3))
    assert reps >= 3 and 0 < p10 <= med <= p90
    # A long call is timed once per measurement and stops at two once max_timed_s is spent.
    med, p10, p90, reps = time_fn(lambda: time.sleep(0.55), cpu, RunSettings(min_repeats=5, max_timed_s=1.0))
    assert reps == 2 and med >= 550
