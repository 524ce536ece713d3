"""Running a sweep: configs through the worker, rows written atomically, metadata, resume.

Files in the output directory:
- ``results.csv``: one row per config (columns from :func:`attn_bench.core.config.result_columns`), rewritten
  whole after every row (temporary file + ``os.replace``), so it is never half-written and an
  interrupted sweep keeps every finished row. Reading it back validates every line.
- ``metadata.json``: machine, versions, git commit, command line, preset, times, status
  (``running``, ``complete``, ``interrupted`` or ``failed``), the list of resumes, and the plan:
  every config the run was to measure (so a report can list those that never ran).
- ``performer_accuracy.csv``: the Performer accuracy study (when the preset has one).
- ``worker.log``: what the worker processes printed (compiler and profiler chatter, tracebacks).

SIGTERM and SIGHUP stop a sweep like Ctrl-C: the worker is killed, the finished rows and the
metadata (``interrupted``) are kept, and :class:`SweepInterrupted` is raised. A second signal
while that is done exits at once.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attention_variants as av
from attn_bench.baselines.registry import exact_baselines
from attn_bench.core.config import (
    AccuracyStudy,
    BenchConfig,
    BenchResult,
    RunSettings,
    config_columns,
)

if TYPE_CHECKING:  # for the annotation only: runs import the worker when they start
    from attn_bench.core.executor import Executor
from attn_bench.core.lifecycle import MIN_CONFIG_S, pool_lifecycle
from attn_bench.core.machine import now
from attn_bench.core.results import (
    ACCURACY,
    RESULTS,
    RETRY_STATUSES,
    WORKER_LOG,
    _read_metadata,
    _stderr,
    atomic_write,
    prepare_run_dir,
    read_results,
    remove_stale_temp_files,
    rows_to_csv,
    write_metadata,
    write_results,
)

# ... and the Performer accuracy study only if this many are left.
ACCURACY_MIN_S = 30.0


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
    executor: Executor | None = None,
) -> list[BenchResult]:
    """Run ``configs`` (skipping those already in ``out/results.csv`` when ``resume``), writing
    every row as it finishes. Returns all rows of the file.

    ``retry_failed`` (with ``resume``): configs whose rows say ``timeout``, ``oom`` or ``error``, or
    are ``noisy``, run again, and the new row replaces the old one.

    Ctrl-C, SIGTERM and SIGHUP kill the worker at once (the config in flight is not recorded, so
    ``resume`` runs it again), save the metadata as ``interrupted`` and raise KeyboardInterrupt
    (:class:`SweepInterrupted` for SIGTERM and SIGHUP). After :data:`~attn_bench.core.worker.MAX_START_FAILURES`
    failed worker starts in a row, :class:`~attn_bench.core.worker.WorkerStartError` is raised and the
    metadata says ``failed``.

    ``budget_s``: wall-clock seconds for the whole sweep. A config's timeout is cut to what is
    left, and the configs not started in time are recorded with status ``skipped``.

    ``executor``: where the rows run (:mod:`attn_bench.core.executor`; default: one local worker).
    With several slots, rows run at once and are written as they finish; a row that only copies
    another (:func:`same_computation`) waits for it if it is in flight."""
    from attn_bench.core.executor import LocalExecutor
    from attn_bench.core.worker import WorkerStartError

    # A cluster's executor checks its own devices; the local one needs them here.
    prepare_run_dir(out, (c.device for c in configs if executor is None or executor.runs_here), resume=resume)
    for f in remove_stale_temp_files(out):
        _stderr(f"removed {f}, left behind by a run that was killed")
    path = out / RESULTS
    results = read_results(path) if resume else []
    where = {r.config.key(): i for i, r in enumerate(results)}
    rerun = {k for k, i in where.items() if retry_failed and (results[i].status in RETRY_STATUSES or results[i].noisy)}
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
    meta["plan"] = plan_record(configs)
    meta["status"] = "running"
    meta.pop("error", None)
    if budget_s is not None:
        meta["budget_s"] = budget_s
    write_metadata(out, meta)

    executor = executor or LocalExecutor(settings, str(out / WORKER_LOG))
    bar = _Progress(todo, enabled=progress, slots=executor.slots)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    waiting = list(todo)
    running: dict[tuple, float] = {}  # the rows in flight: key -> when they started

    def record(cfg: BenchConfig, res: BenchResult, took: float | None) -> None:
        """``res`` into the results (replacing the config's old row) and the file, then the bar."""
        if cfg.key() in where:
            results[where[cfg.key()]] = res
        else:
            where[cfg.key()] = len(results)
            results.append(res)
        write_results(path, results)
        if on_result is not None:
            on_result(res)
        ran = f" {res.time_ms:.3g} ms" if res.time_ms else ""
        at = f" [{res.device_name} on {res.node}]" if executor.slots > 1 and res.node else ""
        bar.advance(cfg, took, f"{cfg.label()}: {res.status}{ran}{at}")

    with pool_lifecycle(executor, out, meta, results):
        with bar:
            while waiting or running:
                while waiting and executor.free:
                    cfg = _next_row(waiting, running)
                    if cfg is None:
                        break  # each waits for the row it copies, in flight
                    waiting.remove(cfg)
                    left = math.inf if deadline is None else deadline - time.monotonic()
                    copy = _copy_of_same_computation(cfg, results)
                    if left < MIN_CONFIG_S:
                        why = f"not reached: the sweep's {budget_s:g} s budget ran out"
                        record(cfg, BenchResult(cfg, "skipped", error=why), None)
                    elif copy is not None:
                        record(cfg, copy, None)
                    else:
                        bar.start(cfg.label())
                        executor.start(cfg, left)
                        running[cfg.key()] = time.monotonic()
                if running:
                    for cfg, res in executor.wait(0.5):
                        record(cfg, res, time.monotonic() - running.pop(cfg.key()))
                        if executor.gave_up:
                            raise WorkerStartError(f"{res.error} ({executor.start_failures} failed starts in a row)")
                elif waiting and not executor.free:
                    raise WorkerStartError("no worker can take a row")
        out_of_time = deadline is not None and deadline - time.monotonic() < ACCURACY_MIN_S
        if accuracy is not None and not (out / ACCURACY).exists() and not out_of_time:
            from attn_bench.sweep.accuracy import run_accuracy

            bar_msg = "Performer accuracy study"
            if progress:
                print(f"{bar_msg} ...", file=sys.stderr)
            rows = run_accuracy(accuracy)
            atomic_write(out / ACCURACY, rows_to_csv(rows, list(rows[0].keys()) if rows else []))
    return results


def plan_record(configs: list[BenchConfig]) -> dict:
    """The configs a run is to measure, as ``metadata.json`` keeps them: columns and rows."""
    columns = config_columns()
    return {"columns": columns, "rows": [[c.to_row().get(col) for col in columns] for c in configs]}


def not_run(directory: Path, meta: dict) -> tuple[list[BenchConfig], int | None]:
    """``(configs of the plan with no row in results.csv, configs planned)``. A run from before the
    plan was recorded gives ``([], count)``, with only the count of its configs (None if unknown)."""
    plan = meta.get("plan")
    if not plan:
        return [], meta.get("configs")
    done = {r.config.key() for r in read_results(directory / RESULTS, warn=None)}
    configs = []
    for values in plan["rows"]:
        try:
            configs.append(BenchConfig.from_row(dict(zip(plan["columns"], values, strict=True))))
        except ValueError:  # a plug-in's config this process cannot rebuild: counted, not listed
            continue
    return [c for c in configs if c.key() not in done], len(plan["rows"])


def same_computation(cfg: BenchConfig) -> BenchConfig | None:
    """The config that computes exactly the same thing, if any: the ``sdpa`` and ``flex`` baselines
    of an approximation (the Performer) compute the exact variant it approximates (full softmax
    attention), i.e. that variant's row."""
    exact = av.variant_class(cfg.variant).approximates
    if exact is not None and cfg.backend in exact_baselines():
        return dataclasses.replace(cfg, variant=exact, options=())
    return None


def _next_row(waiting: list[BenchConfig], running: dict[tuple, float]) -> BenchConfig | None:
    """The first waiting config that does not copy a row in flight (it would run it again)."""
    for cfg in waiting:
        twin = same_computation(cfg)
        if twin is None or twin.key() not in running:
            return cfg
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
    """A rich progress line (count, bar, elapsed, ETA, then the config's label, cut to fit the
    terminal; see :mod:`attn_bench.core.progress`); silent when disabled."""

    def __init__(self, todo: list[BenchConfig], enabled: bool, console: Any = None, slots: int = 1) -> None:
        self.todo = [(c.seq_len, c.pass_) for c in todo]
        self.slots = slots  # rows run at once: the ETA is the rest's time divided among them
        self.done: list[tuple[int, str, float]] = []  # the rows run, with their wall time
        self.count = 0  # the rows advanced over, run or not (a copy, a row skipped)
        self.enabled = enabled
        self.console = console
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from attn_bench.core.progress import progress_bar

            self.progress = progress_bar(eta=True, console=self.console)
            self.progress.__enter__()
            self.task = self.progress.add_task("sweep", total=len(self.todo), eta="?")
        return self

    def start(self, label: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=label)

    def advance(self, cfg: BenchConfig, seconds: float | None, message: str) -> None:
        """``cfg`` is done; it took ``seconds`` of wall time (None: it did not run, a copy of
        another row or a row skipped), from which the ETA of the rest follows."""
        from attn_bench.core.progress import clock, eta_seconds

        self.count += 1
        if seconds is not None:
            self.done.append((cfg.seq_len, cfg.pass_, seconds))
        left = self.todo[self.count :]
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
            eta = eta_seconds(self.done, left)
            eta = None if eta is None else eta / min(self.slots, max(1, len(left)))
            self.progress.update(self.task, advance=1, eta=clock(eta))

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def elapsed(t0: float) -> str:
    s = time.perf_counter() - t0
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"
