"""Configs run in a worker process, so a crash, an out-of-memory kill or a hang costs one row.

The parent sends one config at a time over a pipe and waits at most ``timeout_s`` for its
result. If the worker dies or times out, it is killed, the row is recorded as ``error``,
``oom`` (a SIGKILL with evidence of the out-of-memory killer) or ``timeout``, and a fresh worker
takes the next config. A worker that fails to start costs its config a row too; after
:data:`MAX_START_FAILURES` failed starts in a row the pool gives up.

The worker ignores SIGINT and SIGHUP (Ctrl-C and a closed terminal reach the parent, which
decides) and dies with its parent: ``PR_SET_PDEATHSIG`` on Linux, a watchdog thread elsewhere.

Fault injection for the harness's own tests: ``ATTN_BENCH_FAULT=<mode>:<seq_len>[,...]`` with
``mode`` one of ``crash``, ``hang``, ``raise``, ``kill`` (SIGKILLs itself), ``wrong`` (perturbs
the output) makes the worker misbehave on that length (every length when ``:<seq_len>`` is left
out); ``startup:<k>`` makes the k-th worker started by a pool exit before it is ready (every one
when ``:<k>`` is left out).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from attn_bench.core.config import BenchConfig, BenchResult, RunSettings
from attn_kernels import AUTOTUNE_ENV

FAULT_ENV = "ATTN_BENCH_FAULT"
STARTUP_TIMEOUT_S = 300
# Failed worker starts in a row after which the pool gives up (WorkerStartError).
MAX_START_FAILURES = 3
# A SIGKILLed worker whose peak RSS reached this fraction of the memory limit counts as an OOM kill.
OOM_RSS_FRACTION = 0.9
_PR_SET_PDEATHSIG = 1


class WorkerStartError(RuntimeError):
    """The worker failed to start :data:`MAX_START_FAILURES` times in a row."""


def _faults() -> list[tuple[str, int | None]]:
    out = []
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        mode, _, n = spec.partition(":")
        out.append((mode, int(n) if n else None))
    return out


def inject_fault(cfg: BenchConfig) -> None:
    for mode, n in _faults():
        if mode == "startup" or (n is not None and n != cfg.seq_len):
            continue
        if mode == "crash":
            os._exit(139)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            time.sleep(3600)
        if mode == "raise":
            raise RuntimeError("injected failure")
        if mode == "wrong":
            from attn_bench.sweep import measure

            measure.PERTURB = 1e-2


def _release_memory() -> None:
    """Free what the last config left behind before the next one is measured."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# After these errors the process's CUDA context is unusable: every later call would fail too.
_STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned")


def context_lost(error: str) -> bool:
    """True if ``error`` says the CUDA context is unusable (later calls in the process fail too)."""
    text = error.lower()
    return any(e in text for e in _STICKY_CUDA_ERRORS)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.25)
        if os.getppid() != parent_pid:
            os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` exits, even by SIGKILL, so no worker computes on for nobody."""
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watchdog").start()


def _worker_main(
    conn, settings: RunSettings, log_path: str | None, parent_pid: int, start: int, job: str | None = None
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    if any(mode == "startup" and n in (None, start) for mode, n in _faults()):
        os._exit(3)
    if settings.autotune_max > 0:
        os.environ[AUTOTUNE_ENV] = str(settings.autotune_max)
    if log_path:  # keep the terminal for the progress bar: library chatter goes to the log
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    from attn_bench.core.plugins import load_plugins
    from attn_bench.sweep.measure import run_config

    load_plugins(settings.plugins)
    job_fn = _load_job(job) if job else None
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        if job_fn is not None:
            _run_job(conn, job_fn, msg, settings)
            _release_memory()
            continue
        cfg = BenchConfig(**msg)
        from attn_bench.sweep import measure

        measure.PERTURB = 0.0
        try:
            inject_fault(cfg)
            res = run_config(cfg, settings)
        except Exception as exc:  # run_config records its own failures; this is a last resort
            res = BenchResult(cfg, "error", error=f"{type(exc).__name__}: {exc}")
        conn.send(res.to_row())
        if res.status == "error" and context_lost(res.error):
            return  # a fresh worker (and CUDA context) takes the next config
        _release_memory()


def _load_job(job: str):
    """The function ``module:name`` names (a worker job other than a sweep's config)."""
    import importlib

    module, _, name = job.partition(":")
    return getattr(importlib.import_module(module), name)


def _run_job(conn, job_fn, msg: dict, settings: RunSettings) -> None:
    """Run ``job_fn(msg, settings, progress)`` and send its row; ``progress(*values)`` sends
    ``("progress", *values)`` messages ahead of it. Faults are injected as for a config."""

    class _Cfg:
        seq_len = msg.get("seq_len")

    def progress(*values: object) -> None:
        conn.send(("progress", *values))

    try:
        inject_fault(_Cfg)  # type: ignore[arg-type]
        row = job_fn(msg, settings, progress)
    except Exception as exc:
        # The parent builds the row with the job's own result class: a job's config need not map
        # to its row's columns one to one (a model row's ``pass`` is its config's ``pass_``).
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(row)


def _read_counter(path: Path, name: str) -> int | None:
    """The value of ``name`` in a ``key value`` file (``/proc/vmstat``, ``memory.events``), or None."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _memory_cgroups(proc: Path, cgroup_root: Path) -> list[Path]:
    """This process's memory cgroup directories (v2 and v1 mounts), falling back to the roots."""
    dirs = []
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, rel = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and rel:
            dirs.append(cgroup_root / rel.lstrip("/"))
        elif "memory" in controllers.split(","):
            dirs.append(cgroup_root / "memory" / rel.lstrip("/"))
    return [*dirs, cgroup_root, cgroup_root / "memory"]


def oom_kill_counts(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> dict[str, int]:
    """The kernel's OOM-kill counters that can be read here (Linux): the system's
    (``/proc/vmstat``) and this process's memory cgroup's (v2 ``memory.events``, v1
    ``memory.oom_control``). A counter that grew while a worker died by SIGKILL is evidence
    that the out-of-memory killer killed it."""
    files = [proc / "vmstat"]
    for d in _memory_cgroups(proc, cgroup_root):
        files += [d / "memory.events", d / "memory.oom_control"]
    counts = {}
    for f in files:
        n = _read_counter(f, "oom_kill")
        if n is not None:
            counts.setdefault(str(f), n)
    return counts


def memory_limit_bytes(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smallest of the machine's memory and this process's cgroup limit, or None if unknown."""
    limits = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):  # "MemTotal:       24000000 kB"
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for d in _memory_cgroups(proc, cgroup_root):
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                text = (d / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # "max" or a near-2**63 value: no limit
                limits.append(int(text))
    return min(limits) if limits else None


def peak_rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Peak resident memory of a live process (``VmHWM``), or None."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def oom_evidence(before: dict[str, int], after: dict[str, int], peak_rss: int | None, limit: int | None) -> str | None:
    """Why a SIGKILL looks like the out-of-memory killer's, or None when nothing says so."""
    for name, n in after.items():
        if name in before and n > before[name]:
            return f"oom_kill in {name} went from {before[name]} to {n}"
    if peak_rss and limit and peak_rss >= OOM_RSS_FRACTION * limit:
        return f"the worker's peak RSS {peak_rss / 2**30:.2f} GiB reached the {limit / 2**30:.2f} GiB memory limit"
    return None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class WorkerPool:
    """One worker process at a time, restarted after a crash or a timeout."""

    def __init__(
        self,
        settings: RunSettings,
        log_path: str | None = None,
        *,
        job: str | None = None,
        result_cls: type = BenchResult,
        on_progress: Callable[..., None] | None = None,
    ) -> None:
        """``job``: ``"module:function"`` the worker runs on each config's ``asdict`` instead of a
        sweep measurement: ``function(msg, settings, progress) -> row``; ``result_cls`` builds results
        (``result_cls(cfg, status, error=..., elapsed_s=...)`` and ``result_cls.from_row(row)``), and
        ``on_progress(*values)`` receives what the job passes to ``progress``."""
        self.settings = settings
        self.log_path = log_path
        self.job = job
        self.result_cls = result_cls
        self.on_progress = on_progress
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None
        self.starts = 0
        self.start_failures = 0  # in a row

    @property
    def restarts(self) -> int:
        """Workers started after the first (each after a crash, a timeout or a failed start)."""
        return max(0, self.starts - 1)

    @property
    def gave_up(self) -> bool:
        """True after :data:`MAX_START_FAILURES` failed starts in a row."""
        return self.start_failures >= MAX_START_FAILURES

    def _start(self) -> str | None:
        """Start a worker and wait until it is ready; returns why it did not start, or None."""
        self.starts += 1
        parent, child = self.ctx.Pipe()
        args = (child, self.settings, self.log_path, os.getpid(), self.starts, self.job)
        self.proc = self.ctx.Process(target=_worker_main, args=args, daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        # Importing torch can take a while on a loaded machine; that is not the config's time.
        try:
            ready = parent.poll(STARTUP_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if ready:
            self.start_failures = 0
            return None
        self.proc.join(timeout=1)
        code = self.proc.exitcode
        self.kill()
        self.start_failures += 1
        how = f"no sign of life after {STARTUP_TIMEOUT_S} s" if code is None else exit_text(code)
        return f"the benchmark worker did not start ({how}); see {self.log_path or 'its stderr'}"

    def kill(self) -> None:
        """Kill the worker at once (SIGKILL); whatever it was computing is lost."""
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        """Ask an idle worker to exit, then make sure it has."""
        if self.proc is not None and self.proc.is_alive() and self.conn is not None:
            try:
                self.conn.send(None)
                self.proc.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
        self.kill()

    def run(self, cfg, timeout_s: float | None = None):
        """Run ``cfg`` in the worker; ``timeout_s`` (default: the settings') caps its wall time."""
        limit = self.settings.timeout_s if timeout_s is None else min(timeout_s, self.settings.timeout_s)
        if self.proc is None or not self.proc.is_alive():
            self.kill()
            problem = self._start()
            if problem is not None:
                return self.result_cls(cfg, "error", error=problem)
        assert self.conn is not None and self.proc is not None
        t0 = time.perf_counter()
        msg = asdict(cfg)
        oom_before = oom_kill_counts()
        peak_rss = None
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError) as exc:
            self.kill()
            return self.result_cls(cfg, "error", error=f"could not reach the worker: {exc}")
        deadline = t0 + limit
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                self.kill()
                return self.result_cls(
                    cfg,
                    "timeout",
                    error=f"no result after {limit:.3g} s"
                    + ("" if limit == self.settings.timeout_s else " (what was left of the sweep's budget)")
                    + "; worker killed",
                    elapsed_s=round(time.perf_counter() - t0, 3),
                )
            try:
                if self.conn.poll(min(remaining, 0.5)):
                    msg = self.conn.recv()
                    if isinstance(msg, tuple) and msg and msg[0] == "progress":
                        if self.on_progress is not None:
                            self.on_progress(*msg[1:])
                        continue
                    if isinstance(msg, tuple) and msg and msg[0] == "error":
                        elapsed = round(time.perf_counter() - t0, 3)
                        res = self.result_cls(cfg, "error", error=msg[1], elapsed_s=elapsed)
                    else:
                        res = self.result_cls.from_row(msg)
                    if res.status == "error" and context_lost(res.error):
                        self.kill()  # the worker is exiting; the next config starts a fresh one
                    return res
            except (EOFError, OSError):
                pass
            rss = peak_rss_bytes(self.proc.pid)
            if rss is not None:
                peak_rss = max(rss, peak_rss or 0)
            if not self.proc.is_alive():
                code = self.proc.exitcode
                self.kill()
                elapsed = round(time.perf_counter() - t0, 3)
                if code == -signal.SIGKILL:
                    why = oom_evidence(oom_before, oom_kill_counts(), peak_rss, memory_limit_bytes())
                    if why is not None:
                        return self.result_cls(
                            cfg, "oom", error=f"worker killed by the out-of-memory killer ({why})", elapsed_s=elapsed
                        )
                    return self.result_cls(
                        cfg,
                        "error",
                        error="worker killed (signal 9); no sign of the out-of-memory killer",
                        elapsed_s=elapsed,
                    )
                return self.result_cls(cfg, "error", error=f"worker crashed ({exit_text(code)})", elapsed_s=elapsed)


def exit_text(code: int) -> str:
    if code < 0:
        return f"killed (signal {-code}, {_signal_name(-code)})"
    return f"exit code {code}"
