"""The report's tables and plots read at a glance: N in numeric order in every per-N table whatever
order the rows ran in, and a speed-up plot with one legend entry per line, lines joined, and the
legend outside the data."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attn_bench.core.config import BenchConfig, BenchResult

# Text order of these lengths is 1024, 16384, 2048, 256, 4096, 512: a sort as text shows.
LENGTHS = [1024, 16384, 2048, 256, 4096, 512]


def _sweep_frame(rng: random.Random) -> tuple[pd.DataFrame, dict]:
    """ok rows of full and the sliding window on torch and sdpa, in a shuffled order; returns the
    frame as load_results gives it and the time of each (variant, backend, N)."""
    rows, times = [], {}
    for variant in ("full", "sliding_window"):
        opts = (("window", 64),) if variant == "sliding_window" else ()
        for backend in ("torch", "sdpa"):
            for n in LENGTHS:
                t = rng.uniform(0.1, 100.0)
                times[(variant, backend, n)] = t
                cfg = BenchConfig(variant, backend, n, options=opts)
                res = BenchResult(cfg, "ok", time_ms=t, time_ms_p10=0.9 * t, time_ms_p90=1.1 * t, tflops=1e-3)
                rows.append(res.to_row() | {"peak_mem_bytes": 1000 * n})
    rng.shuffle(rows)
    df = pd.DataFrame(rows)
    for col in ("window", "num_features"):
        df[col] = pd.to_numeric(df[col]).fillna(-1).astype(int)
    return df, times


def test_time_tables_put_n_in_numeric_order() -> None:
    from attn_bench.sweep.report import time_tables

    df, times = _sweep_frame(random.Random(1))
    [(_, tab)] = time_tables(df)
    assert list(tab.columns) == ["line", *(f"N={n}" for n in sorted(LENGTHS))]
    for _, row in tab.iterrows():
        variant = "full" if row["line"].startswith("full") else "sliding_window"
        backend = row["line"].rsplit(" / ", 1)[1]
        cells = [float(row[f"N={n}"]) for n in sorted(LENGTHS)]
        assert cells == [float(f"{times[(variant, backend, n)]:.3g}") for n in sorted(LENGTHS)]


def test_task_summary_puts_n_in_numeric_order() -> None:
    from attn_bench.task.report import summarise

    rng = random.Random(2)
    rows = []
    for task in ("mqar", "listops"):
        for n in LENGTHS:
            for seed in range(2):
                acc = rng.random()
                rows.append(
                    dict(task=task, seq_len=n, variant="full", line="full", final_acc=acc, seed=seed, chance_acc=0.1)
                    | dict(train_s=1.0, tokens_per_s=1.0, peak_mem_bytes=1, approx_err=0.0, target_acc=0.5)
                    | dict(time_to_target_s=None)
                )
    rng.shuffle(rows)
    df = pd.DataFrame(rows)
    s = summarise(df)
    for task in ("mqar", "listops"):
        sub = s[s["task"] == task]
        assert list(sub["seq_len"]) == sorted(LENGTHS)
        for _, r in sub.iterrows():  # each mean is still its own N's
            accs = [x["final_acc"] for x in rows if x["task"] == task and x["seq_len"] == r["seq_len"]]
            assert abs(r["acc"] - float(np.mean(accs))) < 1e-12


def test_device_kernel_table_puts_n_in_numeric_order() -> None:
    from attn_bench.device.summary import kernel_table

    rows = []
    for n in LENGTHS:
        for p in ("fwd", "fwd_bwd"):
            base = dict(variant="full", window=None, num_features=None, device="cuda", dtype="bfloat16", batch=1)
            base |= dict(heads=16, kv_heads=16, head_dim=128, causal=False, seq_len=n, error="", flops=1)
            rows.append({**base, "pass": p, "backend": "triton", "status": "ok", "time_ms": n / 1000, "tflops": 1.0})
    tab = kernel_table(pd.DataFrame(rows), matmul_tflops=None)
    assert list(tab["N"]) == [n for n in sorted(LENGTHS) for _ in range(2)]
    assert [float(x) for x in tab["triton ms"]] == [float(f"{n / 1000:.3g}") for n in tab["N"]]


def test_speedup_plot_has_one_legend_entry_per_line_joined_and_outside_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from attn_bench.sweep.plots import sweep_plots

    saved: dict[str, Figure] = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.setdefault(Path(path).name, fig))
    df, times = _sweep_frame(random.Random(3))
    sweep_plots(df, tmp_path, "sdpa")
    [name] = [k for k in saved if k.startswith("speedup_vs_sdpa")]
    fig = saved[name]
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    labels = [t.get_text() for lg in legends for t in lg.get_texts()]
    # Two lines (full / torch and the window / torch over sdpa), each once, whatever the number of N.
    assert sorted(labels) == ["full / torch", "sliding_window w=64 / torch"]
    for ax in fig.axes:
        drawn = [ln for ln in ax.get_lines() if ln.get_label() in labels]
        assert len(drawn) == 2
        for ln in drawn:
            x, y = (np.asarray(a, dtype=float) for a in ln.get_data())
            assert list(x) == sorted(LENGTHS)  # one polyline through every N, in order
            variant = "full" if ln.get_label().startswith("full") else "sliding_window"
            want = [times[(variant, "sdpa", n)] / times[(variant, "torch", n)] for n in sorted(LENGTHS)]
            assert np.allclose(y, want)
    for lg in legends:
        box = lg.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers the data"
        inside = fig.bbox
        assert box.x0 >= inside.x0 and box.y0 >= inside.y0 and box.x1 <= inside.x1 and box.y1 <= inside.y1
