"""``attn-bench device-check``: what a short GPU rental should tell, in one command.

Steps, each in its own time box and its own process (a hang or a crash costs that step only;
every failure is recorded and the next step still runs):

1. ``environment``: GPU, memory, driver, CUDA, torch, Triton, the SDPA backends that run, and
   the two ceilings every later figure is compared with: device-to-device copy bandwidth and
   the bfloat16 matmul rate, both measured.

   Then, when this card's tuning table (:mod:`attn_kernels.tuning`) is missing, stale (kernel
   sources changed) or lacks keys of the default plan, ``attn-bench tune`` runs with a share of
   the budget (:data:`TUNE_SHARE`, at most :data:`TUNE_MAX_S`), starting from the table there is;
   the later steps launch with the table it wrote. Recorded under ``tuning`` in the record.
2. ``gpu-tests``: ``pytest -m gpu`` (the kernels at real sizes, against float64 references).
3. ``verify``: ``attn-bench verify`` on CUDA, every variant x backend x {bf16, fp16, fp32}.
4. ``sweep``: the ``gpu-quick`` preset with what is left of the budget (minus the report's
   reserve); configs not reached are rows with status ``skipped``. With several GPUs, one
   worker per GPU (``--devices all``): the rows are spread over them.
5. ``report``: plots and the sweep's Markdown page.

Then everything is packed into at most :data:`MAX_FILES` files directly in ``--out``:
``SUMMARY.md`` (one page, the kernel engineer's table first), ``device-check.json`` (machine
and step records), ``device-check.tar.gz`` (the run directory: CSVs, PNGs, report, worker log),
the logs ``gpu-tests.log``, ``verify.log`` and ``sweep.log`` (environment, tuning, sweep and
report), and the card's tuning table ``<card>.json`` when there is a fresh one.

Without CUDA the same command runs dry: the GPU steps are recorded as skipped with the reason,
and the files are still written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attn_bench.device.probe import (
    ROOT,
    child_env,
    cuda_device_count,
    cuda_status,
    gpu_test_workers,
    probe_environment,
)
from attn_bench.device.summary import _counts_text, _status_counts, pytest_counts, summary_markdown, tuning_comparison
from attn_kernels import tuning

SUMMARY = "SUMMARY.md"

RECORD = "device-check.json"

ARCHIVE = "device-check.tar.gz"

LOGS = {"gpu-tests": "gpu-tests.log", "verify": "verify.log", "sweep": "sweep.log"}

MAX_FILES = 7

PRESET = "gpu-quick"

# Time boxes (s). The sweep gets what is left after the earlier steps, minus REPORT_RESERVE_S.
ENV_BOX_S = 60.0

TESTS_BOX_S = 200.0

VERIFY_BOX_S = 90.0

REPORT_BOX_S = 45.0

REPORT_RESERVE_S = 30.0

TUNE_SHARE = 0.25  # of --budget-s, for tuning when the card's table is missing or stale

TUNE_MAX_S = 150.0

TUNE_MIN_S = 20.0  # less than this is not worth a tuning run

TUNE_GRACE_S = 40.0  # beyond the tuner's own budget: start-up and the last candidate

SWEEP_GRACE_S = 30.0  # beyond the sweep's own budget: worker start-up, the last row, the CSV

CP_BOX_S = 120.0  # context parallelism over NCCL, only where 2 or more GPUs are visible

CP_N_PER_RANK = 16384  # the ring target's range (N / P >= 16k)

VERIFY_BACKENDS = "triton,torch,reference,sdpa"

VERIFY_DTYPES = "bfloat16,float16,float32"


@dataclass
class Step:
    """What one step did: ``status`` is ok, failed, timeout or skipped; ``detail`` says why."""

    name: str
    status: str
    seconds: float = 0.0
    box_s: float | None = None
    detail: str = ""
    returncode: int | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Running a step
# ---------------------------------------------------------------------------------------------


def run_boxed(cmd: list[str], log: Path, box_s: float, env: dict[str, str] | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` with stdout and stderr appended to ``log``; kill its process group after
    ``box_s`` seconds. Returns ``(returncode or None on timeout, seconds)``."""
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(1.0, box_s))
        except subprocess.TimeoutExpired:
            code = None
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            f.write(f"\n[device-check] stopped after its {box_s:.0f} s time box\n")
    return code, time.monotonic() - t0


def cp_command(gpus: int, out: Path, box_s: float, extra: tuple[str, ...] = ()) -> list[str] | None:
    """``attn-bench cp`` over NCCL on 1, 2, 4, 8 ... of ``gpus`` GPUs (bf16, zigzag, causal, N/P=16k
    weak and the same total strong); None with fewer than 2 GPUs."""
    if gpus < 2:
        return None
    ranks = [p for p in (1, 2, 4, 8) if p <= gpus]
    cmd = [sys.executable, "-m", "attn_bench.cli", "cp", "--device", "cuda", "--dtype", "bfloat16"]
    cmd += ["--ranks", ",".join(map(str, ranks)), "--n", str(CP_N_PER_RANK), "--layouts", "zigzag"]
    cmd += ["--causal", "true", "--heads", "16", "--kv-heads", "16", "--head-dim", "128", "--window", "1024"]
    cmd += ["--num-features", "256", "--repeats", "5", "--timeout", f"{box_s:.0f}", "--out", str(out), *extra]
    return cmd


def sweep_command(gpus: int, out: Path, budget_s: float, device: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``attn-bench sweep`` of the gpu-quick preset within ``budget_s``; with 2 or more GPUs, one
    worker on each (``--devices all``), rows spread over them."""
    cmd = [sys.executable, "-m", "attn_bench.cli", "sweep", "--preset", PRESET, "--out", str(out)]
    cmd += ["--budget-s", f"{budget_s:.0f}", "--no-report", "--overwrite", "--device", device, *extra]
    return cmd + (["--devices", "all"] if gpus > 1 and device == "cuda" else [])


# ---------------------------------------------------------------------------------------------
# The whole check
# ---------------------------------------------------------------------------------------------


def device_check_command(
    out: Path,
    budget_s: float = 500.0,
    work: Path | None = None,
    plugin: list[str] | None = None,
    variants: str | None = None,
    echo=print,
) -> None:
    """``attn-bench device-check``: the options checked, then :func:`device_check`. ``plugin``: what
    the verify, cp, sweep and tune steps import; ``variants``: the variants of verify, cp and the
    sweep. Each selected variant (every registered one by default) passes the pre-flight gate first."""
    import attention_variants as av
    from attn_bench.core.results import RunSetupError
    from attn_bench.core.setup import JobExit, load_plugins, values
    from attn_bench.core.variants import check_names, declared_options, preflight

    if not 30 <= budget_s < float("inf"):
        raise RunSetupError("--budget-s", f"must be at least 30 s and finite, got {budget_s:g}")
    if out.exists() and not out.is_dir():
        raise RunSetupError("--out", f"{out} exists and is not a folder")
    plugins = load_plugins(plugin)
    names = check_names(values(variants, "--variants", str) or av.list_variants())
    for name in names:
        preflight(name, declared_options(name), (False, True), device="cuda" if cuda_status()[0] else "cpu")
    step_args = tuple(a for p in plugins for a in ("--plugin", p))
    if variants is not None:
        step_args += ("--variants", ",".join(names))
    code = device_check(out, budget_s=budget_s, work=work, echo=echo, plugin_args=step_args)
    if code:
        raise JobExit("", code)


def device_check(
    out: Path,
    budget_s: float = 500.0,
    work: Path | None = None,
    echo=print,
    device: str = "cuda",
    sweep_args: tuple[str, ...] = (),
    verify_args: tuple[str, ...] = (),
    plugin_args: tuple[str, ...] = (),
) -> int:
    """Run every step within ``budget_s`` seconds, write the files into ``out``; returns 0
    (failures are findings, recorded in the files, not exit codes). ``plugin_args``
    (``--plugin P ... [--variants V]``) go to the verify, cp and sweep steps (``--plugin`` to tune).

    ``device="cpu"`` runs the verify and sweep steps on the CPU, with ``verify_args`` and
    ``sweep_args`` added to their command lines: the harness's own tests use it to exercise every
    step and the summary on a machine without a GPU."""
    t_start = time.monotonic()

    def left() -> float:
        return budget_s - (time.monotonic() - t_start)

    out.mkdir(parents=True, exist_ok=True)
    stale = [p for p in (out / SUMMARY, out / RECORD, out / ARCHIVE, *(out / n for n in LOGS.values())) if p.exists()]
    for p in stale:
        p.unlink()
    work = work or Path(tempfile.mkdtemp(prefix="attn-device-check-"))
    run_dir = work / "device-check"
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_dir = run_dir / "sweep"
    logs = {k: out / v for k, v in LOGS.items()}
    for p in logs.values():
        p.write_text("")
    env_vars = child_env()
    steps: list[Step] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def note(step: Step) -> None:
        steps.append(step)
        echo(f"device-check: {step.name}: {step.status} ({step.seconds:.0f} s) {step.detail}".rstrip())

    # 1. environment
    env_json = run_dir / "environment.json"
    box = min(ENV_BOX_S, max(5.0, left()))
    code, secs = run_boxed(
        [sys.executable, "-m", "attn_bench.device.check", "--environment", str(env_json)], logs["sweep"], box, env_vars
    )
    environment: dict = {}
    if env_json.exists():
        environment = json.loads(env_json.read_text())
    if code == 0:
        detail = environment.get("gpu") or environment.get("cuda_reason", "")
        note(Step("environment", "ok", secs, box, detail))
    else:
        status = "timeout" if code is None else "failed"
        note(Step("environment", status, secs, box, f"exit code {code}; see sweep.log"))
    has_cuda, why = cuda_status()
    gpu_skip = None if has_cuda or device == "cpu" else why
    pairs = zip(plugin_args[::2], plugin_args[1::2], strict=True)  # ("--plugin", P) ... ("--variants", V)
    tune_args = tuple(x for flag, value in pairs if flag == "--plugin" for x in (flag, value))
    sweep_args, verify_args = (*plugin_args, *sweep_args), (*plugin_args, *verify_args)

    # 1b. the tuning table (recorded apart from the steps)
    try:
        tuned = tune_table(
            environment, has_cuda and device == "cuda", run_dir, out, logs["sweep"], left, env_vars, tune_args
        )
    except Exception as exc:  # a broken table must not cost the check
        tuned = {"status": "failed", "detail": f"{type(exc).__name__}: {exc}", "table_used": False, "copied": False}
    echo(f"device-check: tuning: {tuned['status']} ({tuned.get('seconds', 0):.0f} s) {tuned['detail']}".rstrip())

    # 2. GPU tests
    tests_dir = ROOT / "tests"
    if gpu_skip or device != "cuda":
        note(Step("gpu-tests", "skipped", detail=gpu_skip or f"device {device}: the GPU tests need CUDA"))
    elif not tests_dir.is_dir():
        note(Step("gpu-tests", "skipped", detail=f"no tests/ folder next to the package ({ROOT})"))
    else:
        box = max(10.0, min(TESTS_BOX_S, left() - 2 * REPORT_RESERVE_S - VERIFY_BOX_S))
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "--tb=short", "--maxfail=40"]
        cmd += ["-p", "no:cacheprovider", str(tests_dir)]
        if importlib.util.find_spec("xdist") is not None:  # compilation is CPU-bound: spread it
            workers = gpu_test_workers(os.cpu_count() or 2, environment.get("memory_gib"))
            if workers > 1:
                cmd += ["-n", str(workers), "--max-worker-restart", "20"]
        code, secs = run_boxed(cmd, logs["gpu-tests"], box, env_vars)
        counts = pytest_counts(logs["gpu-tests"].read_text(errors="replace"))
        status = "timeout" if code is None else "ok" if code == 0 else "failed"
        note(Step("gpu-tests", status, secs, box, _counts_text(counts), code, {"counts": counts}))

    # 3. verify
    verify_csv = run_dir / "verify.csv"
    if gpu_skip:
        note(Step("verify", "skipped", detail=gpu_skip))
    else:
        box = max(10.0, min(VERIFY_BOX_S, left() - 2 * REPORT_RESERVE_S - 60.0))
        cmd = [sys.executable, "-m", "attn_bench.cli", "verify", "--device", device, "--dtypes", VERIFY_DTYPES]
        cmd += ["--backends", VERIFY_BACKENDS, "--csv", str(verify_csv), *verify_args]
        code, secs = run_boxed(cmd, logs["verify"], box, env_vars)
        restarts = 0
        while code == 3 and box - secs > 10:  # the CUDA context was lost: go on in a fresh process
            restarts += 1
            more, extra = run_boxed([*cmd, "--resume"], logs["verify"], box - secs, env_vars)
            code, secs = more, secs + extra
        counts = _status_counts(verify_csv)
        status = "timeout" if code is None else "ok" if code == 0 else "failed"
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        detail += f"; {restarts} restart(s) after a lost CUDA context" if restarts else ""
        note(Step("verify", status, secs, box, detail, code))

    # 3b. context parallelism over NCCL (before the sweep, which takes the rest of the budget)
    cp_dir = run_dir / "cp"
    gpus = 0 if gpu_skip or device != "cuda" else cuda_device_count()
    box = max(10.0, min(CP_BOX_S, left() - 2 * REPORT_RESERVE_S - 60.0))
    cp_cmd = cp_command(gpus, cp_dir, box, plugin_args)
    if gpu_skip or device != "cuda":
        note(Step("cp", "skipped", detail=gpu_skip or f"device {device}: NCCL needs CUDA"))
    elif cp_cmd is None:
        note(Step("cp", "skipped", detail=f"{gpus} GPU visible: context parallelism over NCCL needs 2 or more"))
    else:
        code, secs = run_boxed(cp_cmd, logs["sweep"], box + SWEEP_GRACE_S, env_vars)
        counts = _status_counts(cp_dir / "results.csv")
        status = "timeout" if code is None else "ok" if code == 0 else "failed"
        note(
            Step(
                "cp",
                status,
                secs,
                box,
                f"{gpus} GPUs; rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                code,
            )
        )

    # 4. sweep
    if gpu_skip:
        note(Step("sweep", "skipped", detail=gpu_skip))
    else:
        sweep_budget = max(5.0, left() - REPORT_RESERVE_S - SWEEP_GRACE_S)
        box = sweep_budget + SWEEP_GRACE_S
        cmd = sweep_command(gpus, sweep_dir, sweep_budget, device, sweep_args)
        code, secs = run_boxed(cmd, logs["sweep"], box, env_vars)
        counts = _status_counts(sweep_dir / "results.csv")
        status = "timeout" if code is None else "ok" if code == 0 else "failed"
        detail = f"budget {sweep_budget:.0f} s{f', {gpus} GPUs' if gpus > 1 else ''}; rows: " + ", ".join(
            f"{n} {s}" for s, n in sorted(counts.items())
        )
        note(Step("sweep", status, secs, box, detail, code))

    # 5. report
    if not (sweep_dir / "results.csv").exists():
        note(Step("report", "skipped", detail="no sweep results"))
    else:
        box = max(10.0, min(REPORT_BOX_S, left() + REPORT_RESERVE_S))
        cmd = [sys.executable, "-m", "attn_bench.cli", "report", str(sweep_dir)]
        code, secs = run_boxed(cmd, logs["sweep"], box, env_vars)
        note(Step("report", "timeout" if code is None else "ok" if code == 0 else "failed", secs, box, "", code))

    # Summary, record, archive
    record = {
        "started": started,
        "budget_s": budget_s,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "environment": environment,
        "steps": [asdict(s) for s in steps],
        "step_args": list(plugin_args),  # --plugin / --variants of the verify, cp and sweep steps
        "tuning": tuned,
        "files": [SUMMARY, RECORD, ARCHIVE, *LOGS.values(), *([tuned["file"]] if tuned.get("copied") else [])],
    }
    try:
        text = summary_markdown(record, sweep_dir, verify_csv, logs["gpu-tests"])
    except Exception:  # the summary must exist even when the data it reads is broken
        text = f"# device-check\n\nThe summary could not be built:\n\n```\n{traceback.format_exc()}\n```\n"
    (out / SUMMARY).write_text(text)
    (run_dir / SUMMARY).write_text(text)
    (out / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    shutil.copy(out / RECORD, run_dir / RECORD)
    with tarfile.open(out / ARCHIVE, "w:gz") as tar:
        tar.add(run_dir, arcname=run_dir.name)
    more = len(record["files"]) - 1
    echo(f"device-check: done in {time.monotonic() - t_start:.0f} s: {out / SUMMARY} (+ {more} files)")
    return 0


def tune_table(
    environment: dict, cuda: bool, run_dir: Path, out: Path, log: Path, left, env_vars: dict[str, str],
    extra: tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """Bring this card's tuning table up to date within a share of the budget (see the module
    docstring); copy the table the later steps will use into ``out`` and point ``env_vars`` at
    it. Returns the record: ``status`` (ok, failed, timeout, skipped), ``table_before``
    (missing, unreadable, stale, fresh), ``pending`` keys, ``table_used``, ``entries``, ``file``,
    ``favor_impl`` (per launch shape, the FAVOR+ implementation chosen and each one's time)."""
    from attn_bench.device.tune import pending, plan
    from attn_bench.device.tune_keys import impl_choices

    rec: dict = {"status": "skipped", "detail": "", "table_before": None, "table_used": False, "copied": False}
    card = environment.get("gpu")
    if not cuda or not card:
        rec["detail"] = "no CUDA device: the heuristic configs run" if not cuda else "the environment step named no GPU"
        return rec
    rec["card"], rec["file"] = card, f"{tuning.card_slug(card)}.json"
    (out / rec["file"]).unlink(missing_ok=True)
    status, path = tuning.table_status(card)
    table = None
    if status in ("stale", "fresh") and path is not None:
        table = tuning.Table.read(path)
    todo = pending(plan(), table)
    rec.update(table_before=status, table_path=str(path) if path else None, pending=len(todo))
    use = path if status == "fresh" else None
    if todo:
        budget = min(TUNE_MAX_S, TUNE_SHARE * max(0.0, left()))
        if budget < TUNE_MIN_S:
            rec["detail"] = f"table {status}, {len(todo)} keys to tune, but only {budget:.0f} s for it"
        else:
            tuned_dir = run_dir / "tuned"
            cmd = [sys.executable, "-m", "attn_bench.cli", "tune", "--budget-s", f"{budget:.0f}"]
            cmd += ["--out", str(tuned_dir), *extra]
            code, secs = run_boxed(cmd, log, budget + TUNE_GRACE_S, env_vars)
            rec.update(seconds=round(secs, 1), returncode=code, budget_s=round(budget))
            rec["status"] = "timeout" if code is None else "ok" if code == 0 else "failed"
            new_status, new_path = tuning.table_status(card, [tuned_dir])
            if new_path is not None and new_status == "fresh":
                use = new_path
                rec["pending_after"] = len(pending(plan(), tuning.Table.read(new_path)))
            rec["detail"] = f"table {status}, {len(todo)} keys to tune; tuned within {budget:.0f} s, see sweep.log"
    else:
        rec.update(status="ok", detail=f"table fresh ({path}): nothing to tune")
    if use is not None:
        shutil.copy(use, out / rec["file"])
        env_vars[tuning.DIR_ENV] = str(Path(use).parent)
        table = tuning.Table.read(use)
        rec.update(table_used=True, copied=True, entries=sum(len(v) for v in table.entries.values()))
        rec["comparison"] = tuning_comparison(table)
        rec["favor_impl"] = impl_choices(table)
    return rec


def _main(argv: list[str]) -> int:
    """``python -m attn_bench.device.check --environment PATH``: the environment step (a subprocess)."""
    if len(argv) == 2 and argv[0] == "--environment":
        env = probe_environment()
        Path(argv[1]).write_text(json.dumps(env, indent=2, default=str) + "\n")
        print(json.dumps(env, indent=2, default=str))
        return 0
    print("usage: python -m attn_bench.device.check --environment PATH  (the whole check: attn-bench device-check)")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
