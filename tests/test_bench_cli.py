"""The harness end to end: a tiny sweep through the CLI, failures recorded, resume, report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.core.config import BenchConfig, RunSettings
from attn_bench.core.results import RESULTS, read_results
from attn_bench.sweep.run import run_sweep

TINY = """
[presets.tiny]
description = "test preset"

[presets.tiny.settings]
min_run_time = 0.005
min_repeats = 3
timeout_s = 60

[[presets.tiny.groups]]
variants = ["full", "sliding_window", "performer"]
backends = ["torch", "sdpa", "triton"]
seq_lens = [64, 128]
passes = ["fwd"]
heads = 2
head_dim = 16
window = 8
num_features = 16

[[presets.tiny.groups]]
variants = ["full", "sliding_window", "performer"]
backends = ["torch"]
seq_lens = [64, 128]
passes = ["fwd_bwd"]
heads = 2
head_dim = 16
window = 8
num_features = 16

[[presets.tiny.groups]]
variants = ["full"]
backends = ["reference"]
seq_lens = [64]
passes = ["fwd"]
heads = 2
head_dim = 16

[presets.tiny.accuracy]
seq_len = 64
head_dim = 16
heads = 1
num_features = [8, 32]
sharpness = [0.5, 2.0]
sharpness_features = 16
seeds = 1
"""

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker inherits the environment: without the interpreter, `triton` is unsupported on CPU.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ATTN_BENCH_FAULT", raising=False)


def _rows(out: Path) -> list[dict]:
    with open(out / RESULTS, newline="") as f:
        return list(csv.DictReader(f))


def _sweep(tmp_path: Path, out: Path, *extra: str):
    preset = tmp_path / "presets.toml"
    preset.write_text(TINY)
    args = ["sweep", "--preset-file", str(preset), "--preset", "tiny", "--out", str(out), "--no-progress", *extra]
    return runner.invoke(app, args, catch_exceptions=False)


def test_sweep_report_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _sweep(tmp_path, out)
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == 3 * 3 * 2 + 3 * 2 + 1
    by_backend: dict[str, set[str]] = {}
    for r in rows:
        by_backend.setdefault(r["backend"], set()).add(r["status"])
    assert by_backend["triton"] == {"unsupported"}
    assert by_backend["torch"] == {"ok"} and by_backend["sdpa"] == {"ok"} and by_backend["reference"] == {"ok"}
    for r in rows:
        if r["status"] == "ok":
            assert float(r["time_ms"]) > 0 and float(r["time_ms_p10"]) <= float(r["time_ms_p90"])
            assert int(r["peak_mem_bytes"]) > 0 and int(r["flops"]) > 0
            assert float(r["max_err"]) <= float(r["err_bound"])
        else:
            assert r["time_ms"] == "" and "CUDA" in r["error"]
    perf = [r for r in rows if r["variant"] == "performer" and r["backend"] == "torch"]
    assert all(float(r["approx_err"]) > 0 for r in perf)
    # The Performer's SDPA baseline is full attention's SDPA row, measured once.
    twin = [r for r in rows if r["variant"] == "performer" and r["backend"] == "sdpa"]
    assert all("measured once" in r["note"] for r in twin)

    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["rows"] == len(rows)
    for key in ("cpu_model", "torch", "triton", "python", "git_commit", "command", "started", "memory_method"):
        assert key in meta
    page = (out / "README.md").read_text()
    for section in ("Scaling exponents", "Crossover", "Performer accuracy", "Rows that did not run"):
        assert section in page
    pngs = {p.name.split("_vs_")[0] for p in out.glob("*.png")}
    assert {"time", "memory", "flops", "speedup", "performer_error"} <= pngs

    # Resume: with other options it is refused (the run's own options are in metadata.json);
    # alone, finished rows are kept as they are and only a lost row runs again.
    before = {(r["variant"], r["backend"], r["seq_len"], r["pass"]): r["elapsed_s"] for r in rows}
    res = _sweep(tmp_path, out, "--resume", "--seq-lens", "64,128,96", "--no-report")
    assert res.exit_code == 2 and "differ" in res.output
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:-1]))
    res = runner.invoke(app, ["sweep", "--out", str(out), "--resume", "--no-progress", "--no-report"])
    assert res.exit_code == 0, res.output
    rows2 = _rows(out)
    assert len(rows2) == len(rows)
    kept = [r for r in rows2 if r["elapsed_s"] == before[(r["variant"], r["backend"], r["seq_len"], r["pass"])]]
    assert len(kept) >= len(rows) - 1

    # Without --resume or --overwrite an existing run is not clobbered.
    res = _sweep(tmp_path, out)
    assert res.exit_code == 2

    # Comparing the run with itself: no regressions.
    res = runner.invoke(app, ["report", str(out), "--compare", str(out)], catch_exceptions=False)
    assert res.exit_code == 0 and "0 regression" in res.output
    assert "Comparison against" in (out / "README.md").read_text()


def test_failures_are_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash, a hang, a wrong result and an exception each become a row; the sweep goes on."""
    expected = {128: ("error", "worker crashed"), 192: ("timeout", "no result after"), 256: ("wrong", "max err")}
    expected[320] = ("error", "injected failure")
    monkeypatch.setenv("ATTN_BENCH_FAULT", "crash:128,hang:192,wrong:256,raise:320")
    out = tmp_path / "run"
    args = ["--variants", "full", "--backends", "torch", "--passes", "fwd", "--seq-lens", "64,128,192,256,320,384"]
    res = _sweep(tmp_path, out, *args, "--timeout", "10", "--no-report", "--no-accuracy")
    assert res.exit_code == 0, res.output
    rows = {int(r["seq_len"]): r for r in _rows(out)}
    assert rows[64]["status"] == "ok" and rows[384]["status"] == "ok"  # the sweep went on
    for n, (status, message) in expected.items():
        assert rows[n]["status"] == status, rows[n]
        assert message in rows[n]["error"]
        assert rows[n]["time_ms"] == ""  # no speed figure for a failed row
    assert json.loads((out / "metadata.json").read_text())["worker_restarts"] == 2


def test_impossible_config_is_refused_before_the_run(tmp_path: Path) -> None:
    """Options the variant's constructor refuses make no row at all: exit 2 naming the option."""
    out = tmp_path / "run"
    args = ["--variants", "performer", "--backends", "torch", "--passes", "fwd", "--seq-lens", "64"]
    res = _sweep(tmp_path, out, *args, "--num-features", "0", "--no-report", "--no-accuracy")
    assert res.exit_code == 2, res.output
    assert "--num-features" in res.output and "num_features must be >= 1" in res.output
    assert not out.exists()


def test_interrupt_keeps_finished_rows(tmp_path: Path) -> None:
    configs = [BenchConfig("full", "torch", n, heads=1, head_dim=16) for n in (32, 48, 64, 80)]
    seen = []

    def stop_after_two(res) -> None:
        seen.append(res)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(configs, tmp_path, RunSettings(min_run_time=0.005), progress=False, on_result=stop_after_two)
    kept = read_results(tmp_path / RESULTS)
    assert [r.config for r in kept] == configs[:2]
    assert json.loads((tmp_path / "metadata.json").read_text())["status"] == "interrupted"
    assert not list(tmp_path.glob(".results.csv.*"))  # no temporary file left behind
    # Resuming runs only the rest.
    rows = run_sweep(configs, tmp_path, RunSettings(min_run_time=0.005), resume=True, progress=False)
    assert [r.config for r in rows] == configs


def test_verify_quick_passes() -> None:
    res = runner.invoke(
        app, ["verify", "--quick", "--dtypes", "float32,bfloat16", "--backends", "torch,reference,sdpa"]
    )
    assert res.exit_code == 0, res.output
    assert "wrong" not in res.output.split("checks in")[-1]


def test_verify_fails_on_wrong_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import attn_bench.baselines.torch_builtin as baselines

    real = baselines.sdpa_fn

    def broken(variant, q, k, causal):
        fn, dense = real(variant, q, k, causal)
        return (lambda a, b, c: fn(a, b, c) * 1.01), dense

    monkeypatch.setattr(baselines, "sdpa_fn", broken)
    res = runner.invoke(app, ["verify", "--quick", "--dtypes", "float32", "--backends", "sdpa", "--variants", "full"])
    assert res.exit_code == 1
    assert "wrong" in res.output


def test_list() -> None:
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0
    for word in ("sliding_window", "performer", "sdpa", "flex", "cpu-quick", "cpu-full", "gpu"):
        assert word in res.output
