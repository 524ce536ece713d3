"""Configs run in a worker process, so a crash, an out-of-memory kill or a hang costs one row.

The parent sends one config at a time over a pipe and waits at most ``timeout_s`` for its
result. If the worker dies (segfault, OOM killer) or times out, it is killed, the row is
recorded as ``error`` / ``oom`` / ``timeout`` and a fresh worker takes the next config. The
worker ignores SIGINT: Ctrl-C reaches the parent, which stops the sweep cleanly.

Fault injection for the harness's own tests: ``ATTN_BENCH_FAULT=<mode>:<seq_len>[,...]`` with
``mode`` one of ``crash``, ``hang``, ``raise``, ``wrong`` (perturbs the output) makes the worker
misbehave on that length (every length when ``:<seq_len>`` is left out).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import asdict

from kernels import AUTOTUNE_ENV

from .config import BenchConfig, BenchResult, RunSettings

FAULT_ENV = "ATTN_BENCH_FAULT"
STARTUP_TIMEOUT_S = 300


def _inject_fault(cfg: BenchConfig) -> None:
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        mode, _, n = spec.partition(":")
        if n and int(n) != cfg.seq_len:
            continue
        if mode == "crash":
            os._exit(139)
        if mode == "hang":
            time.sleep(3600)
        if mode == "raise":
            raise RuntimeError("injected failure")
        if mode == "wrong":
            from . import measure

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


def _worker_main(conn, settings: RunSettings, log_path: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if settings.autotune_max > 0:
        os.environ[AUTOTUNE_ENV] = str(settings.autotune_max)
    if log_path:  # keep the terminal for the progress bar: library chatter goes to the log
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    from .measure import run_config
    from .plugins import load_plugins

    load_plugins(settings.plugins)
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        cfg = BenchConfig(**msg)
        from . import measure

        measure.PERTURB = 0.0
        try:
            _inject_fault(cfg)
            res = run_config(cfg, settings)
        except Exception as exc:  # run_config records its own failures; this is a last resort
            res = BenchResult(cfg, "error", error=f"{type(exc).__name__}: {exc}")
        conn.send(res.to_row())
        if res.status == "error" and context_lost(res.error):
            return  # a fresh worker (and CUDA context) takes the next config
        _release_memory()


class WorkerPool:
    """One worker process at a time, restarted after a crash or a timeout."""

    def __init__(self, settings: RunSettings, log_path: str | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None
        self.starts = 0

    @property
    def restarts(self) -> int:
        """Workers started after the first (each after a crash or a timeout)."""
        return max(0, self.starts - 1)

    def _start(self) -> None:
        self.starts += 1
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(child, self.settings, self.log_path), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        # Importing torch can take a while on a loaded machine; that is not the config's time.
        try:
            ready = parent.poll(STARTUP_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            code = self.proc.exitcode
            self._kill()
            raise RuntimeError(
                f"the benchmark worker did not start (exit code {code}); see {self.log_path or 'its stderr'}"
            )

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive() and self.conn is not None:
            try:
                self.conn.send(None)
                self.proc.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
        self._kill()

    def run(self, cfg: BenchConfig, timeout_s: float | None = None) -> BenchResult:
        """Run ``cfg`` in the worker; ``timeout_s`` (default: the settings') caps its wall time."""
        limit = self.settings.timeout_s if timeout_s is None else min(timeout_s, self.settings.timeout_s)
        if self.proc is None or not self.proc.is_alive():
            self._kill()
            self._start()
        assert self.conn is not None and self.proc is not None
        t0 = time.perf_counter()
        msg = asdict(cfg)
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError) as exc:
            self._kill()
            return BenchResult(cfg, "error", error=f"could not reach the worker: {exc}")
        deadline = t0 + limit
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                self._kill()
                return BenchResult(
                    cfg,
                    "timeout",
                    error=f"no result after {limit:.3g} s"
                    + ("" if limit == self.settings.timeout_s else " (what was left of the sweep's budget)")
                    + "; worker killed",
                    elapsed_s=round(time.perf_counter() - t0, 3),
                )
            try:
                if self.conn.poll(min(remaining, 0.5)):
                    res = BenchResult.from_row(self.conn.recv())
                    if res.status == "error" and context_lost(res.error):
                        self._kill()  # the worker is exiting; the next config starts a fresh one
                    return res
            except (EOFError, OSError):
                pass
            if not self.proc.is_alive():
                code = self.proc.exitcode
                self._kill()
                elapsed = round(time.perf_counter() - t0, 3)
                if code == -signal.SIGKILL:
                    return BenchResult(
                        cfg,
                        "oom",
                        error="worker killed by SIGKILL (most likely the kernel's out-of-memory killer)",
                        elapsed_s=elapsed,
                    )
                return BenchResult(cfg, "error", error=f"worker crashed (exit code {code})", elapsed_s=elapsed)
