"""``attn-bench sweep --executor ray`` against a real Ray cluster started here: a head and two
worker nodes on 127.0.0.1 with one core each (``ray.cluster_utils.Cluster``, as Ray's own tests
start theirs), shared by the tests of this file; the last one replaces its worker nodes.

Marked ``ray`` (each takes seconds to tens of seconds on two cores): run them with ``pytest -m ray``
where the cluster extra is installed. Every wait has a timeout: the sweep's own (``--timeout``),
and the cluster's start and its new node (``wait_for_nodes``)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import tiny_configs
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.core.config import RunSettings
from attn_bench.core.results import METADATA, RESULTS, read_results

pytestmark = pytest.mark.ray
runner = CliRunner()
SETTINGS = RunSettings(min_run_time=0.005, min_repeats=3, timeout_s=60)
TINY = ["--variants", "full,performer", "--backends", "torch,sdpa", "--passes", "fwd", "--heads", "1"]
TINY += ["--head-dim", "16", "--no-causal", "--num-features", "16", "--no-progress", "--no-report", "--no-accuracy"]
START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster():
    # Ray binds to the machine's address unless told to stay on loopback (read when ray is imported).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        pytest.importorskip("ray")
        from ray.cluster_utils import Cluster

        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            workers = [c.add_node(num_cpus=1) for _ in range(2)]
            c.wait_for_nodes(timeout=START_TIMEOUT_S)
            assert c.address.startswith("127.0.0.1:"), c.address
            c.workers = workers
            yield c
        finally:
            c.shutdown()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ATTN_BENCH_FAULT", raising=False)


def _sweep(out: Path, *args: str, expect: int = 0):
    res = runner.invoke(app, ["sweep", "--out", str(out), *TINY, *args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res


def _text(res) -> str:
    """The command's output as one line (the console wraps long lines, errors in a box)."""
    return " ".join(res.output.replace("│", " ").split())


def _by_key(out: Path) -> dict:
    return {r.config.key(): r for r in read_results(out / RESULTS)}


def test_same_rows_and_gate_verdicts_as_the_local_executor(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "wrong:48")  # the numerics gate must refuse the N=48 rows
    _sweep(tmp_path / "local", "--seq-lens", "32,48")
    res = _sweep(tmp_path / "ray", "--seq-lens", "32,48", "--executor", "ray", "--address", cluster.address)
    text = _text(res)
    assert "rows on a Ray cluster (3 node(s) alive, 0 GPU(s), 2 core(s); 2 rows at once)" in text, text
    local, ray = _by_key(tmp_path / "local"), _by_key(tmp_path / "ray")
    assert set(local) == set(ray) and len(ray) == 8
    for key, row in ray.items():
        assert row.status == local[key].status, (key, row.error, local[key].error)
        want = "wrong" if row.config.seq_len == 48 else "ok"
        assert row.status == want, (key, row.status, row.error)
        assert row.node and row.device_name  # where it ran, from the node's own worker
        if row.status == "ok" and row.max_err is not None:
            assert row.max_err <= row.err_bound
    meta = json.loads((tmp_path / "ray" / METADATA).read_text())
    assert meta["status"] == "complete" and meta["executor"]["kind"] == "ray" and meta["executor"]["slots"] == 2
    assert (tmp_path / "ray" / "worker.log").read_text().count("--- full/torch N=32") == 1


def test_a_crash_a_hang_and_a_stalled_task_cost_one_row_each(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attn_bench.core import ray_executor

    # The stalled task is cancelled 25 s after its timeout (time enough for the others' workers to start).
    monkeypatch.setattr(ray_executor, "TASK_GRACE_S", 25.0)
    monkeypatch.setenv("ATTN_BENCH_FAULT", "crash:48,hang:64,stall:80")
    out = tmp_path / "run"
    args = ["--variants", "full", "--backends", "torch", "--seq-lens", "32,48,64,80,96", "--timeout", "8"]
    t0 = time.monotonic()
    _sweep(out, "--executor", "ray", "--address", cluster.address, *args)
    assert time.monotonic() - t0 < 150
    rows = {r.config.seq_len: r for r in read_results(out / RESULTS)}
    assert rows[32].status == rows[96].status == "ok"
    assert rows[48].status == "error" and "worker crashed (exit code 139)" in rows[48].error
    assert rows[64].status == "timeout" and "worker killed" in rows[64].error
    assert rows[80].status == "timeout" and "task cancelled and its Ray worker killed" in rows[80].error
    # A row its worker never sent (the crash, the hang) still names its node, from the task.
    assert all(rows[n].node and rows[n].device_name for n in (32, 48, 64, 96))


def test_a_cluster_without_a_gpu_refuses_a_cuda_sweep(cluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _sweep(
        out, "--seq-lens", "32", "--device", "cuda", "--executor", "ray", "--address", cluster.address, expect=2
    )
    assert "--device: the configs run on CUDA and the Ray cluster has no GPU" in _text(res), _text(res)
    assert "Traceback" not in res.output
    assert not (out / RESULTS).exists()


def test_killed_node_and_ctrl_c_lose_no_finished_row(cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both worker nodes killed mid-run, a new one joining: the rows in flight run again there, no
    finished row is lost; then Ctrl-C mid-run and --resume: the rows kept are not run again, and
    the run completes."""
    from attn_bench.core.ray_executor import RayExecutor
    from attn_bench.sweep.run import run_sweep

    configs = tiny_configs(32, 40, 48, 56, 64, 72)
    out = tmp_path / "run"
    seen: list = []

    def kill_the_nodes(res) -> None:
        seen.append(res)
        # From the second row on, the row in flight has just started (when the first finished) and
        # takes its second or so of timing: lost with its node, well before its end. (Ray itself can
        # stumble when a node dies as its task's result comes back.)
        if cluster.workers == first_nodes and len(seen) >= 2 and ex.inflight:
            while cluster.workers:
                cluster.remove_node(cluster.workers.pop(), allow_graceful=False)
            cluster.workers.append(cluster.add_node(num_cpus=1))
            cluster.wait_for_nodes(timeout=START_TIMEOUT_S)

    first_nodes = list(cluster.workers)
    slow = dataclasses.replace(SETTINGS, min_run_time=0.3)
    ex = RayExecutor(slow, str(tmp_path / "worker.log"), {"cpu"}, address=cluster.address)
    rows = run_sweep(configs, out, slow, progress=False, on_result=kill_the_nodes, executor=ex)
    assert ex.lost >= 1
    assert sorted(r.config.seq_len for r in rows) == [32, 40, 48, 56, 64, 72]
    assert all(r.status == "ok" for r in rows), [(r.status, r.error) for r in rows]
    assert cluster.workers != first_nodes
    first = seen[0]
    assert _by_key(out)[first.config.key()] == first  # written before the kill, kept as it was

    def interrupt(res) -> None:  # Ctrl-C, a moment after the second row, while others are in flight
        if len(read_results(out2 / RESULTS)) == 2:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()

    out2 = tmp_path / "again"
    ex = RayExecutor(SETTINGS, None, {"cpu"}, address=cluster.address)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(configs, out2, SETTINGS, progress=False, on_result=interrupt, executor=ex)
    kept = _by_key(out2)
    assert 2 <= len(kept) < 6 and json.loads((out2 / METADATA).read_text())["status"] == "interrupted"
    assert not ex.inflight  # the tasks in flight were cancelled
    ran: list = []
    ex = RayExecutor(SETTINGS, None, {"cpu"}, address=cluster.address)
    rows = run_sweep(configs, out2, SETTINGS, resume=True, progress=False, on_result=ran.append, executor=ex)
    assert len(rows) == 6 and all(r.status == "ok" for r in rows)
    assert len(ran) == 6 - len(kept) and not {r.config.key() for r in ran} & set(kept)
    assert all(_by_key(out2)[k] == r for k, r in kept.items())
    assert json.loads((out2 / METADATA).read_text())["status"] == "complete"
