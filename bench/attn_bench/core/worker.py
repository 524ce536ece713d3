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
when ``:<k>`` is left out); ``stall`` makes a Ray task hang before it starts its row's worker
(:mod:`attn_bench.core.ray_executor`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from attn_bench.core.config import BenchConfig, BenchResult, RunSettings
from attn_bench.core.machine import IDENTITY_FIELDS, device_identity
from attn_bench.core.oom import memory_limit_bytes, oom_evidence, oom_kill_counts, peak_rss_bytes
from attn_kernels import AUTOTUNE_ENV

FAULT_ENV = "ATTN_BENCH_FAULT"
STARTUP_TIMEOUT_S = 300
# Failed worker starts in a row after which the pool gives up (WorkerStartError).
MAX_START_FAILURES = 3
_PR_SET_PDEATHSIG = 1


class WorkerStartError(RuntimeError):
    """The worker failed to start :data:`MAX_START_FAILURES` times in a row."""


def _faults(text: str | None = None) -> list[tuple[str, int | None]]:
    """The faults ``text`` (default: ``$ATTN_BENCH_FAULT``) asks for, as ``(mode, seq_len or None)``."""
    out = []
    for spec in filter(None, (os.environ.get(FAULT_ENV, "") if text is None else text).split(",")):
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
    conn,
    settings: RunSettings,
    log_path: str | None,
    parent_pid: int,
    start: int,
    job: str | None = None,
    env: dict[str, str] | None = None,
) -> None:
    os.environ.update(env or {})  # before CUDA starts: CUDA_VISIBLE_DEVICES picks this worker's GPU
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    if any(mode == "startup" and n in (None, start) for mode, n in _faults()):
        os._exit(3)
    if env and "OMP_NUM_THREADS" in env:  # the cores this worker's rows were given (torch is imported)
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
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
        conn.send(dataclasses.replace(res, **device_identity(cfg.device)).to_row())
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


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class WorkerPool:
    """One worker process at a time, restarted after a crash or a timeout.

    :meth:`run` measures a config and waits for its row; :meth:`begin` and :meth:`poll` do the
    same in two steps, so that one caller can keep several pools (one per GPU) busy at once."""

    def __init__(
        self,
        settings: RunSettings,
        log_path: str | None = None,
        *,
        job: str | None = None,
        result_cls: type = BenchResult,
        on_progress: Callable[..., None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``job``: ``"module:function"`` the worker runs on each config's ``asdict`` instead of a
        sweep measurement: ``function(msg, settings, progress) -> row``; ``result_cls`` builds results
        (``result_cls(cfg, status, error=..., elapsed_s=...)`` and ``result_cls.from_row(row)``), and
        ``on_progress(*values)`` receives what the job passes to ``progress``. ``env``: variables
        the worker sets before it starts (``CUDA_VISIBLE_DEVICES`` gives it one GPU)."""
        self.settings = settings
        self.log_path = log_path
        self.job = job
        self.result_cls = result_cls
        self.on_progress = on_progress
        self.env = dict(env or {})
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None
        self.starts = 0
        self.start_failures = 0  # in a row
        self.identity: dict[str, dict[str, str]] = {}  # device -> where its last row ran (sweep rows)
        self._cfg = None  # the config in flight, and what is known of it:
        self._limit = 0.0
        self._ready_by = 0.0  # a worker starting: its deadline (time.monotonic)
        self._t0: float | None = None  # the config sent: when (time.perf_counter)
        self._oom_before: dict[str, int] = {}
        self._peak_rss: int | None = None
        self._result = None  # a result known before the worker gave one

    @property
    def restarts(self) -> int:
        """Workers started after the first (each after a crash, a timeout or a failed start)."""
        return max(0, self.starts - 1)

    @property
    def gave_up(self) -> bool:
        """True after :data:`MAX_START_FAILURES` failed starts in a row."""
        return self.start_failures >= MAX_START_FAILURES

    @property
    def busy(self) -> bool:
        """A config was begun and its result not yet taken by :meth:`poll`."""
        return self._cfg is not None

    @property
    def config(self):
        """The config begun and not yet finished, or None."""
        return self._cfg

    def _spawn(self) -> None:
        """Start a worker; :meth:`poll` waits for it to say it is ready."""
        self.starts += 1
        parent, child = self.ctx.Pipe()
        args = (child, self.settings, self.log_path, os.getpid(), self.starts, self.job, self.env)
        self.proc = self.ctx.Process(target=_worker_main, args=args, daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        # Importing torch can take a while on a loaded machine; that is not the config's time.
        self._ready_by = time.monotonic() + STARTUP_TIMEOUT_S

    def _start_failed(self) -> None:
        assert self.proc is not None
        self.proc.join(timeout=1)
        code = self.proc.exitcode
        self.kill()
        self.start_failures += 1
        how = f"no sign of life after {STARTUP_TIMEOUT_S} s" if code is None else exit_text(code)
        problem = f"the benchmark worker did not start ({how}); see {self.log_path or 'its stderr'}"
        self._result = self.result_cls(self._cfg, "error", error=problem)

    def kill(self) -> None:
        """Kill the worker at once (SIGKILL); whatever it was computing is lost."""
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None
        self._t0 = None

    def close(self) -> None:
        """Ask an idle worker to exit, then make sure it has."""
        if self.proc is not None and self.proc.is_alive() and self.conn is not None and self._t0 is None:
            try:
                self.conn.send(None)
                self.proc.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
        self.kill()

    def run(self, cfg, timeout_s: float | None = None):
        """Run ``cfg`` in the worker; ``timeout_s`` (default: the settings') caps its wall time."""
        self.begin(cfg, timeout_s)
        while (res := self.poll(0.5)) is None:
            pass
        return res

    def begin(self, cfg, timeout_s: float | None = None) -> None:
        """Start ``cfg`` (and a worker first, if none is alive); :meth:`poll` gives its result."""
        if self._cfg is not None:
            raise RuntimeError("the pool's worker is busy with another config")
        self._cfg, self._result = cfg, None
        self._limit = self.settings.timeout_s if timeout_s is None else min(timeout_s, self.settings.timeout_s)
        if self.proc is None or not self.proc.is_alive():
            self.kill()
            self._spawn()
        else:
            self._send()

    def _send(self) -> None:
        assert self.conn is not None
        self._t0 = time.perf_counter()
        self._oom_before = oom_kill_counts()
        self._peak_rss = None
        try:
            self.conn.send(asdict(self._cfg))
        except (BrokenPipeError, OSError) as exc:
            self.kill()
            self._result = self.result_cls(self._cfg, "error", error=f"could not reach the worker: {exc}")

    def poll(self, wait_s: float = 0.0):
        """The result of the config begun, once it is in (waiting at most ``wait_s`` seconds for
        it), else None. A worker that died or ran past the timeout is killed and its row says so."""
        if self._cfg is not None and self._result is None:
            if self._t0 is None:
                self._poll_start(wait_s)
            else:
                self._poll_row(wait_s)
        if self._result is None:
            return None
        res, self._cfg, self._result = self._result, None, None
        return self._where(res)

    def _poll_start(self, wait_s: float) -> None:
        assert self.conn is not None
        try:
            if self.conn.poll(max(0.0, min(wait_s, self._ready_by - time.monotonic()))):
                if self.conn.recv() != "ready":
                    raise EOFError
                self.start_failures = 0
                self._send()
            elif time.monotonic() >= self._ready_by:
                self._start_failed()
        except (EOFError, OSError):
            self._start_failed()

    def _poll_row(self, wait_s: float) -> None:
        assert self.conn is not None and self.proc is not None and self._t0 is not None
        cfg, t0, limit = self._cfg, self._t0, self._limit
        remaining = t0 + limit - time.perf_counter()
        if remaining <= 0:
            self.kill()
            self._result = self.result_cls(
                cfg,
                "timeout",
                error=f"no result after {limit:.3g} s"
                + ("" if limit == self.settings.timeout_s else " (what was left of the sweep's budget)")
                + "; worker killed",
                elapsed_s=round(time.perf_counter() - t0, 3),
            )
            return
        try:
            if self.conn.poll(min(remaining, wait_s)):
                msg = self.conn.recv()
                if isinstance(msg, tuple) and msg and msg[0] == "progress":
                    if self.on_progress is not None:
                        self.on_progress(*msg[1:])
                    return
                if isinstance(msg, tuple) and msg and msg[0] == "error":
                    elapsed = round(time.perf_counter() - t0, 3)
                    res = self.result_cls(cfg, "error", error=msg[1], elapsed_s=elapsed)
                else:
                    res = self.result_cls.from_row(msg)
                self._t0 = None
                if res.status == "error" and context_lost(res.error):
                    self.kill()  # the worker is exiting; the next config starts a fresh one
                self._result = res
                return
        except (EOFError, OSError):
            pass
        rss = peak_rss_bytes(self.proc.pid)
        if rss is not None:
            self._peak_rss = max(rss, self._peak_rss or 0)
        if not self.proc.is_alive():
            code = self.proc.exitcode
            self.kill()
            elapsed = round(time.perf_counter() - t0, 3)
            if code == -signal.SIGKILL:
                why = oom_evidence(self._oom_before, oom_kill_counts(), self._peak_rss, memory_limit_bytes())
                if why is not None:
                    error = f"worker killed by the out-of-memory killer ({why})"
                    self._result = self.result_cls(cfg, "oom", error=error, elapsed_s=elapsed)
                    return
                error = "worker killed (signal 9); no sign of the out-of-memory killer"
            else:
                error = f"worker crashed ({exit_text(code)})"
            self._result = self.result_cls(cfg, "error", error=error, elapsed_s=elapsed)

    def _where(self, res):
        """A sweep row with where it ran: the worker's own record, else (a row the worker did not
        send: a crash, a timeout) what this pool last saw of that device, or what can be read here."""
        if self.job is not None or not isinstance(res, BenchResult):
            return res
        dev = res.config.device
        if res.device_name:
            self.identity[dev] = {k: getattr(res, k) for k in IDENTITY_FIELDS}
            return res
        known = self.identity.get(dev) or device_identity(dev, self.env.get("CUDA_VISIBLE_DEVICES"), probe=False)
        return dataclasses.replace(res, **known)


def exit_text(code: int) -> str:
    if code < 0:
        return f"killed (signal {-code}, {_signal_name(-code)})"
    return f"exit code {code}"
