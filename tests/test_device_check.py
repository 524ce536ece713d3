"""``attn-bench device-check`` and the pieces it stands on: the sweep's time budget, verify's
CSV and resume, the summary's kernel table and the pytest log parser. Without CUDA the check runs
dry; ``device="cpu"`` drives every step on the CPU so that the summary is built from real rows."""

from __future__ import annotations

import csv
import json
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from attn_bench.cli import app, default_preset
from attn_bench.core.config import BenchConfig, RunSettings
from attn_bench.core.results import read_results
from attn_bench.device.check import MAX_FILES, SUMMARY, device_check
from attn_bench.device.probe import gpu_test_workers
from attn_bench.device.summary import kernel_table, pytest_counts
from attn_bench.sweep.run import run_sweep

runner = CliRunner()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the dry run of a machine without CUDA")


@NO_CUDA
def test_dry_run_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["device-check", "--out", str(out), "--budget-s", "60"])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all((out / f).is_file() for f in files), files
    summary = (out / SUMMARY).read_text()
    assert "dry run" in summary
    for step in ("gpu-tests", "verify", "cp", "sweep"):
        assert f"| {step} | skipped |" in summary, summary
    assert "CUDA is not available" in summary
    record = json.loads((out / "device-check.json").read_text())
    assert [s["name"] for s in record["steps"]] == ["environment", "gpu-tests", "verify", "cp", "sweep", "report"]
    assert record["environment"]["cuda_available"] is False
    with tarfile.open(out / "device-check.tar.gz") as tar:
        names = tar.getnames()
    assert "device-check/SUMMARY.md" in names and "device-check/environment.json" in names


def test_every_step_on_the_cpu(tmp_path: Path) -> None:
    """The verify, sweep and report steps for real (on the CPU, tiny shapes), and the summary from their rows."""
    out = tmp_path / "out"
    sweep = ("--variants", "full,sliding_window", "--backends", "sdpa,torch", "--seq-lens", "64")
    sweep += ("--heads", "4", "--head-dim", "16", "--passes", "fwd")
    code = device_check(
        out,
        budget_s=150,
        work=tmp_path / "work",
        echo=lambda *a: None,
        device="cpu",
        sweep_args=sweep,
        verify_args=("--quick", "--variants", "full"),
    )
    assert code == 0
    assert len(list(out.iterdir())) <= MAX_FILES
    record = json.loads((out / "device-check.json").read_text())
    steps = {s["name"]: s for s in record["steps"]}
    assert steps["sweep"]["status"] == "ok" and steps["report"]["status"] == "ok", steps
    assert steps["verify"]["status"] in ("ok", "timeout"), steps["verify"]
    rows = _rows(tmp_path / "work" / "device-check" / "sweep" / "results.csv")
    assert rows and {r["status"] for r in rows} <= {"ok", "unsupported"}
    summary = (out / SUMMARY).read_text()
    table = summary.split("## Triton vs SDPA vs FlexAttention")[1].split("## Steps")[0]
    assert "| full |" in table and "| sliding_window w=256 |" in table
    assert "sdpa ok" in table and "torch ok" in table
    verify_rows = _rows(tmp_path / "work" / "device-check" / "verify.csv")
    assert verify_rows and all(r["variant"] == "full" for r in verify_rows)
    with tarfile.open(out / "device-check.tar.gz") as tar:
        names = tar.getnames()
    assert "device-check/sweep/results.csv" in names and "device-check/sweep/README.md" in names


def _configs(n: int) -> list[BenchConfig]:
    return [BenchConfig("full", "torch", seq_len=s, heads=1, head_dim=16) for s in (16, 32, 48)[:n]]


def test_sweep_budget_records_rows_not_reached(tmp_path: Path) -> None:
    rows = run_sweep(_configs(3), tmp_path, RunSettings(), budget_s=0.5, progress=False)
    assert [r.status for r in rows] == ["skipped"] * 3
    assert all("budget" in r.error for r in rows)
    assert [r.status for r in read_results(tmp_path / "results.csv")] == ["skipped"] * 3
    assert json.loads((tmp_path / "metadata.json").read_text())["budget_s"] == 0.5


def test_sweep_budget_cuts_a_hanging_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "hang")
    t0 = time.monotonic()
    rows = run_sweep(_configs(2), tmp_path, RunSettings(timeout_s=300), budget_s=6.0, progress=False)
    assert time.monotonic() - t0 < 60
    assert rows[0].status == "timeout" and "budget" in rows[0].error, rows[0]
    assert rows[1].status == "skipped"


def test_verify_csv_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "verify.csv"
    args = ["verify", "--quick", "--variants", "full", "--dtypes", "float32", "--backends", "torch,sdpa"]
    res = runner.invoke(app, [*args, "--csv", str(path)])
    assert res.exit_code == 0, res.output
    first = _rows(path)
    assert len(first) == 4 and {r["status"] for r in first} == {"ok"}
    assert all(float(r["max_err"]) <= float(r["bound"]) for r in first)
    res = runner.invoke(app, [*args, "--csv", str(path), "--resume"])
    assert res.exit_code == 0, res.output
    assert len(_rows(path)) == 4  # nothing run twice
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code != 0 and "--csv" in res.output


def test_kernel_table_shows_failures_with_their_errors() -> None:
    base = dict(variant="full", window=None, num_features=None, device="cuda", dtype="bfloat16", batch=1)
    base |= dict(heads=16, kv_heads=16, head_dim=128, causal=False, seq_len=4096, error="", flops=4e12)
    rows = [
        {**base, "pass": "fwd", "backend": "triton", "status": "ok", "time_ms": 2.0, "tflops": 200.0},
        {**base, "pass": "fwd", "backend": "sdpa", "status": "ok", "time_ms": 1.0, "tflops": 400.0},
        {**base, "pass": "fwd_bwd", "backend": "triton", "status": "error", "time_ms": None, "tflops": None}
        | {"error": "AcceleratorError: CUDA error: an illegal memory access was encountered"},
        {**base, "pass": "fwd_bwd", "backend": "sdpa", "status": "wrong", "time_ms": None, "tflops": None},
    ]
    tab = kernel_table(pd.DataFrame(rows), matmul_tflops=800.0)
    fwd, bwd = tab.iloc[0], tab.iloc[1]
    assert fwd["triton ms"] == "2" and fwd["sdpa ms"] == "1" and fwd["sdpa/triton"] == "0.50x"
    assert fwd["% of matmul"] == "25%" and fwd["gate"] == "triton ok; sdpa ok"
    assert bwd["triton ms"] == "ERROR" and bwd["sdpa ms"] == "WRONG"
    assert "illegal memory access" in bwd["gate"] and "sdpa FAIL" in bwd["gate"]


def test_pytest_counts() -> None:
    done = "...\n===== 3 failed, 95 passed, 4 skipped, 2 errors in 81.20s (0:01:21) =====\n"
    assert pytest_counts(done) == {"failed": 3, "passed": 95, "skipped": 4, "error": 2}
    cut = "[gw0] [ 1%] PASSED tests/a.py::t[1]\n[gw1] [ 2%] FAILED tests/a.py::t[2]\n[gw0] PASSED tests/a.py::t[3]\n"
    assert pytest_counts(cut) == {"passed": 2, "failed": 1, "unfinished": 1}


def test_default_preset_follows_cuda() -> None:
    preset, why = default_preset()
    if torch.cuda.is_available():
        assert preset == "gpu-quick" and "CUDA is available" in why
    else:
        assert preset == "cpu-quick" and "gpu-quick" in why


def test_list_shows_gpu_quick_with_its_count() -> None:
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0
    line = next(ln for ln in res.output.splitlines() if "gpu-quick" in ln)
    assert "176" in line


def test_gpu_test_workers_fit_the_gpu_memory() -> None:
    assert gpu_test_workers(16, 139.8) == 4  # H200
    assert gpu_test_workers(16, 79.6) == 2  # H100
    assert gpu_test_workers(2, 139.8) == 1
    assert gpu_test_workers(16, None) == 1


def test_cp_step_needs_two_gpus_and_covers_the_ring_target(tmp_path: Path) -> None:
    from attn_bench.device.check import CP_N_PER_RANK, cp_command

    assert cp_command(1, tmp_path, 60) is None
    cmd = cp_command(6, tmp_path, 60)
    assert cmd is not None
    args = dict(zip(cmd[4::2], cmd[5::2], strict=False))  # after "python -m attn_bench.cli cp"
    assert args["--device"] == "cuda" and args["--ranks"] == "1,2,4"
    assert int(args["--n"]) >= 16384 == CP_N_PER_RANK
    # the command parses as the CLI's cp command (no GPU needed to parse it)
    import typer.main

    from attn_bench.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("attn-bench", ["cp"], resilient_parsing=True)
    group.get_command(ctx, "cp").make_context("cp", cmd[4:])
