"""Every bad command-line option gets exit status 2 and one line naming it; resume reproduces a
run's own options; --out never clobbers foreign files; report --compare gates CI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attn_bench.cli import app

runner = CliRunner()
TINY = ["--variants", "full", "--backends", "torch", "--heads", "1", "--head-dim", "16", "--passes", "fwd"]
QUIET = ["--no-progress", "--no-report", "--no-accuracy", "--min-run-time", "0.005"]


def _sweep(*args: str):
    return runner.invoke(app, ["sweep", *args])


def _bad(res, option: str) -> None:
    assert res.exit_code == 2, res.output
    assert option in res.output, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--seq-lens", "1.5"], "--seq-lens"),
        (["--seq-lens", "abc"], "--seq-lens"),
        (["--seq-lens", "-256"], "--seq-lens"),
        (["--seq-lens", "0"], "--seq-lens"),
        (["--seq-lens", ""], "--seq-lens"),
        (["--seq-lens", " , "], "--seq-lens"),
        (["--variants", ""], "--variants"),
        (["--variants", "nope"], "--variants"),
        (["--backends", "nope"], "--backends"),
        (["--dtypes", "float8"], "--dtypes"),
        (["--passes", "bwd"], "--passes"),
        (["--batch", "0"], "--batch"),
        (["--head-dim", "0"], "--head-dim"),
        (["--heads", "x"], "--heads"),
        (["--device", "foo"], "--device"),
        (["--window", "-1"], "--window"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "-5"], "--timeout"),
        (["--mem-limit-gb", "-1"], "--mem-limit-gb"),
        (["--min-run-time", "0"], "--min-run-time"),
        (["--budget-s", "0"], "--budget-s"),
        (["--budget-s", "nan"], "--budget-s"),
        (["--budget-s", "inf"], "--budget-s"),
        (["--seq-lens", "99999999999999999999"], "--seq-lens"),
        (["--batch", "99999999999999999999"], "--batch"),
        (["--seq-lens", "4294967296", "--batch", "4294967296"], "--seq-lens"),
        (["--retry-failed"], "--retry-failed"),
        (["--preset-file", "missing.toml"], "--preset-file"),
        (["--plugin", "missing_plugin.py"], "--plugin"),
        (["--plugin", "no_such_module_xyz"], "--plugin"),
    ],
)
def test_bad_sweep_options(tmp_path: Path, args: list[str], option: str) -> None:
    _bad(_sweep(*TINY, "--out", str(tmp_path / "run"), *QUIET, *args), option)
    assert not (tmp_path / "run" / "results.csv").exists()


def test_resume_and_overwrite_together(tmp_path: Path) -> None:
    res = _sweep(*TINY, "--out", str(tmp_path), "--resume", "--overwrite")
    assert res.exit_code == 2 and "--overwrite" in res.output


def test_unusable_out(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _bad(_sweep(*TINY, "--out", str(a_file), *QUIET), "--out")
    _bad(_sweep(*TINY, "--out", str(a_file / "under"), *QUIET), "--out")
    _bad(_sweep(*TINY, "--out", "", *QUIET), "--out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _bad(_sweep(*TINY, "--out", str(locked / "run"), *QUIET), "--out")


def test_out_with_foreign_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("my own notes")
    res = _sweep(*TINY, "--seq-lens", "32", "--out", str(tmp_path), *QUIET)
    _bad(res, "--out")
    assert (tmp_path / "README.md").read_text() == "my own notes"


def test_resume_alone_reproduces_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _sweep(*TINY, "--seq-lens", "32,48", "--out", str(out), *QUIET)
    assert first.exit_code == 0, first.output
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sweep"]["options"]["seq_lens"] == "32,48"
    # Lose the last row, then resume with no options: only that config runs again.
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:-1]))
    again = _sweep("--out", str(out), "--resume", *QUIET)
    assert again.exit_code == 0, again.output
    assert f"{len(lines) - 1} ok" in again.output  # the same configs, all there again
    # Different options on resume are refused, naming the difference.
    other = _sweep(*TINY, "--seq-lens", "64", "--out", str(out), "--resume", *QUIET)
    assert other.exit_code == 2 and "--resume" in other.output and "seq_lens" in other.output


def test_interrupt_message_gives_a_command_that_resumes(tmp_path: Path, monkeypatch) -> None:
    import attn_bench.sweep.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attn_bench.sweep.run, "run_sweep", interrupted)
    res = _sweep(*TINY, "--seq-lens", "32", "--out", str(tmp_path / "run"), *QUIET)
    assert res.exit_code == 130
    assert f"attn-bench sweep --out {tmp_path / 'run'} --resume" in " ".join(res.output.split())


def test_printed_commands_work_as_typed(tmp_path: Path, monkeypatch) -> None:
    """A command attn-bench prints names the program as the user can type it in this shell: the
    bare name when it is on PATH (an activated venv), else the path it was started by."""
    from attn_bench.core.setup import command_line, program

    bindir = tmp_path / ".venv" / "bin"
    bindir.mkdir(parents=True)
    exe = bindir / "attn-bench"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [".venv/bin/attn-bench", "sweep"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not activated
    assert program() == ".venv/bin/attn-bench"
    assert command_line("sweep", "--out", "a b", "--resume") == ".venv/bin/attn-bench sweep --out 'a b' --resume"
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")  # activated
    assert program() == "attn-bench"
    other = tmp_path / "other"
    other.mkdir()
    (other / "attn-bench").write_text("#!/bin/sh\n")
    (other / "attn-bench").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}:/usr/bin:/bin")  # another attn-bench first on PATH
    assert program() == ".venv/bin/attn-bench"


@pytest.fixture(scope="module")
def a_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    res = _sweep(*TINY, "--backends", "torch,sdpa", "--seq-lens", "32,64", "--out", str(out), *QUIET)
    assert res.exit_code == 0, res.output
    return out


def test_report_options(a_run: Path) -> None:
    a = a_run
    _bad(runner.invoke(app, ["report", str(a), "--threshold", "-1"]), "--threshold")
    _bad(runner.invoke(app, ["report", str(a), "--threshold", "0"]), "--threshold")
    _bad(runner.invoke(app, ["report", str(a), "--baseline", "foo"]), "--baseline")
    _bad(runner.invoke(app, ["report", str(a), "--compare", str(a / "missing")]), "--compare")


def test_report_compare_gates(a_run: Path, tmp_path: Path) -> None:
    a = b = a_run
    same = runner.invoke(app, ["report", str(a), "--compare", str(b)])
    assert same.exit_code == 0, same.output
    assert "0 regression(s)" in same.output
    # The earlier run 10x faster: every common row regresses, exit 1.
    slow = tmp_path / "slow"
    slow.mkdir()
    text = (b / "results.csv").read_text().splitlines()
    header = text[0].split(",")
    t = header.index("time_ms")
    rows = [line.split(",") for line in text[1:]]
    for r in rows:
        r[t] = str(float(r[t]) / 10)
    (slow / "results.csv").write_text("\n".join([text[0], *(",".join(r) for r in rows)]) + "\n")
    res = runner.invoke(app, ["report", str(a), "--compare", str(slow)])
    assert res.exit_code == 1 and "regression" in res.output
    # Nothing in common: exit 3.
    other = tmp_path / "other"
    other.mkdir()
    lines = [text[0]] + [line.replace(",32,", ",4096,", 1).replace(",64,", ",8192,", 1) for line in text[1:]]
    (other / "results.csv").write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["report", str(a), "--compare", str(other)])
    assert res.exit_code == 3 and "No row in common" in res.output


@pytest.mark.parametrize(
    ("command", "cli_args", "kwargs", "option"),
    [
        ("sweep", ["--timeout", "-1"], {"timeout": -1.0}, "--timeout"),
        ("sweep", ["--seq-lens", "abc"], {"seq_lens": "abc"}, "--seq-lens"),
        ("sweep", ["--retry-failed"], {"retry_failed": True}, "--retry-failed"),
        ("model", ["--archs", "gpt"], {"archs": "gpt"}, "--archs"),
        ("model", ["--layers", "0"], {"layers": 0}, "--layers"),
        ("task", ["--preset", "nope"], {"preset": "nope"}, "--preset"),
        ("cp", ["--ranks", "x"], {"ranks": "x"}, "--ranks"),
    ],
)
def test_api_and_cli_refuse_alike(command, cli_args, kwargs, option, tmp_path: Path) -> None:
    """A job's function refuses a bad option with the message the CLI prints for it (one check)."""
    from attn_bench.core.results import RunSetupError
    from attn_bench.cp.command import cp_command
    from attn_bench.model.command import model_command
    from attn_bench.sweep.command import sweep_command
    from attn_bench.task.command import train_study
    from attn_bench.task.report import write_task_report
    from attn_bench.task.run import load_task_presets

    jobs = {
        "sweep": sweep_command,
        "model": model_command,
        "cp": cp_command,
        "task": lambda **kw: train_study(
            kind="task", default="task-quick", presets=load_task_presets(), write_report=write_task_report, **kw
        ),
    }
    out = tmp_path / "run"
    with pytest.raises(RunSetupError) as info:
        jobs[command](out=out, **kwargs)
    assert info.value.option == option
    res = runner.invoke(app, [command, *cli_args, "--out", str(out)])
    _bad(res, option)
    assert " ".join(str(info.value).split()) in " ".join(res.output.replace("│", " ").split())
    assert not out.exists()


@pytest.mark.parametrize("args", [["--budget-s", "nan"], ["--seq-lens", "99999999999999999999"]])
def test_bad_decode_options(tmp_path: Path, args: list[str]) -> None:
    res = runner.invoke(app, ["decode", *TINY[:-2], "--out", str(tmp_path / "run"), *QUIET, *args])
    _bad(res, args[0])


@pytest.mark.parametrize(("command", "budget"), [("tune", "nan"), ("device-check", "nan"), ("device-check", "inf")])
def test_bad_budget_of_the_gpu_commands(tmp_path: Path, command: str, budget: str) -> None:
    res = runner.invoke(app, [command, "--budget-s", budget, "--out", str(tmp_path / "x")])
    _bad(res, "--budget-s")


def test_report_of_a_binary_results_file(tmp_path: Path) -> None:
    """A results.csv of random bytes: one line naming the file, exit 2, no traceback."""
    (tmp_path / "results.csv").write_bytes(bytes(range(256)) * 8)
    res = runner.invoke(app, ["report", str(tmp_path)])
    _bad(res, "results.csv")
    assert "not text" in res.output
