"""The sweep's processes under faults: worker start-up failures, signals, the parent's death, kills that are
not OOM, and the resume bookkeeping (start time, resumes, --retry-failed)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ok_result, tiny_configs
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.core import lifecycle as lifecycle_mod
from attn_bench.core import worker as worker_mod
from attn_bench.core.config import BenchResult, RunSettings
from attn_bench.core.lifecycle import SweepInterrupted
from attn_bench.core.results import METADATA, RESULTS, read_results, write_results
from attn_bench.sweep.run import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = RunSettings(min_run_time=0.005, min_repeats=3, timeout_s=120)
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ATTN_BENCH_FAULT", raising=False)


def _meta(out: Path) -> dict:
    return json.loads((out / METADATA).read_text())


# -- processes, from /proc ------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ...]


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parents.setdefault(int(st[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _workers_of(pid: int) -> list[int]:
    return [p for p in _descendants(pid) if _is_worker(p) and _alive(p)]


def _wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# -- a worker that dies during start-up --------------------------------------------------------


def test_worker_start_failure_is_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "startup:1")  # only the first worker fails to start
    rows = run_sweep(tiny_configs(32, 48), tmp_path, SETTINGS, progress=False)
    assert rows[0].status == "error" and "did not start" in rows[0].error and "exit code 3" in rows[0].error
    assert rows[1].status == "ok"
    meta = _meta(tmp_path)
    assert meta["status"] == "complete" and meta["worker_restarts"] == 1 and meta["rows"] == 2


def test_repeated_start_failures_stop_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "startup")
    out = tmp_path / "run"
    args = ["sweep", "--variants", "full", "--backends", "torch", "--passes", "fwd", "--seq-lens", "32,48,64,80"]
    args += ["--heads", "1", "--head-dim", "16", "--no-causal", "--out", str(out), "--no-progress"]
    res = runner.invoke(app, [*args, "--no-report", "--no-accuracy"], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())  # the console wraps long lines
    assert "Sweep stopped: the benchmark worker did not start (exit code 3)" in text, text
    assert "3 failed starts in a row" in text and "Traceback" not in text
    rows = read_results(out / RESULTS)
    assert [r.status for r in rows] == ["error"] * 3  # the fourth config was not tried
    meta = _meta(out)
    assert meta["status"] == "failed" and "did not start" in meta["error"] and meta["rows"] == 3


# -- signals, and the parent's death -----------------------------------------------------------


@LINUX_PROC
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_signal_during_a_long_config_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "hang:48")
    sent: list[float] = []

    def send() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signum)

    def unhandled(sig, frame):  # what the test sees if the sweep does not handle SIGHUP itself
        raise AssertionError(f"{signal.Signals(sig).name} was not handled by the sweep")

    def after_first(res: BenchResult) -> None:
        threading.Timer(1.0, send).start()  # by then the worker sleeps in the second config

    sigint = signal.getsignal(signal.SIGINT)
    old = signal.signal(signal.SIGHUP, unhandled)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            run_sweep(tiny_configs(32, 48, 64), tmp_path, SETTINGS, progress=False, on_result=after_first)
        # The sweep put the handlers back.
        assert signal.getsignal(signal.SIGHUP) is unhandled and signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGHUP, old)
    assert time.monotonic() - sent[0] < 3.0  # the worker is killed, not waited for
    if signum != signal.SIGINT:
        assert isinstance(info.value, SweepInterrupted) and info.value.signum == signum
    assert [r.config.seq_len for r in read_results(tmp_path / RESULTS)] == [32]
    assert _meta(tmp_path)["status"] == "interrupted"
    assert _workers_of(os.getpid()) == []


def test_second_signal_exits_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the first Ctrl-C is being handled (rows and metadata saved), a second one exits."""

    class Exited(BaseException):
        pass

    def fake_exit(code: int) -> None:
        raise Exited(code)

    real_write = lifecycle_mod.write_metadata

    def write_metadata(out: Path, meta: dict) -> None:
        if meta["status"] == "interrupted":
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, during the clean-up
            time.sleep(1)  # the handler runs here
        real_write(out, meta)

    def interrupt(res: BenchResult) -> None:
        raise KeyboardInterrupt

    def unhandled(sig, frame):  # what the test sees if the sweep does not handle the second Ctrl-C
        raise AssertionError("the second Ctrl-C was not handled by the sweep")

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(lifecycle_mod, "write_metadata", write_metadata)
    previous = signal.signal(signal.SIGINT, unhandled)
    try:
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        # A tiny budget: rows are 'skipped' without a worker, and the first one is interrupted.
        with pytest.raises(Exited) as info:
            run_sweep(tiny_configs(32, 48), tmp_path, SETTINGS, progress=False, on_result=interrupt, budget_s=0.1)
        assert info.value.args == (128 + signal.SIGINT,)
        assert {sig: signal.getsignal(sig) for sig in old} == old
    finally:
        signal.signal(signal.SIGINT, previous)


@LINUX_PROC
@pytest.mark.slow
def test_parent_killed_mid_sweep_leaves_no_worker_and_no_lost_row(tmp_path: Path) -> None:
    """Fault injection end to end: SIGTERM, then SIGKILL, of `attn-bench sweep` while its worker
    is inside a long config; no process survives the parent, finished rows stay, resume finishes."""
    preset = tmp_path / "presets.toml"
    preset.write_text(
        "[presets.t]\ndescription = 't'\n[presets.t.settings]\nmin_run_time = 0.005\ntimeout_s = 120\n"
        "[[presets.t.groups]]\nvariants = ['full']\nbackends = ['torch']\nseq_lens = [32, 48, 64]\n"
        "heads = 1\nhead_dim = 16\n"
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "attn_bench.cli", "sweep", "--preset-file", str(preset), "--preset", "t"]
    cmd += ["--out", str(out), "--no-progress", "--no-report", "--no-accuracy"]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTN_BENCH_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])

    def rows() -> list[dict]:
        try:
            with open(out / RESULTS, newline="") as f:
                return list(csv.DictReader(f))
        except FileNotFoundError:
            return []

    def kill_mid_config(extra: list[str], fault: str, done: int, sig: int) -> int:
        with open(tmp_path / f"log-{sig}.txt", "w") as log:
            proc = subprocess.Popen([*cmd, *extra], env={**env, "ATTN_BENCH_FAULT": fault}, stdout=log, stderr=log)
        try:
            _wait_for(lambda: len(rows()) == done and _workers_of(proc.pid), 180, "the hanging config")
            time.sleep(0.5)
            family = _descendants(proc.pid)
            assert any(_is_worker(p) for p in family)
            proc.send_signal(sig)
            code = proc.wait(timeout=10)
            _wait_for(lambda: not any(_alive(p) for p in family), 5, "the worker to die with its parent")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return code

    code = kill_mid_config([], "hang:48", 1, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, (tmp_path / f"log-{signal.SIGTERM}.txt").read_text()
    assert [r["seq_len"] for r in rows()] == ["32"]
    meta = _meta(out)
    assert meta["status"] == "interrupted"
    started = meta["started"]

    kill_mid_config(["--resume"], "hang:64", 2, signal.SIGKILL)
    assert [(r["seq_len"], r["status"]) for r in rows()] == [("32", "ok"), ("48", "ok")]
    assert not list(out.glob(".results.csv.*"))

    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [(r["seq_len"], r["status"]) for r in rows()] == [("32", "ok"), ("48", "ok"), ("64", "ok")]
    meta = _meta(out)
    assert meta["status"] == "complete" and meta["started"] == started
    assert [r["previous_status"] for r in meta["resumes"]] == ["interrupted", "running"]


@LINUX_PROC
def test_ctrl_c_leaves_a_partial_report_listing_what_did_not_run(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) of `attn-bench sweep` while its worker is in the third of four configs: the
    report is written with the two configs that never ran listed, the message names both ways on
    (--resume and report), and `attn-bench report` writes the same list again."""
    preset = tmp_path / "presets.toml"
    preset.write_text(
        "[presets.t]\ndescription = 't'\n[presets.t.settings]\nmin_run_time = 0.005\ntimeout_s = 120\n"
        "remeasure = 0\n[[presets.t.groups]]\nvariants = ['full']\nbackends = ['torch']\n"
        "seq_lens = [32, 48, 64, 80]\nheads = 1\nhead_dim = 16\n"
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "attn_bench.cli", "sweep", "--preset-file", str(preset), "--preset", "t"]
    cmd += ["--out", str(out), "--no-progress", "--no-accuracy"]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTN_BENCH_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["ATTN_BENCH_FAULT"] = "hang:64"

    def done() -> int:
        try:
            return len(read_results(out / RESULTS, warn=None))
        except OSError:
            return 0

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: done() == 2 and _workers_of(proc.pid), 180, "the hanging config")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, output
    assert f"attn-bench sweep --out {out} --resume" in output and f"attn-bench report {out}" in output
    assert "2 of 4 configs have a row" in output and "2 did not run" in output

    def not_run(page: str) -> list[str]:
        section = page.split("## Rows that did not run")[1].split("\n## ")[0]
        return sorted(ln.split("|")[3].strip() for ln in section.splitlines() if "| not run |" in ln)

    page = (out / "README.md").read_text()
    assert "**Interrupted**" in page.split("## Headline")[0]
    assert not_run(page) == ["64", "80"]
    (out / "README.md").unlink()
    res = runner.invoke(app, ["report", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert not_run((out / "README.md").read_text()) == ["64", "80"]


# -- a SIGKILL is an OOM kill only with evidence -------------------------------------------------


def test_sigkill_without_oom_evidence_is_not_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "kill:32")
    monkeypatch.setattr(worker_mod, "oom_kill_counts", lambda: {"/proc/vmstat": 7})  # other tenants' OOMs
    (row,) = run_sweep(tiny_configs(32), tmp_path, SETTINGS, progress=False)
    assert row.status == "error" and "killed (signal 9)" in row.error and "out-of-memory" in row.error


def test_oom_evidence(tmp_path: Path) -> None:
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("4:memory:/job\n0::/job2\n")
    (proc / "vmstat").write_text("pgfault 10\noom_kill 2\n")
    (proc / "meminfo").write_text("MemTotal:       8388608 kB\nMemFree:  1 kB\n")
    (cg / "memory" / "job").mkdir(parents=True)
    (cg / "memory" / "job" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (cg / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    (cg / "job2").mkdir()
    (cg / "job2" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    (cg / "job2" / "memory.max").write_text("max\n")
    before = worker_mod.oom_kill_counts(proc, cg)
    assert sorted(before.values()) == [0, 1, 2]
    assert worker_mod.memory_limit_bytes(proc, cg) == 2 << 30
    (cg / "job2" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n")
    after = worker_mod.oom_kill_counts(proc, cg)
    assert "memory.events went from 0 to 1" in worker_mod.oom_evidence(before, after, None, None)
    assert worker_mod.oom_evidence(before, before, 1 << 30, 2 << 30) is None
    assert "peak RSS" in worker_mod.oom_evidence(before, before, 2 << 30, 2 << 30)


# -- resume bookkeeping ---------------------------------------------------------------------


def test_resume_keeps_started_and_lists_resumes(tmp_path: Path) -> None:
    cfgs = tiny_configs(32, 48)
    run_sweep(cfgs, tmp_path, SETTINGS, meta={"started": "first", "command": "a"}, progress=False, budget_s=0.1)
    for i in range(2):
        meta = {"started": f"resume {i}", "command": f"b{i}"}
        run_sweep(cfgs, tmp_path, SETTINGS, resume=True, meta=meta, progress=False, budget_s=0.1)
    meta = _meta(tmp_path)
    assert meta["started"] == "first"
    assert [r["command"] for r in meta["resumes"]] == ["b0", "b1"]
    assert all(r["previous_status"] == "complete" for r in meta["resumes"])


def test_retry_failed(tmp_path: Path) -> None:
    cfgs = tiny_configs(32, 48, 64, 80, 96, 112)
    old = [
        ok_result(cfgs[0]),
        BenchResult(cfgs[1], "timeout", error="no result after 1 s"),
        BenchResult(cfgs[2], "error", error="worker crashed"),
        BenchResult(cfgs[3], "wrong", error="max err"),
        BenchResult(cfgs[4], "oom", error="worker killed by the out-of-memory killer"),
        dataclasses.replace(ok_result(cfgs[5]), noisy=True, spread=0.9),  # measured on a busy machine
    ]
    write_results(tmp_path / RESULTS, old)
    ran: list[BenchResult] = []
    assert run_sweep(cfgs, tmp_path, SETTINGS, resume=True, progress=False, on_result=ran.append) == old
    assert ran == []  # a plain resume keeps failed rows
    rows = run_sweep(cfgs, tmp_path, SETTINGS, resume=True, retry_failed=True, progress=False, on_result=ran.append)
    assert [r.config for r in ran] == [cfgs[1], cfgs[2], cfgs[4], cfgs[5]]
    assert [r.config for r in rows] == cfgs  # replaced in place
    assert [r.status for r in rows] == ["ok", "ok", "ok", "wrong", "ok", "ok"] and rows[0] == old[0]
    assert rows[5].spread != 0.9  # measured again
    assert _meta(tmp_path)["resumes"][-1]["retry_failed"] is True
    res = runner.invoke(app, ["sweep", "--out", str(tmp_path), "--retry-failed"])
    assert res.exit_code == 2 and "--resume" in res.output
