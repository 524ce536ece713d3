"""``attn-bench sweep --executor ray``: each row a Ray task, placed by Ray on a cluster's GPUs or cores.

A CUDA row's task asks for one GPU, so every GPU of every node works at once and two timing rows
never share one; a CPU row's task asks for ``cpus_per_row`` cores (default: as many as the smallest
node has, so a CPU row has its node to itself, as in a local run) and times with that many threads.

Inside its task a row runs as it does on this machine: in a :class:`~attn_bench.core.worker.WorkerPool`
worker process, with the numerics gate before timing, so that a crash, a hang past the timeout or an
OOM kill costs that row only (its worker is killed, the Ray worker that holds the pool lives on and
keeps it for the next row that gets the same GPU). From here, a task that gives no answer
:data:`TASK_GRACE_S` beyond its row's timeout is cancelled and its Ray worker killed
(``ray.cancel(force=True)``, which takes the row's worker with it); a task lost with its node or
its Ray worker runs again once elsewhere. Ctrl-C cancels every task in flight the same way.

``card`` (``--card H100``) keeps CUDA rows on the nodes whose GPUs are of that type (Ray's
``accelerator_type``): on a cluster of mixed cards, one run per card type measures every row on
each, and ``attn-bench report DIR1 DIR2`` puts them side by side. Without it a row runs on
whichever GPU is free, and records which (``device_name``).

Ray is an optional extra (``pip install .[cluster]``), imported only here; every node needs this
package installed, and a ``--plugin`` file at the same path (or a plug-in module installed).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from attn_bench.core.config import BenchConfig, BenchResult, RunSettings
from attn_bench.core.results import RunSetupError
from attn_bench.core.worker import FAULT_ENV, STARTUP_TIMEOUT_S, WorkerPool, _faults

INSTALL_HINT = "pip install 'attention-variants-bench[cluster]'"
CONNECT_TIMEOUT_S = 5.0
# Beyond a row's timeout before its task is cancelled from here: the row's worker may first have to
# start (import torch) on its node.
TASK_GRACE_S = STARTUP_TIMEOUT_S + 60.0
# A task lost with its node or its Ray worker runs again this many times.
LOST_RETRIES = 1
LOG_TAIL_BYTES = 1 << 16
CAPACITY_EVERY_S = 5.0

_pool: WorkerPool | None = None  # in a Ray worker: the row worker it keeps between tasks, and its key
_pool_key: tuple | None = None


def import_ray() -> Any:
    """The ``ray`` module, or a RunSetupError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RunSetupError(
            "--executor", f"ray is not installed here; install the cluster extra: {INSTALL_HINT}"
        ) from None
    return ray


def address_problem(address: str) -> str | None:
    """Why ``host:port`` (or ``ray://host:port``) cannot be reached, or None (also for ``auto``,
    which Ray resolves itself). Checked first: Ray itself retries an unreachable address for minutes."""
    if address in ("auto", "local"):
        return None
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return f"expected HOST:PORT, ray://HOST:PORT or auto, got {address!r}"
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"no Ray cluster answers at {address} ({exc.strerror or exc}; tried for {CONNECT_TIMEOUT_S:g} s)"
    return None


def run_row(cfg: BenchConfig, settings: RunSettings, env: dict[str, str], timeout_s: float) -> tuple[BenchResult, str]:
    """A Ray task's body: ``cfg`` measured in this Ray worker's row worker (started, or started
    again when the GPU or the settings differ from the last task's); returns the row and what the
    row's worker wrote to its log meanwhile (the tail), for the run's ``worker.log``."""
    global _pool, _pool_key
    import ray

    if any(mode == "stall" and n in (None, cfg.seq_len) for mode, n in _faults(env.get(FAULT_ENV, ""))):
        time.sleep(3600)
    env = dict(env)
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if gpus:  # Ray assigns this task's GPU per task: the row worker must see that one
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    key = (settings, tuple(sorted(env.items())))
    log = Path(tempfile.gettempdir()) / f"attn-bench-worker-{os.getpid()}.log"
    if _pool is None or _pool_key != key:
        if _pool is not None:
            _pool.close()
        _pool, _pool_key = WorkerPool(settings, str(log), env=env), key
    size = log.stat().st_size if log.exists() else 0
    res = _pool.run(cfg, timeout_s)
    tail = ""
    if log.exists() and log.stat().st_size > size:
        with open(log, "rb") as f:
            f.seek(max(size, log.stat().st_size - LOG_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    return res, tail


def describe(nodes: list[dict[str, float]]) -> str:
    """A cluster in words: its nodes alive, GPUs and cores."""
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    cores = sum(int(n.get("CPU", 0)) for n in nodes)
    return f"{len(nodes)} node(s) alive, {gpus} GPU(s), {cores} core(s)"


def cards_of(nodes: list[dict[str, float]]) -> list[str]:
    """The GPU types of a cluster, as Ray names them on its nodes (``accelerator_type:H100``)."""
    return sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})


def cluster_problem(
    kinds: set[str], nodes: list[dict[str, float]], cpus_per_row: int | None, card: str | None
) -> tuple[str, str] | None:
    """``(option, why)`` when the cluster of ``nodes`` (their resources) cannot run rows on the
    devices ``kinds`` (``cuda``, ``cpu``) as asked, or None."""
    cores = [int(n["CPU"]) for n in nodes if n.get("CPU", 0) >= 1]
    if "cuda" in kinds and not any(n.get("GPU", 0) >= 1 for n in nodes):
        return "--device", f"the configs run on CUDA and the Ray cluster has no GPU ({describe(nodes)})"
    if card is not None and "cuda" in kinds and card not in cards_of(nodes):
        return "--card", f"no node of the Ray cluster has a {card}; its cards: {', '.join(cards_of(nodes)) or 'none'}"
    if "cpu" in kinds and not cores:
        return (
            "--device",
            f"the configs run on the CPU and no node of the Ray cluster offers a core ({describe(nodes)})",
        )
    if "cpu" in kinds and cpus_per_row is not None and cpus_per_row > max(cores):
        return "--cpus-per-row", f"{cpus_per_row} cores per row, and the largest node has {max(cores)}"
    return None


class RayExecutor:
    """Rows as Ray tasks on the cluster at ``address`` (None: Ray's default, ``RAY_ADDRESS`` or a
    Ray started on this machine). RunSetupError, before any row runs, when Ray is missing, the
    address does not answer, or the cluster has no GPU for CUDA rows or no node with the cores
    a CPU row asks for."""

    runs_here = False

    def __init__(
        self,
        settings: RunSettings,
        log_path: str | None,
        devices: set[str],
        address: str | None = None,
        cpus_per_row: int | None = None,
        card: str | None = None,
    ) -> None:
        if address is not None and (problem := address_problem(address)) is not None:
            raise RunSetupError("--address", problem)
        ray = import_ray()
        self.ray = ray
        self.owns = not ray.is_initialized()  # shut down on the way out only what was started here
        if self.owns:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RunSetupError("--address", f"cannot connect to Ray: {exc}") from None
        self.settings = settings
        self.log_path = log_path
        self.kinds = {"cuda" if d.startswith("cuda") else "cpu" for d in devices}
        self.env = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
        nodes = self.nodes()
        problem = cluster_problem(self.kinds, nodes, cpus_per_row, card)
        if problem is not None:
            self.close()
            raise RunSetupError(*problem)
        cores = [int(n["CPU"]) for n in nodes if n.get("CPU", 0) >= 1]
        self.cpus = cpus_per_row or (min(cores) if cores else 1)
        self.card = card
        self.task = ray.remote(run_row)
        self.inflight: dict[Any, tuple[BenchConfig, float, float, int]] = {}  # ref -> cfg, timeout, deadline, tries
        self._capacity, self._checked = self.capacity(nodes), time.monotonic()
        self.slots = self._capacity
        only = f", on its {card} cards only" if card else ""
        self.summary = f"a Ray cluster ({describe(nodes)}; {self.slots} rows at once{only})"
        self.start_failures = self.restarts = 0
        self.lost = 0  # tasks lost with their node or Ray worker, and started again
        self.gave_up = False

    def nodes(self) -> list[dict[str, float]]:
        """The resources (``CPU``, ``GPU`` ...) of each node alive."""
        return [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]

    def capacity(self, nodes: list[dict[str, float]]) -> int:
        """How many rows can run at once: a GPU each, ``self.cpus`` cores each (at least 1, so that
        a cluster that lost its nodes waits for new ones)."""
        n = 0
        if "cuda" in self.kinds:
            n += sum(int(x.get("GPU", 0)) for x in nodes if self.card is None or f"accelerator_type:{self.card}" in x)
        if "cpu" in self.kinds:
            n += sum(int(x.get("CPU", 0)) // self.cpus for x in nodes)
        return max(1, n)

    @property
    def free(self) -> bool:
        if time.monotonic() - self._checked > CAPACITY_EVERY_S:  # nodes come and go
            self._capacity, self._checked = self.capacity(self.nodes()), time.monotonic()
        return len(self.inflight) < self._capacity

    def start(self, cfg: BenchConfig, timeout_s: float, tries: int = 0) -> None:
        limit = min(timeout_s, self.settings.timeout_s)
        if cfg.device.startswith("cuda"):
            opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            if self.card is not None:
                opts["accelerator_type"] = self.card
            env = self.env
        else:
            opts, env = {"num_cpus": self.cpus}, {**self.env, "OMP_NUM_THREADS": str(self.cpus)}
        ref = self.task.options(max_retries=0, **opts).remote(cfg, self.settings, env, limit)
        self.inflight[ref] = (cfg, timeout_s, time.monotonic() + limit + TASK_GRACE_S, tries)

    def wait(self, seconds: float) -> list[tuple[BenchConfig, BenchResult]]:
        if not self.inflight:
            return []
        refs = list(self.inflight)
        self.ray.wait(refs, num_returns=1, timeout=min(seconds, 0.5), fetch_local=False)
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        done = []
        for ref in ready:
            cfg, timeout_s, _, tries = self.inflight.pop(ref)
            res = self._result(ref, cfg, timeout_s, tries)
            if res is not None:
                done.append((cfg, res))
        now = time.monotonic()
        for ref, (cfg, _, deadline, _) in list(self.inflight.items()):
            if now > deadline:
                self.ray.cancel(ref, force=True)
                del self.inflight[ref]
                why = "its task gave no answer in time; task cancelled and its Ray worker killed"
                done.append((cfg, BenchResult(cfg, "timeout", error=why)))
        return done

    def _result(self, ref: Any, cfg: BenchConfig, timeout_s: float, tries: int) -> BenchResult | None:
        """The row of a finished task, or None when a lost task was started again."""
        exc = self.ray.exceptions
        try:
            res, tail = self.ray.get(ref)
        except exc.OutOfMemoryError as e:
            return BenchResult(cfg, "oom", error=f"Ray's memory monitor killed the task: {_gist(e)}")
        except exc.RayTaskError as e:
            return BenchResult(cfg, "error", error=f"the row's task failed: {_gist(e)}")
        except exc.RayError as e:  # the node or the Ray worker was lost: not the row's doing
            if tries < LOST_RETRIES:
                self.lost += 1
                self.start(cfg, timeout_s, tries + 1)
                return None
            return BenchResult(cfg, "error", error=f"its task was lost {tries + 1} times: {_gist(e)}")
        if tail and self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"--- {cfg.label()} on {res.node} ({res.device_name}) ---\n{tail}\n")
        return res

    def kill(self) -> None:
        """Cancel every task in flight (their Ray workers, and so their row workers, are killed)."""
        for ref in self.inflight:
            self.ray.cancel(ref, force=True)
        self.inflight.clear()
        self.close()

    def close(self) -> None:
        if self.owns and self.ray.is_initialized():
            self.ray.shutdown()


def _gist(exc: BaseException) -> str:
    """The last line of a Ray error (its cause), cut short."""
    lines = [x for x in str(exc).splitlines() if x.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
