"""What every job (sweep, decode, task, model) refuses before it starts, with exit status 2 and a
message naming the option: an ``--out`` that cannot be written or holds someone else's files, a
CUDA run without CUDA, options no row could run with, a ``--resume`` of nothing or with other
options; a run whose rows all failed exits 1; and the numerics gate sees a wrong plug-in backend
(one wrong query row, or the wrong output dtype) at any N."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attn_bench.cli import app

runner = CliRunner()
SWEEP = ["--variants", "full", "--backends", "torch", "--heads", "1", "--kv-heads", "1", "--head-dim", "16"]
SWEEP += ["--seq-lens", "32"]
QUIET = ["--no-progress", "--no-report"]
# Each job's quickest command line, less --out.
JOBS = {
    "sweep": ["sweep", *SWEEP, "--passes", "fwd", "--no-accuracy", *QUIET],
    "decode": ["decode", *SWEEP, "--no-accuracy", *QUIET],
    "task": ["task", *QUIET],
    "model": ["model", "--preset", "model-tiny", "--impls", "sdpa", "-n", "64", *QUIET],
}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _text(res) -> str:
    """The command's output as one line (rich draws errors in a box and wraps them)."""
    return " ".join(res.output.replace("│", " ").split())


def _refused(res, option: str) -> None:
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output, res.output


# -- --out ----------------------------------------------------------------------------------------


def _unwritable(kind: str, tmp_path: Path) -> Path:
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    if kind == "file":
        return afile
    if kind == "under-file":
        return afile / "sub"
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a file system where no directory can be made")
    return Path("/proc/attn-bench-out")


@pytest.mark.parametrize("kind", ["file", "under-file", "virtual-fs"])
@pytest.mark.parametrize("job", list(JOBS))
def test_an_unwritable_out_is_refused_by_every_job(job: str, kind: str, tmp_path: Path) -> None:
    out = _unwritable(kind, tmp_path)
    res = runner.invoke(app, [*JOBS[job], "--out", str(out)])
    _refused(res, "--out")
    assert not out.exists() or out.is_file()


def test_the_api_refuses_an_unwritable_out_with_the_cli_message(tmp_path: Path) -> None:
    from attn_bench.core.config import RunSettings
    from attn_bench.core.results import RunSetupError
    from attn_bench.sweep.run import run_sweep
    from attn_bench.task.run import TaskConfig, run_tasks

    out = _unwritable("under-file", tmp_path)
    cli = runner.invoke(app, [*JOBS["task"], "--out", str(out)]).output
    with pytest.raises(RunSetupError, match="exists and is not a directory") as sweep_err:
        run_sweep([], out, RunSettings(), progress=False)
    with pytest.raises(RunSetupError) as task_err:
        run_tasks([TaskConfig("mqar", "full", 64, 0)], out, RunSettings(), progress=False)
    assert sweep_err.value.option == task_err.value.option == "--out"
    assert str(task_err.value) == str(sweep_err.value)
    assert str(sweep_err.value) in " ".join(cli.replace("│", " ").split())


@pytest.mark.parametrize("job", list(JOBS))
def test_an_out_holding_foreign_files_is_refused_by_every_job(job: str, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("someone's notes\n")
    res = runner.invoke(app, [*JOBS[job], "--out", str(out)])
    _refused(res, "--out")
    assert "notes.txt" in _text(res)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written beside them


# -- CUDA without CUDA; a run whose rows all failed ------------------------------------------------


@no_cuda
@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["model", "--preset", "model-tiny", "--device", "cuda", *QUIET], "--device"),
        (["task", "--preset", "task-gpu", *QUIET], "--preset"),
        (["sweep", *SWEEP, "--device", "cuda", "--no-accuracy", *QUIET], "--device"),
        (["decode", *SWEEP, "--device", "cuda", "--no-accuracy", *QUIET], "--device"),
    ],
)
def test_a_cuda_run_without_cuda_is_refused_before_it_starts(args: list[str], option: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, [*args, "--out", str(out)])
    _refused(res, option)
    assert "CUDA is not available" in _text(res)
    assert not out.exists()


@pytest.mark.parametrize("job", ["sweep", "model"])
def test_a_run_whose_rows_all_failed_exits_1(job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "raise")  # every row's worker job raises
    out = tmp_path / "run"
    res = runner.invoke(app, [*JOBS[job], "--out", str(out)])
    assert res.exit_code == 1, res.output
    with open(out / "results.csv", newline="") as f:
        statuses = {r["status"] for r in csv.DictReader(f)}
    assert statuses == {"error"}


def test_a_run_with_one_ok_row_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_BENCH_FAULT", "raise:48")
    res = runner.invoke(app, [*JOBS["sweep"], "--seq-lens", "32,48", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output


def test_all_failed_counts_only_failures() -> None:
    from attn_bench.core.results import all_failed

    assert all_failed(["error", "timeout", "unsupported"])
    assert all_failed(["wrong"]) and all_failed(["oom", "skipped"])
    assert not all_failed(["error", "ok"])
    assert not all_failed(["unsupported", "skipped"]) and not all_failed([])


# -- options no row could run with ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option", "needle"),
    [
        (["sweep", *SWEEP, "--heads", "4", "--kv-heads", "3"], "--kv-heads", "not a multiple of kv_heads 3"),
        (["sweep", *SWEEP, "--variants", "performer", "--num-features", "0"], "--num-features", "num_features"),
        (["decode", *SWEEP, "--passes", "fwd"], "--passes", "decode pass only"),
        (["decode", *SWEEP, "--passes", "decode,fwd_bwd"], "--passes", "fwd_bwd"),
    ],
)
def test_options_no_row_could_run_with_are_refused(args: list[str], option: str, needle: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, [*args, "--no-accuracy", *QUIET, "--out", str(out)])
    _refused(res, option)
    assert needle in _text(res)
    assert not out.exists()


def test_the_config_itself_refuses_what_the_cli_refuses() -> None:
    from attn_bench.core.config import BenchConfig, ConfigError

    with pytest.raises(ConfigError, match="not a multiple of kv_heads 3") as err:
        BenchConfig("full", "torch", 64, heads=4, kv_heads=3)
    assert err.value.key == "kv_heads"
    with pytest.raises(ConfigError, match="num_features") as err:
        BenchConfig("performer", "torch", 64, options=(("num_features", 0),))
    assert err.value.key == "num_features"
    BenchConfig("performer", "torch", 64, heads=4, kv_heads=2, options=(("num_features", 8),))  # fine


# -- --resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", list(JOBS))
def test_resume_of_a_missing_run_is_refused(job: str, tmp_path: Path) -> None:
    out = tmp_path / "never-ran"
    res = runner.invoke(app, [*JOBS[job][:1], "--out", str(out), "--resume", *QUIET])
    _refused(res, "--resume")
    assert not out.exists()


def _task_run(out: Path, timeout: float | None) -> None:
    """A task run's directory as ``attn-bench task --preset task-quick`` leaves it after its first
    row (metadata.json with the command's own options, one row)."""
    from attn_bench.task.run import TaskResult, load_task_presets, write_task_results

    cfg = load_task_presets()["task-quick"].configs[0]
    out.mkdir()
    write_task_results(out / "results.csv", [TaskResult(cfg, "timeout", error="no result after 1 s")])
    spec = {"preset": "task-quick", "plugins": [], "timeout": timeout}
    meta = {"kind": "task", "status": "interrupted", "preset": "task-quick", "task_run": spec}
    (out / "metadata.json").write_text(json.dumps(meta))


def test_task_resume_refuses_other_options(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _task_run(out, timeout=600.0)
    before = (out / "results.csv").read_text()
    res = runner.invoke(app, ["task", "--out", str(out), "--resume", "--timeout", "5", *QUIET])
    _refused(res, "--resume")
    assert '"timeout": 5.0' in _text(res)
    res = runner.invoke(app, ["task", "--out", str(out), "--resume", "--preset", "task-gpu", *QUIET])
    _refused(res, "--resume")
    assert (out / "results.csv").read_text() == before


def test_resume_refuses_another_jobs_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _task_run(out, timeout=None)
    res = runner.invoke(app, [*JOBS["sweep"], "--out", str(out), "--resume"])
    _refused(res, "--out")
    assert "attn-bench task run" in _text(res)


# -- the numerics gate ----------------------------------------------------------------------------

BAD_BACKENDS = """
import torch
import attention_variants as av


def _softmax(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


@av.register_backend(av.FullAttention, "row0_wrong")
def row0_wrong(variant, q, k, v, causal, scale):
    out = _softmax(q.float(), k.float(), v.float(), scale).to(q.dtype)
    out[:, :, 0] += 0.5  # one query row wrong: the first
    return out


@av.register_backend(av.FullAttention, "float64_out")
def float64_out(variant, q, k, v, causal, scale):
    return _softmax(q.double(), k.double(), v.double(), scale)  # right numbers, wrong dtype
"""


def test_the_gate_sees_a_wrong_plugin_backend_at_long_n(tmp_path: Path) -> None:
    """Non-causal full attention, H=1, D=16, float32. With ``check_elems`` 2**22 the gate checks 512
    of the 8192 rows at N=8192 (all 256 at N=256); SDPA passes at both lengths."""
    from attn_bench.core.config import BenchConfig, RunSettings
    from attn_bench.sweep.run import run_sweep

    plugin = tmp_path / "bad_backends.py"
    plugin.write_text(BAD_BACKENDS)
    configs = [
        BenchConfig("full", b, n, heads=1, kv_heads=1, head_dim=16)
        for n in (256, 8192)
        for b in ("row0_wrong", "float64_out", "torch")
    ]
    settings = RunSettings(min_run_time=0.01, check_elems=1 << 22, plugins=(str(plugin),), timeout_s=120)
    rows = {
        (r.config.backend, r.config.seq_len): r for r in run_sweep(configs, tmp_path / "run", settings, progress=False)
    }
    for n in (256, 8192):
        assert rows["torch", n].status == "ok", rows["torch", n]
        assert rows["row0_wrong", n].status == "wrong", rows["row0_wrong", n]
        assert rows["row0_wrong", n].time_ms is None
        assert rows["float64_out", n].status == "wrong", rows["float64_out", n]
        assert "dtype torch.float64" in rows["float64_out", n].error
    assert rows["torch", 8192].checked_rows == 512 and rows["torch", 256].checked_rows == 256


def test_row_sample_spreads_over_the_sequence() -> None:
    from attn_bench.core.numerics import TILE_ROWS, sample_rows

    assert sample_rows(300, 300) == [(0, 300)] and sample_rows(300, 1000) == [(0, 300)]
    for nq, rows, seed in [(8192, 512, 0), (8192, 512, 7), (1000, 40, 1), (4097, 3, 2), (50, 17, 3)]:
        runs = sample_rows(nq, rows, seed)
        covered = [i for s, e in runs for i in range(s, e)]
        assert len(covered) == len(set(covered)) == rows and covered == sorted(covered)
        assert covered[0] == 0 and covered[-1] == nq - 1  # the first and the last row
        assert all(0 <= s < e <= nq for s, e in runs)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(runs))  # disjoint, not touching
        if rows >= 16 and nq >= 4 * TILE_ROWS:
            straddled = {e for e in range(TILE_ROWS, nq, TILE_ROWS) if e - 1 in covered and e in covered}
            assert len(straddled) >= 2, runs  # runs across tile edges
            assert max(b - a for a, b in itertools.pairwise(covered)) < nq // 4  # no large hole


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["sliding_window", "performer"])
def test_sampled_rows_follow_an_independent_float64_computation(variant: str, causal: bool) -> None:
    """A sample of rows (not the whole problem) of a window and of the Performer,
    Nq < Nk: an output right only under the whole problem's alignment passes, the same output
    with a middle run's rows moved by one fails, for the window against its mask written out here."""
    import attention_variants as av
    from attn_bench.core.numerics import check, sample_rows

    torch.manual_seed(0)
    nq, nk, d = 700, 760, 16
    q, k, v = torch.randn(1, 2, nq, d), torch.randn(1, 2, nk, d), torch.randn(1, 2, nk, d)
    if variant == "sliding_window":
        var = av.get_variant("sliding_window", window=(40, 0 if causal else 25), global_tokens=0)
        i = torch.arange(nq)[:, None] + (nk - nq)  # bottom-right: query i sits at key position i + 60
        j = torch.arange(nk)[None, :]
        visible = (j >= i - 40) & (j <= i + (0 if causal else 25))
        s = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
        truth = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ v.double()
        good = truth.float()
    else:
        var = av.get_variant("performer", num_features=32, seed=3)
        good = var(q, k, v, causal=causal, backend="torch")
    elems = 2 * nk * 120  # about 120 of the 700 rows
    runs = sample_rows(nq, 120, seed=nq)
    res = check(lambda a, b, c: good, var, q, k, v, causal, check_elems=elems, approx=False)
    assert res.ok and res.rows == sum(e - s for s, e in runs) < nq, res.message
    mid = runs[len(runs) // 2]
    shifted = good.clone()
    shifted[:, :, mid[0] : mid[1]] = good[:, :, mid[0] + 1 : mid[1] + 1]
    res = check(lambda a, b, c: shifted, var, q, k, v, causal, check_elems=elems, approx=False)
    assert not res.ok, res.message


def test_the_gate_checks_shape_dtype_and_device() -> None:
    import attention_variants as av
    from attn_bench.core.numerics import check

    var = av.FullAttention()
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    good = var(q, k, v, causal=False, backend="reference")
    cases = {
        "dtype torch.float64": good.double(),
        "shape (1, 2, 39, 8)": good[:, :, 1:],
        "on meta": good.to("meta"),
        "non-finite": torch.where(torch.arange(40)[:, None] == 5, float("nan"), good),
        "not a tensor": good.tolist(),
    }
    assert check(lambda a, b, c: good, var, q, k, v, False).ok
    for needle, out in cases.items():
        res = check(lambda a, b, c, out=out: out, var, q, k, v, False)
        assert not res.ok and needle in res.message, (needle, res.message)
