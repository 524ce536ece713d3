"""A run's lifecycle around its worker pool: SIGTERM and SIGHUP stop it like Ctrl-C (the worker
is killed, finished rows and the metadata are kept, :class:`SweepInterrupted` is raised), a second
signal exits at once, and ``metadata.json`` records how it ended."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only: runs import the worker when they start
    from attn_bench.core import executor, worker
from attn_bench.core.machine import now
from attn_bench.core.results import write_metadata

# Under a time budget, a config is started only if at least this many seconds are left.
MIN_CONFIG_S = 2.0

# Signals that stop a sweep the way Ctrl-C does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped by a signal (SIGINT, SIGTERM or SIGHUP); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
def pool_lifecycle(pool: worker.WorkerPool | executor.Executor, out: Path, meta: dict, results: list) -> Iterator[None]:
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
