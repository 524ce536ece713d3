"""A run directory's files: ``results.csv`` (rewritten whole and atomically after every row; read
back line by line with validation), ``metadata.json``, stale temporary files, and the checks that
a directory may hold a run (``--out``, ``--resume``)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attn_bench.core.config import (
    PASSES,
    STATUSES,
    BenchResult,
    config_columns,
    option_columns,
    result_columns,
)

if TYPE_CHECKING:  # for the annotation only: runs import the worker when they start
    pass

RESULTS = "results.csv"

METADATA = "metadata.json"

ACCURACY = "performer_accuracy.csv"

WORKER_LOG = "worker.log"

# Rows that ``--retry-failed`` runs again.
RETRY_STATUSES = ("timeout", "oom", "error")

# Earlier column sets of results.csv that can be read, with the function that maps such a row
# to the current columns. None so far: the columns have not changed since the first release.
MIGRATIONS: dict[frozenset[str], Callable[[dict[str, str]], dict[str, str]]] = {}


class ResultsFileError(ValueError):
    """A results.csv that cannot be used as it is (a foreign column set); names the file and line."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line


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


def read_job_rows(path: Path, from_row: Callable[[dict[str, str]], Any], statuses: Iterable[str]) -> list[Any]:
    """The rows of a task or model ``results.csv`` (``from_row`` builds one); a line that does not
    parse, or has a status outside ``statuses``, is skipped with a warning (and runs again on resume)."""
    if not path.exists():
        return []
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                res = from_row(row)
                if res.status not in statuses:
                    raise ValueError(f"status {res.status!r}")
                out.append(res)
            except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
                print(f"{path}:{i}: skipped, not a whole row ({type(exc).__name__}: {exc})", file=sys.stderr)
    return out


def read_results(path: Path, warn: Callable[[str], None] | None = _stderr) -> list[BenchResult]:
    """The rows of a results.csv, each line checked.

    A row that is not whole (a garbage or truncated line, a value that does not parse) is
    left out with a ``file:line`` message to ``warn``, so that ``--resume`` runs its config
    again. A file without every column of :func:`attn_bench.core.config.result_columns` (in any order;
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
        if any(not c.isprintable() or "\ufffd" in c for c in header):
            raise ResultsFileError(path, 1, "not a results.csv: its first line is not text (binary data?)")
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


def write_metadata(out: Path, meta: dict) -> None:
    atomic_write(out / METADATA, json.dumps(meta, indent=2, default=str) + "\n")


def _read_metadata(out: Path) -> dict:
    try:
        return json.loads((out / METADATA).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _stderr(f"{out / METADATA}: unreadable ({exc}); starting its record afresh")
        return {}
