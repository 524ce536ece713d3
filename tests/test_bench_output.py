"""What the report and the targets print: no warnings from N=0 rows, no profiler chatter, each result once."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import pytest

from attn_bench.core.config import BenchConfig, BenchResult


def _rows_with_zero_length() -> pd.DataFrame:
    rows = []
    for backend in ("torch", "sdpa"):
        for variant in ("full", "sliding_window"):
            for n in (0, 64, 128):
                cfg = BenchConfig(variant, backend, n, options=(("window", 8),) if variant == "sliding_window" else ())
                t = 0.01 + n * (0.01 if variant == "full" else 0.005)
                res = BenchResult(cfg, "ok", time_ms=t, time_ms_p10=t, time_ms_p90=t, peak_mem_bytes=100 * n)
                rows.append(res.to_row() | {"tflops": 0.0 if n == 0 else 1e-3})
    df = pd.DataFrame(rows)
    for col in ("window", "num_features"):
        df[col] = pd.to_numeric(df[col]).fillna(-1).astype(int)
    return df


def test_plots_and_crossovers_are_quiet_with_zero_length_rows(tmp_path: Path) -> None:
    from attn_bench.sweep.analysis import crossovers
    from attn_bench.sweep.plots import sweep_plots

    df = _rows_with_zero_length()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = sweep_plots(df, tmp_path)
        crossovers(df)
    assert files["time"] and files["memory"] and files["speedup"]


def test_targets_print_each_result_once_and_no_profiler_chatter(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import torch

    from attn_bench.core.measure import cpu_peak_memory
    from attn_bench.sweep import targets

    with targets._without_profiler_chatter():
        cpu_peak_memory(lambda: torch.ones(64) + 1)
        os.write(2, b"a real error\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "a real error" in err

    fake = [targets.Target("ratio A", 1.0, "<=", 2.0, "1 ms vs 1 ms"), targets.Target("ratio B", 3.0, ">=", 2.0, "")]

    def run_targets(quick: bool, flex: bool, log) -> list:
        for t in fake:
            log(t)
        return fake

    monkeypatch.setattr(targets, "run_targets", run_targets)
    assert targets.main(quick=True)
    out = capfd.readouterr().out
    assert out.count("ratio A") == 1 and out.count("ratio B") == 1
