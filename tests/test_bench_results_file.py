"""results.csv on disk: damaged files on resume and in the report, permissions that follow the umask,
and the leftovers of killed runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ok_result, tiny_configs
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.core.config import BenchResult, RunSettings
from attn_bench.core.results import METADATA, RESULTS, ResultsFileError, read_results, write_results
from attn_bench.sweep.run import run_sweep

SETTINGS = RunSettings(min_run_time=0.005, min_repeats=3, timeout_s=120)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ATTN_BENCH_FAULT", raising=False)


def _meta(out: Path) -> dict:
    return json.loads((out / METADATA).read_text())


# -- damaged results.csv -------------------------------------------------------------------------


def _written(path: Path, n: int = 3) -> list[BenchResult]:
    res = [ok_result(c) for c in tiny_configs(*range(32, 32 + 16 * n, 16))]
    write_results(path, res)
    return res


def test_garbage_and_truncated_lines_are_skipped_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / RESULTS
    res = _written(path)
    lines = path.read_text().splitlines(keepends=True)
    # A garbage line in the middle, a truncated last row, and garbage at the very end.
    damaged = [*lines[:2], "\x00garbage;;\n", *lines[2:], lines[1][:40] + "\n", "!!"]
    path.write_text("".join(damaged))
    messages: list[str] = []
    assert read_results(path, warn=messages.append) == res
    assert len(messages) == 3
    assert messages[0].startswith(f"{path}:3: skipped") and messages[1].startswith(f"{path}:6: skipped")
    assert messages[2].startswith(f"{path}:7: skipped")

    # A row cut inside its status, or with a value that does not parse.
    path.write_text("".join([*lines[:2], lines[2].replace(",ok,", ",o,"), lines[3].replace(",16,", ",x,", 1)]))
    messages.clear()
    assert read_results(path, warn=messages.append) == res[:1]
    assert "status 'o'" in messages[0] and f"{path}:4:" in messages[1]


def test_foreign_or_missing_columns_are_refused(tmp_path: Path) -> None:
    path = tmp_path / RESULTS
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ResultsFileError, match=re.escape(f"{path}:1: not the columns of a results.csv; missing var")):
        read_results(path)
    _written(path)
    lines = path.read_text().splitlines()
    at = lines[0].split(",").index("heads")
    dropped = [",".join(x.split(",")[:at] + x.split(",")[at + 1 :]) for x in lines]  # without `heads`
    path.write_text("\n".join(dropped) + "\n")
    with pytest.raises(ResultsFileError, match="missing heads"):
        read_results(path)
    # Through the CLI: a clear message and exit status 2, not a traceback.
    args = ["sweep", "--variants", "full", "--backends", "torch", "--out", str(tmp_path), "--resume"]
    res = runner.invoke(app, [*args, "--no-progress", "--no-report", "--no-accuracy"])
    assert res.exit_code == 2 and "missing heads" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "missing heads" in res.output


def test_resume_reruns_a_truncated_row(tmp_path: Path) -> None:
    cfgs = tiny_configs(32, 48, 64)
    write_results(tmp_path / RESULTS, [ok_result(c) for c in cfgs])
    text = (tmp_path / RESULTS).read_text()
    (tmp_path / RESULTS).write_text(text[: text.rindex("\n", 0, -1) + 40])  # the last row cut short
    ran: list[BenchResult] = []
    rows = run_sweep(cfgs, tmp_path, SETTINGS, resume=True, progress=False, on_result=ran.append)
    assert [r.config for r in ran] == cfgs[2:]
    assert [r.config for r in rows] == cfgs and rows[2].status == "ok" and rows[2].time_ms != 1.0
    assert read_results(tmp_path / RESULTS) == rows


def test_report_leaves_garbage_out(tmp_path: Path) -> None:
    from attn_bench.sweep.analysis import load_results
    from attn_bench.sweep.report import write_report

    _written(tmp_path / RESULTS)
    with open(tmp_path / RESULTS, "a") as f:
        f.write("XYZZY garbage line\n")
    assert len(load_results(tmp_path)) == 3
    assert "XYZZY" not in write_report(tmp_path).read_text()


# -- permissions follow the umask -----------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        run_sweep(tiny_configs(32), tmp_path, SETTINGS, progress=False, budget_s=0.1)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = plain.stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in (RESULTS, METADATA):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


# -- leftovers of killed runs ----------------------------------------------------------------------


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = [tmp_path / f".results.csv.{dead.pid}.abc_123", tmp_path / ".metadata.json.k2j4h5g6"]
    live = tmp_path / f".results.csv.{os.getpid()}.xyz"
    other = tmp_path / ".notes.txt.abc"
    for f in [*stale, live, other]:
        f.write_text("partial")
    run_sweep(tiny_configs(32), tmp_path, SETTINGS, progress=False, budget_s=0.1)
    assert not any(f.exists() for f in stale)
    assert live.exists() and other.exists()
