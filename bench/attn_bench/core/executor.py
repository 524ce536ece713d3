"""Where a sweep's rows run: the executors the sweep loop (:mod:`attn_bench.sweep.run`) drives.

An executor takes rows (:meth:`start`) while it has a free slot, and hands back the rows that
finished (:meth:`wait`), each as ``(config, result)``. Every row's guarantees are the worker
pool's (:mod:`attn_bench.core.worker`): a crash, a hang past the timeout or an OOM kill costs
that row only, and the numerics gate runs before timing in the process that times.

- :class:`LocalExecutor` (``--executor local``, the default): one worker process on this machine,
  or one per GPU of ``--devices`` (each worker sees only its own GPU, so timing rows never share one).
- :class:`attn_bench.core.ray_executor.RayExecutor` (``--executor ray``): one Ray task per row on
  a Ray cluster (an optional extra, imported only when asked for).
"""

from __future__ import annotations

from multiprocessing.connection import wait as wait_for_connections
from typing import Any, Protocol

from attn_bench.core.config import BenchConfig, BenchResult, RunSettings
from attn_bench.core.results import RunSetupError

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """What the sweep loop needs of an executor."""

    slots: int  # rows that may run at once (for the ETA)
    runs_here: bool  # the rows run on this machine (its devices are checked before the run starts)
    summary: str  # where the rows run, in words

    @property
    def free(self) -> bool: ...  # a row may start now

    @property
    def gave_up(self) -> bool: ...  # no worker can start any more: the sweep stops

    @property
    def start_failures(self) -> int: ...  # failed worker starts in a row

    @property
    def restarts(self) -> int: ...  # workers started again after a crash, a timeout or a failed start

    def start(self, cfg: BenchConfig, timeout_s: float) -> None: ...

    def wait(self, seconds: float) -> list[tuple[BenchConfig, BenchResult]]: ...

    def close(self) -> None: ...  # the sweep is done: workers asked to exit

    def kill(self) -> None: ...  # the sweep stops now: rows in flight are dropped, workers killed


class LocalExecutor:
    """Worker processes on this machine: one (``devices`` None), or one per CUDA device index of
    ``devices``, started with ``CUDA_VISIBLE_DEVICES`` set to it (its rows' ``cuda`` is that GPU)."""

    def __init__(self, settings: RunSettings, log_path: str | None = None, devices: list[str] | None = None) -> None:
        from attn_bench.core.worker import WorkerPool

        envs: list[dict[str, str]] = [{"CUDA_VISIBLE_DEVICES": d} for d in devices] if devices else [{}]
        self.pools = [WorkerPool(settings, log_path, env=env) for env in envs]
        self.slots = len(self.pools)
        self.runs_here = True
        self.summary = f"CUDA devices {', '.join(devices)}, a worker each" if devices else "one worker"

    def _ready(self) -> list[Any]:
        return [p for p in self.pools if not p.busy and not p.gave_up]

    @property
    def free(self) -> bool:
        return bool(self._ready())

    @property
    def gave_up(self) -> bool:
        """Every worker failed to start :data:`~attn_bench.core.worker.MAX_START_FAILURES` times in a row."""
        return all(p.gave_up for p in self.pools)

    @property
    def start_failures(self) -> int:
        return max(p.start_failures for p in self.pools)

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self.pools)

    def start(self, cfg: BenchConfig, timeout_s: float) -> None:
        self._ready()[0].begin(cfg, timeout_s)

    def wait(self, seconds: float) -> list[tuple[BenchConfig, BenchResult]]:
        """The rows that finished, after waiting up to ``seconds`` (at most 0.5: the timeouts are
        checked between waits) for a worker to send one or to die."""
        busy = [p for p in self.pools if p.busy]
        conns = [p.conn for p in busy if p.conn is not None]
        if conns:
            wait_for_connections(conns, timeout=min(seconds, 0.5))
        done = []
        for p in busy:
            cfg = p.config
            res = p.poll(0.0)
            if res is not None:
                done.append((cfg, res))
        return done

    def close(self) -> None:
        for p in self.pools:
            p.close()

    def kill(self) -> None:
        for p in self.pools:
            p.kill()


def cuda_indices(text: str | None) -> list[str] | None:
    """``--devices``: ``all`` (every CUDA device here) or a comma list of device indices such as
    ``0,1,3``, as strings; None when not given. ValueError on anything else."""
    if text is None:
        return None
    if text.strip() == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError("'all' asks for every CUDA device, and none is visible here")
        return [str(i) for i in range(count)]
    items = [x.strip().removeprefix("cuda:") for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() for x in items):
        raise ValueError(f"expected 'all' or a comma list of CUDA device indices such as 0,1,3, got {text!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"a device is listed twice in {text!r}: rows that time must not share a GPU")
    return items


def check_executor_options(
    kind: str, address: str | None, devices: str | None, cpus_per_row: int | None, card: str | None = None
) -> None:
    """The executor options that do not go together (RunSetupError naming the option), checked
    before anything is read or started."""
    if kind not in EXECUTORS:
        raise RunSetupError("--executor", f"unknown executor {kind!r}; executors are {', '.join(EXECUTORS)}")
    if kind == "local":
        for option, value in (("--address", address), ("--cpus-per-row", cpus_per_row), ("--card", card)):
            if value is not None:
                raise RunSetupError(option, "is for --executor ray")
    elif devices is not None:
        raise RunSetupError("--devices", "is for --executor local: Ray gives each CUDA row a GPU of the cluster")
    if cpus_per_row is not None and cpus_per_row < 1:
        raise RunSetupError("--cpus-per-row", f"must be at least 1, got {cpus_per_row}")


def make_executor(
    kind: str,
    settings: RunSettings,
    log_path: str,
    config_devices: list[str],
    *,
    address: str | None = None,
    devices: str | None = None,
    cpus_per_row: int | None = None,
    card: str | None = None,
) -> LocalExecutor | Any:
    """The executor for a sweep whose configs run on ``config_devices``; RunSetupError, before
    any row runs, when it cannot take them (see :func:`check_executor_options`, and for Ray
    :class:`~attn_bench.core.ray_executor.RayExecutor`)."""
    check_executor_options(kind, address, devices, cpus_per_row, card)
    indexed = sorted({d for d in config_devices if d.startswith("cuda:")})
    if indexed and (kind == "ray" or devices is not None):
        option = "--executor ray" if kind == "ray" else "--devices"
        raise RunSetupError("--device", f"{', '.join(indexed)}: with {option} each row's worker sees one GPU, 'cuda'")
    if kind == "ray":
        from attn_bench.core.ray_executor import RayExecutor

        return RayExecutor(
            settings, log_path, set(config_devices), address=address, cpus_per_row=cpus_per_row, card=card
        )
    try:
        indices = cuda_indices(devices)
    except ValueError as exc:
        raise RunSetupError("--devices", str(exc)) from None
    if indices is not None:
        other = sorted({d for d in config_devices if d != "cuda"})
        if other:
            raise RunSetupError(
                "--devices",
                f"spreads CUDA rows over GPUs (their device 'cuda'); these configs run on {', '.join(other)}",
            )
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [i for i in indices if int(i) >= count]
        if missing:
            raise RunSetupError("--devices", f"CUDA device {', '.join(missing)} does not exist here ({count} visible)")
    return LocalExecutor(settings, log_path, indices)
