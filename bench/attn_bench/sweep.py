"""Running a sweep: configs through the worker, rows written atomically, metadata, resume.

Files in the output directory:
- ``results.csv``: one row per config (columns from :func:`attn_bench.config.result_columns`), rewritten
  whole after every row (temporary file + ``os.replace``), so it is never half-written and an
  interrupted sweep keeps every finished row. Reading it back validates every line.
- ``metadata.json``: machine, versions, git commit, command line, preset, times, status
  (``running``, ``complete``, ``interrupted`` or ``failed``) and the list of resumes.
- ``performer_accuracy.csv``: the Performer accuracy study (when the preset has one).
- ``worker.log``: what the worker processes printed (compiler and profiler chatter, tracebacks).

SIGTERM and SIGHUP stop a sweep like Ctrl-C: the worker is killed, the finished rows and the
metadata (``interrupted``) are kept, and :class:`SweepInterrupted` is raised. A second signal
while that is done exits at once.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import attention_variants as av

from .baselines import exact_baselines
from .config import (
    PASSES,
    STATUSES,
    AccuracyStudy,
    BenchConfig,
    BenchResult,
    RunSettings,
    config_columns,
    option_columns,
    result_columns,
)

if TYPE_CHECKING:  # for the annotation only: runs import the worker when they start
    from . import worker

RESULTS = "results.csv"
METADATA = "metadata.json"
ACCURACY = "performer_accuracy.csv"
WORKER_LOG = "worker.log"
# Under a time budget, a config is started only if at least this many seconds are left.
MIN_CONFIG_S = 2.0
# ... and the Performer accuracy study only if this many are left.
ACCURACY_MIN_S = 30.0
# Rows that ``--retry-failed`` runs again.
RETRY_STATUSES = ("timeout", "oom", "error")
# Signals that stop a sweep the way Ctrl-C does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Earlier column sets of results.csv that can be read, with the function that maps such a row
# to the current columns. None so far: the columns have not changed since the first release.
MIGRATIONS: dict[frozenset[str], Callable[[dict[str, str]], dict[str, str]]] = {}


class ResultsFileError(ValueError):
    """A results.csv that cannot be used as it is (a foreign column set); names the file and line."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped by a signal (SIGINT, SIGTERM or SIGHUP); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunSetupError(ValueError):
    """A run that cannot start as asked (checked before anything is run or written);
    ``option`` names the command-line option at fault, e.g. ``--out``."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


# Files that mark a directory as an earlier run's (of a sweep, task or model run).
RUN_MARKERS = (RESULTS, METADATA)
# Statuses of a row that was meant to run and did not give a measurement.
FAILED_STATUSES = ("error", "timeout", "oom", "wrong")


def out_dir_problem(out: Path) -> str | None:
    """Why ``out`` cannot be a run's directory without creating anything, or None: it must be new,
    empty or an earlier run's (holding ``results.csv`` or ``metadata.json``; then any other file
    there is the run's own), and its nearest existing folder a writable directory."""
    if str(out) in ("", "."):
        return "give a directory for the run (not the current directory)"
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} exists and is not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable"
            break
    if out.is_dir():
        entries = [e for e in out.iterdir() if not e.name.startswith(".")]
        if entries and not any((out / name).exists() for name in RUN_MARKERS):
            names = ", ".join(sorted(e.name for e in entries)[:5])
            return f"{out} holds files a run did not write ({names}); give a new or empty directory"
    return None


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds an earlier run (its ``results.csv`` or ``metadata.json``)."""
    return any((out / name).exists() for name in RUN_MARKERS)


def cuda_problem(devices: Iterable[str]) -> str | None:
    """Why configs on ``devices`` cannot run here (a CUDA device that this machine lacks), or None."""
    import torch

    wanted = sorted({d for d in devices if d.startswith("cuda")})
    if not wanted:
        return None
    if not torch.cuda.is_available():
        why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        return f"the configs run on {', '.join(wanted)} and CUDA is not available here ({why})"
    count = torch.cuda.device_count()
    missing = [d for d in wanted if ":" in d and int(d.split(":", 1)[1]) >= count]
    if missing:
        return f"{', '.join(missing)} does not exist here ({count} CUDA device(s))"
    return None


def prepare_run_dir(out: Path, devices: Iterable[str], *, resume: bool) -> None:
    """Before a run starts: RunSetupError unless ``out`` can hold it (see :func:`out_dir_problem`;
    with ``resume`` it must hold an earlier run) and its configs' devices exist here. Then
    ``out`` is created and a file written and removed there, so that a directory that cannot be
    written (a read-only or virtual file system) is refused before anything runs."""
    problem = out_dir_problem(out)
    if problem is not None:
        raise RunSetupError("--out", problem)
    if resume and not holds_run(out):
        raise RunSetupError("--resume", f"{out} holds no run to continue (no {RESULTS} or {METADATA})")
    problem = cuda_problem(devices)
    if problem is not None:
        raise RunSetupError("--device", problem)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunSetupError("--out", f"{out} cannot be written: {exc.strerror or exc}") from None


def all_failed(statuses: Iterable[str]) -> bool:
    """Whether a run measured nothing it was meant to: no ``ok`` row and at least one failed
    (error, timeout, oom or wrong). Its command then exits with status 1."""
    seen = set(statuses)
    return "ok" not in seen and bool(seen & set(FAILED_STATUSES))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask). The
    temporary file's name carries this process's id, so :func:`remove_stale_temp_files` can
    tell a leftover of a killed run from a file being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def remove_stale_temp_files(directory: Path, names: Iterable[str] = (RESULTS, METADATA, ACCURACY)) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` when its process was
    killed (the writer's process is gone, or the name predates the process id); returns them."""
    removed = []
    for name in names:
        pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(\d+)\.)?[A-Za-z0-9_]+$")
        for f in directory.glob(f".{name}.*"):
            m = pattern.match(f.name)
            if m is None or (m.group(1) is not None and _pid_alive(int(m.group(1)))):
                continue
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:
                pass
    return removed


def _fmt(x: object) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x)
    return str(x)


def rows_to_csv(rows: Iterable[dict], columns: list[str] | None = None) -> str:
    columns = columns or result_columns()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c)) for c in columns})
    return buf.getvalue()


def write_results(path: Path, results: list[BenchResult]) -> None:
    atomic_write(path, rows_to_csv(r.to_row() for r in results))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _row_problem(row: dict[str, str]) -> str | None:
    """Why a CSV record with the right number of fields is still not a whole row, or None."""
    for c in ("variant", "backend", "device", "dtype"):
        if not row[c]:
            return f"empty {c}"
    if row["pass"] not in PASSES:
        return f"pass {row['pass']!r} is not one of {', '.join(PASSES)}"
    if row["status"] not in STATUSES:
        return f"status {row['status']!r} is not one of {', '.join(STATUSES)}"
    if row["causal"].strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
        return f"causal {row['causal']!r} is not a boolean"
    if row["status"] == "ok" and not row["time_ms"]:
        return "an ok row without time_ms"
    return None


def read_results(path: Path, warn: Callable[[str], None] | None = _stderr) -> list[BenchResult]:
    """The rows of a results.csv, each line checked.

    A row that is not whole (a garbage or truncated line, a value that does not parse) is
    left out with a ``file:line`` message to ``warn``, so that ``--resume`` runs its config
    again. A file without every column of :func:`attn_bench.config.result_columns` (in any order;
    the variants' option columns may be missing or extra, since plug-ins add their own) raises
    :class:`ResultsFileError`, unless :data:`MIGRATIONS` knows its column set."""
    if not path.exists():
        return []
    results: list[BenchResult] = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as exc:
            raise ResultsFileError(path, 1, f"unreadable header: {exc}") from None
        migrate = None
        options = set(option_columns())
        # The config's columns and the status make a row; result columns added in later releases
        # may be missing (empty), and the variants' option columns come and go with plug-ins.
        required = [*(c for c in config_columns() if c not in options), "status"]
        if not set(required) <= set(header) or len(set(header)) != len(header):
            migrate = MIGRATIONS.get(frozenset(header))
            if migrate is None:
                missing = [c for c in required if c not in header]
                extra = [c for c in header if c not in result_columns() and c not in options]
                raise ResultsFileError(
                    path,
                    1,
                    "not the columns of a results.csv"
                    + (f"; missing {', '.join(missing)}" if missing else "")
                    + (f"; unknown {', '.join(extra)}" if extra else "")
                    + "; move it away or pass --overwrite",
                )
        end = reader.line_num
        while True:
            first = end + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                end = reader.line_num
                if warn is not None:
                    warn(f"{path}:{first}: skipped, not a CSV row ({exc})")
                continue
            end = reader.line_num
            where = f"{path}:{first}" + (f"-{end}" if end > first else "")
            if not fields:
                continue  # an empty line
            if len(fields) != len(header):
                problem = f"{len(fields)} fields, expected {len(header)}"
            else:
                row = dict(zip(header, fields, strict=True))
                if migrate is not None:
                    row = migrate(row)
                problem = _row_problem(row)
            if problem is None:
                try:
                    results.append(BenchResult.from_row(row))
                except (ValueError, TypeError, KeyError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
            if problem is not None and warn is not None:
                warn(f"{where}: skipped, not a whole row ({problem}); its config runs again on --resume")
    return results


def git_commit(cwd: Path | None = None) -> str:
    """``<sha>`` (``-dirty`` when the work tree has changes) of the checkout the package lives in."""
    root = cwd or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # Committed reports are outputs, not code: a sweep writing into reports/ is not "dirty".
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_metadata(device: str = "cpu") -> dict:
    import numpy
    import torch

    import attention_variants

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    from .measure import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD

    return {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "attention_variants": attention_variants.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "memory_method": CUDA_MEMORY_METHOD if device.startswith("cuda") else CPU_MEMORY_METHOD,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_metadata(out: Path, meta: dict) -> None:
    atomic_write(out / METADATA, json.dumps(meta, indent=2, default=str) + "\n")


def _set_handlers(handler) -> dict[int, object]:
    """Install ``handler`` for :data:`STOP_SIGNALS`; returns the old handlers (none off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _raise_interrupted(signum: int, frame: object) -> None:
    raise SweepInterrupted(signum)


def _exit_now(signum: int, frame: object) -> None:
    os._exit(128 + signum)


@contextlib.contextmanager
def pool_lifecycle(pool: worker.WorkerPool, out: Path, meta: dict, results: list) -> Iterator[None]:
    """Around the loop of a run on ``pool``: SIGTERM and SIGHUP raise :class:`SweepInterrupted`
    inside it, and a second Ctrl-C while the rest is saved exits at once. On the way out the pool is
    closed (killed, without waiting for the row in flight, unless the loop completed),
    ``metadata.json`` records the status, the error, the worker restarts and ``len(results)``, and
    the old signal handlers come back."""
    status, error = "complete", None
    old_handlers = _set_handlers(_raise_interrupted)
    try:
        yield
    except KeyboardInterrupt:
        status = "interrupted"
        _set_handlers(_exit_now)
        raise
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            if status == "complete":
                pool.close()
            else:
                pool.kill()
            meta["finished"] = now()
            meta["status"] = status
            if error is not None:
                meta["error"] = error
            meta["worker_restarts"] = pool.restarts
            meta["rows"] = len(results)
            write_metadata(out, meta)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)


def _read_metadata(out: Path) -> dict:
    try:
        return json.loads((out / METADATA).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _stderr(f"{out / METADATA}: unreadable ({exc}); starting its record afresh")
        return {}


def run_sweep(
    configs: list[BenchConfig],
    out: Path,
    settings: RunSettings,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    meta: dict | None = None,
    accuracy: AccuracyStudy | None = None,
    progress: bool = True,
    on_result: Callable[[BenchResult], None] | None = None,
    budget_s: float | None = None,
) -> list[BenchResult]:
    """Run ``configs`` (skipping those already in ``out/results.csv`` when ``resume``), writing
    every row as it finishes. Returns all rows of the file.

    ``retry_failed`` (with ``resume``): configs whose rows say ``timeout``, ``oom`` or ``error``
    run again, and the new row replaces the old one.

    Ctrl-C, SIGTERM and SIGHUP kill the worker at once (the config in flight is not recorded, so
    ``resume`` runs it again), save the metadata as ``interrupted`` and raise KeyboardInterrupt
    (:class:`SweepInterrupted` for SIGTERM and SIGHUP). After :data:`~attn_bench.worker.MAX_START_FAILURES`
    failed worker starts in a row, :class:`~attn_bench.worker.WorkerStartError` is raised and the
    metadata says ``failed``.

    ``budget_s``: wall-clock seconds for the whole sweep. A config's timeout is cut to what is
    left, and the configs not started in time are recorded with status ``skipped``."""
    from .worker import WorkerPool, WorkerStartError

    prepare_run_dir(out, (c.device for c in configs), resume=resume)
    for f in remove_stale_temp_files(out):
        _stderr(f"removed {f}, left behind by a run that was killed")
    path = out / RESULTS
    results = read_results(path) if resume else []
    where = {r.config.key(): i for i, r in enumerate(results)}
    rerun = {k for k, i in where.items() if retry_failed and results[i].status in RETRY_STATUSES}
    todo = [c for c in configs if c.key() not in where or c.key() in rerun]
    meta = dict(meta or {})
    old_meta = _read_metadata(out) if resume else {}
    if "started" in old_meta:
        meta["started"] = old_meta["started"]  # the run's start; each resume is listed below
    meta.setdefault("started", now())
    if resume:
        earlier = old_meta.get("resumes", [{"started": t} for t in old_meta.get("resumed", [])])
        this = {"started": now(), "command": meta.get("command"), "git_commit": meta.get("git_commit")}
        this |= {"previous_status": old_meta.get("status"), "retry_failed": retry_failed}
        meta["resumes"] = [*earlier, this]
        for key in ("command", "git_commit"):  # the run's own; each resume's are in its entry
            if key in old_meta:
                meta[key] = old_meta[key]
    meta["settings"] = dataclasses.asdict(settings)
    meta["configs"] = len(configs)
    meta["status"] = "running"
    meta.pop("error", None)
    if budget_s is not None:
        meta["budget_s"] = budget_s
    write_metadata(out, meta)

    pool = WorkerPool(settings, str(out / WORKER_LOG))
    bar = _Progress(len(todo), enabled=progress)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    with pool_lifecycle(pool, out, meta, results):
        with bar:
            for cfg in todo:
                bar.start(cfg.label())
                left = math.inf if deadline is None else deadline - time.monotonic()
                if left < MIN_CONFIG_S:
                    res = BenchResult(cfg, "skipped", error=f"not reached: the sweep's {budget_s:g} s budget ran out")
                else:
                    res = _copy_of_same_computation(cfg, results) or pool.run(cfg, timeout_s=left)
                if cfg.key() in where:
                    results[where[cfg.key()]] = res
                else:
                    where[cfg.key()] = len(results)
                    results.append(res)
                write_results(path, results)
                if on_result is not None:
                    on_result(res)
                bar.advance(f"{cfg.label()}: {res.status}" + (f" {res.time_ms:.3g} ms" if res.time_ms else ""))
                if pool.gave_up:
                    raise WorkerStartError(f"{res.error} ({pool.start_failures} failed starts in a row)")
        out_of_time = deadline is not None and deadline - time.monotonic() < ACCURACY_MIN_S
        if accuracy is not None and not (out / ACCURACY).exists() and not out_of_time:
            from .accuracy import run_accuracy

            bar_msg = "Performer accuracy study"
            if progress:
                print(f"{bar_msg} ...", file=sys.stderr)
            rows = run_accuracy(accuracy)
            atomic_write(out / ACCURACY, rows_to_csv(rows, list(rows[0].keys()) if rows else []))
    return results


def same_computation(cfg: BenchConfig) -> BenchConfig | None:
    """The config that computes exactly the same thing, if any: the ``sdpa`` and ``flex`` baselines
    of an approximation (the Performer) compute the exact variant it approximates (full softmax
    attention), i.e. that variant's row."""
    exact = av.variant_class(cfg.variant).approximates
    if exact is not None and cfg.backend in exact_baselines():
        return dataclasses.replace(cfg, variant=exact, options=())
    return None


def _copy_of_same_computation(cfg: BenchConfig, results: list[BenchResult]) -> BenchResult | None:
    twin = same_computation(cfg)
    if twin is None:
        return None
    for r in results:
        if r.config == twin and r.status == "ok":
            note = f"same computation as {twin.variant}/{twin.backend}; measured once"
            return dataclasses.replace(r, config=cfg, note=note, elapsed_s=0.0)
    return None


class _Progress:
    """A rich progress bar (config name, count, elapsed, ETA); silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.progress = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}", justify="left"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("sweep", total=self.total)
        return self

    def start(self, label: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=label)

    def advance(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)
            self.progress.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def elapsed(t0: float) -> str:
    s = time.perf_counter() - t0
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"
