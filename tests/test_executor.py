"""Where a sweep's rows run (``attn-bench sweep --executor local|ray``): the options refused before
any row starts, the local executor with one worker per device, where each row records it ran,
and device-check's sweep over several GPUs. The Ray cluster itself: tests/test_cluster.py."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_configs
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.core.config import BenchConfig, BenchResult, RunSettings
from attn_bench.core.executor import LocalExecutor, cuda_indices
from attn_bench.core.results import RESULTS, read_results
from attn_bench.core.worker import WorkerPool
from attn_bench.sweep.run import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = RunSettings(min_run_time=0.005, min_repeats=3, timeout_s=120)
TINY = ["--variants", "full", "--backends", "torch", "--seq-lens", "32", "--heads", "1", "--head-dim", "16"]
runner = CliRunner()


def _refused(tmp_path: Path, *args: str) -> str:
    """Run ``attn-bench sweep`` with ``args``; it must exit 2 before any row, in one message."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = runner.invoke(app, ["sweep", "--out", str(out), *TINY, "--no-progress", *args], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and time.monotonic() - t0 < 60
    assert not (out / RESULTS).exists()
    return " ".join(res.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--executor", "slurm"], "--executor: unknown executor 'slurm'; executors are local, ray"),
        (["--address", "10.0.0.1:6379"], "--address: is for --executor ray"),
        (["--cpus-per-row", "4"], "--cpus-per-row: is for --executor ray"),
        (["--executor", "ray", "--devices", "0,1"], "--devices: is for --executor local"),
        (["--executor", "ray", "--cpus-per-row", "0"], "--cpus-per-row: must be at least 1, got 0"),
        (["--devices", "0,x"], "--devices: expected 'all' or a comma list of CUDA device indices"),
        (["--devices", "0,0"], "--devices: a device is listed twice"),
        (
            ["--devices", "0,1"],
            "--devices: spreads CUDA rows over GPUs (their device 'cuda'); these configs run on cpu",
        ),
        (["--executor", "ray", "--address", "nowhere"], "--address: expected HOST:PORT, ray://HOST:PORT or auto"),
        (["--device", "cuda:1", "--executor", "ray"], "--device: cuda:1: with --executor ray each row's worker"),
    ],
)
def test_bad_executor_options_exit_2_before_any_row(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in _refused(tmp_path, *args)


def test_an_address_that_does_not_answer_is_refused_at_once(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = _refused(tmp_path, "--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert f"--address: no Ray cluster answers at 127.0.0.1:{port}" in text


def test_ray_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    text = _refused(tmp_path, "--executor", "ray")
    assert "--executor: ray is not installed here; install the cluster extra" in text
    assert "attention-variants-bench[cluster]" in text


def test_cuda_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert cuda_indices(None) is None
    assert cuda_indices("0, 2,cuda:3") == ["0", "2", "3"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert cuda_indices("all") == ["0", "1", "2"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="none is visible"):
        cuda_indices("all")
    with pytest.raises(ValueError, match="indices"):
        cuda_indices("")


def env_job(msg: dict, settings: RunSettings, progress) -> dict:
    """A worker job (run in the worker process): the row of ``msg`` with the worker's
    ``CUDA_VISIBLE_DEVICES`` in its note."""
    import os

    cfg = BenchConfig(**{**msg, "options": tuple(map(tuple, msg["options"]))})
    return BenchResult(cfg, "ok", time_ms=1.0, note=os.environ.get("CUDA_VISIBLE_DEVICES", "")).to_row()


def test_each_worker_sees_its_own_device(tmp_path: Path) -> None:
    pools = [
        WorkerPool(SETTINGS, str(tmp_path / "w.log"), job="test_executor:env_job", env={"CUDA_VISIBLE_DEVICES": d})
        for d in "31"
    ]
    try:
        for pool in pools:
            pool.begin(tiny_configs(32)[0])
        got = {}
        deadline = time.monotonic() + 120
        while len(got) < 2 and time.monotonic() < deadline:
            for i, pool in enumerate(pools):
                if (res := pool.poll(0.2)) is not None:
                    got[i] = res
        assert [got[0].note, got[1].note] == ["3", "1"]
    finally:
        for pool in pools:
            pool.close()


def test_local_executor_runs_rows_at_once_and_a_crash_costs_one_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ATTN_BENCH_FAULT", "crash:48")
    ex = LocalExecutor(SETTINGS, str(tmp_path / "worker.log"), devices=["0", "1"])
    assert ex.slots == 2
    rows = run_sweep(tiny_configs(32, 48, 64, 80), tmp_path / "run", SETTINGS, progress=False, executor=ex)
    status = {r.config.seq_len: r.status for r in rows}
    assert status == {32: "ok", 48: "error", 64: "ok", 80: "ok"}
    assert all(p.starts >= 1 for p in ex.pools)  # both workers took rows
    assert all(p.proc is None for p in ex.pools)  # and were closed
    on_file = read_results(tmp_path / "run" / RESULTS)
    assert sorted(r.config.seq_len for r in on_file) == [32, 48, 64, 80]
    # Where each row ran: the host and the device (the CPU's model), also for the crashed row.
    assert all(r.node == socket.gethostname() and r.device_name for r in on_file)


def test_older_results_without_the_identity_columns_still_read(tmp_path: Path) -> None:
    import pandas as pd

    # A results file written before rows said where they ran: the committed one less those columns.
    frame = pd.read_csv(ROOT / "reports" / "cpu-quick" / RESULTS)
    identity = ["node", "device_name", "device_uuid", "driver"]
    assert set(identity) <= set(frame.columns)
    older = tmp_path / RESULTS
    frame.drop(columns=identity).to_csv(older, index=False)
    rows = read_results(older)
    assert len(rows) == len(frame)
    assert all(r.node == r.device_name == r.device_uuid == r.driver == "" for r in rows)


def test_device_check_sweeps_over_every_gpu(tmp_path: Path) -> None:
    import typer.main

    from attn_bench.device.check import sweep_command

    one = sweep_command(1, tmp_path, 300, "cuda")
    several = sweep_command(4, tmp_path, 300, "cuda")
    assert "--devices" not in one and several[-2:] == ["--devices", "all"]
    assert "--devices" not in sweep_command(4, tmp_path, 300, "cpu")
    group = typer.main.get_command(app)  # the command parses as the CLI's sweep (no GPU needed to parse it)
    ctx = group.make_context("attn-bench", ["sweep"], resilient_parsing=True)
    parsed = group.get_command(ctx, "sweep").make_context("sweep", several[4:])
    assert parsed.params["devices"] == "all" and parsed.params["budget_s"] == 300
