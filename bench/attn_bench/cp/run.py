"""``attn-bench cp``: context-parallel attention on gloo ranks (CPU), per variant and layout.

Every registered variant runs: with its own strategy (ring, halo, scan) or the exact all-gather
fallback (:func:`attention_variants.distributed.strategy_of`; the row's ``strategy`` column).
For each rank count ``P`` one pool of ``P`` worker processes runs every row: a forward and a
forward+backward step of :func:`attention_variants.distributed.context_parallel_attention`,
timed with ``torch.utils.benchmark`` (a fixed number of single-call blocks, a barrier before each,
so every rank issues the same collectives; a row's time is the slowest rank's median), and the
bytes each rank's collectives send (:func:`count_bytes`) against the analytic count
(:func:`analytic_bytes`). Strong scaling fixes the total ``N``; weak scaling fixes ``N / P``.
Where the whole problem is small (``N <= CHECK_MAX_N``) every rank's output is checked against
the float64 reference of the whole sequence (``max_err``; bound: twice the error of one process
in the same dtype, plus a floor); a row beyond it is ``wrong``.
Writes ``results.csv`` (after every rank count, atomically), ``metadata.json``, plots and a
``README.md`` into the output directory.

A row's config checks itself (:class:`CPConfig`, a :class:`~attn_bench.core.config.ConfigError`
naming the field), so a run starts only with rows that can run. While a pool works, the parent
watches its processes: a rank whose process exits ends the pool at once (its rows ``error``),
a row that takes longer than ``timeout_s`` ends it too (its rows ``timeout``). The sweep's fault
injection (``ATTN_BENCH_FAULT``, :mod:`attn_bench.core.worker`) applies to every rank, keyed by
the total ``N``.
"""

from __future__ import annotations

import json
import math
import queue
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from attn_bench.core.config import ConfigError
from attn_bench.core.machine import machine_metadata
from attn_bench.core.results import RunSetupError, atomic_write, prepare_run_dir
from attn_bench.core.worker import exit_text, inject_fault

DEFAULT_OUT = Path("reports/cp-quick")
CHECK_MAX_N = 1024  # rows with a larger total N are not checked against the float64 reference
CHECK_ATOL = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}
POLL_S = 0.5  # how often the parent looks at the ranks' processes while it waits for a row
GRACE_S = 2.0  # after a rank's process is seen gone: time for rows already sent to arrive


@dataclass(frozen=True)
class CPConfig:
    """One row: a variant on ``world`` ranks, total length ``n_total``."""

    variant: str
    layout: str
    causal: bool
    world: int
    n_total: int
    scaling: str  # "strong" (N fixed) or "weak" (N / P fixed)
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    options: str = "{}"  # JSON of the variant's sweep options (e.g. {"window": 128})
    device: str = "cpu"

    def __post_init__(self) -> None:
        problem = config_problem(self)
        if problem is not None:
            raise ConfigError(*problem)

    @property
    def seq_len(self) -> int:
        """The total ``N`` (what the fault injection of :mod:`attn_bench.core.worker` keys on)."""
        return self.n_total

    def variant_options(self) -> dict[str, Any]:
        return json.loads(self.options)

    @property
    def strategy(self) -> str:
        """The context-parallel strategy this variant gets (its own, or the all-gather fallback)."""
        import attention_variants as av
        from attention_variants.distributed import strategy_of

        return strategy_of(av.get_variant(self.variant, **self.variant_options()))

    def row(self, **fields: Any) -> dict[str, Any]:
        """The CSV row of this config (with its strategy) and ``fields``."""
        return {**asdict(self), "strategy": self.strategy, **fields}


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def config_problem(cfg: CPConfig) -> tuple[str, str] | None:
    """``(field, message)`` of what makes ``cfg`` not runnable, or None: an unknown variant, options
    it refuses (the field: the option named in its message), an unknown layout, a count that is not
    a positive int, ``heads`` not a multiple of ``kv_heads``, an ``N`` the layout cannot cut into
    equal chunks, a dtype the device lacks."""
    import attention_variants as av
    from attention_variants.distributed.layout import LAYOUTS, check_length

    if cfg.variant not in av.list_variants():
        return "variant", f"unknown variant {cfg.variant!r}; variants are {', '.join(av.list_variants())}"
    try:
        opts = cfg.variant_options()
        av.get_variant(cfg.variant, **opts)
        cfg.strategy  # noqa: B018 (a declared strategy that cannot run the variant raises)
    except (TypeError, ValueError) as exc:
        named = [k for k in opts if k in str(exc)] if isinstance(opts, dict) else []
        return (named[0] if named else "variant"), f"{cfg.variant} {cfg.options}: {exc}"
    if cfg.layout not in LAYOUTS:
        return "layout", f"layout must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}"
    if cfg.scaling not in ("strong", "weak"):
        return "scaling", f"scaling must be strong or weak, got {cfg.scaling!r}"
    if not isinstance(cfg.causal, bool):
        return "causal", f"causal must be true or false, got {cfg.causal!r}"
    for name in ("world", "n_total", "batch", "heads", "kv_heads", "head_dim"):
        if not _count(getattr(cfg, name)):
            return name, f"{name} must be a positive integer, got {getattr(cfg, name)!r}"
    if cfg.heads % cfg.kv_heads:
        return "kv_heads", f"heads {cfg.heads} is not a multiple of kv_heads {cfg.kv_heads}"
    try:
        check_length(cfg.n_total, cfg.world, cfg.layout)
    except ValueError as exc:
        return "n_total", str(exc)
    if cfg.device not in DTYPES:
        return "device", f"device must be cpu or cuda, got {cfg.device!r}"
    if cfg.dtype not in DTYPES[cfg.device]:
        return "dtype", f"dtype must be one of {', '.join(DTYPES[cfg.device])} on {cfg.device}, got {cfg.dtype!r}"
    return None


def expand(
    ranks: list[int],
    ns: list[int],
    variants: list[str],
    layouts: list[str],
    causal: list[bool],
    options: dict[str, int] | None = None,
    **shape: Any,
) -> list[CPConfig]:
    """Strong rows (total N in ``ns``) and weak rows (N = n * P) for every rank count, each variant
    with the sweep options it declares (from ``options``, else at their defaults); a ConfigError
    (its ``key`` a :class:`CPConfig` field or an option) for the first row that cannot run."""
    from attn_bench.core.variants import declared_options

    check_device(shape.get("device", "cpu"), shape.get("dtype", "float32"), max(ranks, default=1))
    out = []
    for p in ranks:
        for n in ns:
            for scaling, total in (("strong", n), ("weak", n * p)):
                for v in variants:
                    opts = json.dumps(declared_options(v, options) if v in _registered() else {}, sort_keys=True)
                    for lay in layouts:
                        for c in causal:
                            out.append(CPConfig(v, lay, c, p, total, scaling, options=opts, **shape))
    return out


def _registered() -> list[str]:
    import attention_variants as av

    return av.list_variants()


def check_run_options(repeats: object, threads: object, timeout_s: object) -> None:
    """RunSetupError naming the option unless ``repeats`` and ``threads`` are positive ints and
    ``timeout_s`` a positive number of seconds."""
    if not _count(repeats):
        raise RunSetupError("--repeats", f"must be a positive integer (timed calls per row), got {repeats!r}")
    if not _count(threads):
        raise RunSetupError("--threads", f"must be a positive integer (torch threads per rank), got {threads!r}")
    number = isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool)
    if not (number and math.isfinite(timeout_s) and timeout_s > 0):  # type: ignore[arg-type, operator]
        raise RunSetupError("--timeout", f"must be a positive number of seconds, got {timeout_s!r}")


DTYPES = {"cpu": ("float32", "float64"), "cuda": ("bfloat16", "float16", "float32", "float64")}


def check_device(device: str, dtype: str, ranks: int) -> None:
    """ValueError unless ``device`` can hold ``ranks`` ranks (one GPU each on CUDA) in ``dtype``."""
    if device not in DTYPES:
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if dtype not in DTYPES[device]:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES[device])} on {device}, got {dtype!r}")
    if device == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < ranks:
            raise ValueError(
                f"--device cuda runs one rank per GPU (NCCL): {ranks} ranks need {ranks} GPUs, {count} visible"
            )


def _time(fn: Any, repeats: int, dist: Any) -> float:
    """Median seconds of ``repeats`` single calls of ``fn`` (a barrier before each)."""
    import torch.utils.benchmark as tb

    times = []
    for _ in range(repeats):
        dist.barrier()
        times.append(tb.Timer(stmt="fn()", globals={"fn": fn}).timeit(1).median)
    times.sort()
    return times[len(times) // 2]


def _check(cfg: CPConfig, out: Any, xs: list[Any], rank: int) -> tuple[float, float]:
    """``(max_err, bound)`` of this rank's output against the float64 reference of the whole
    sequence (the inputs gathered outside the byte count), or NaNs for ``N > CHECK_MAX_N``."""
    import torch
    import torch.distributed as dist

    import attention_variants as av
    from attention_variants.distributed import shard, unshard

    if cfg.n_total > CHECK_MAX_N:
        return float("nan"), float("nan")
    whole = []
    for x in xs:
        parts = [torch.empty_like(x) for _ in range(cfg.world)]
        dist.all_gather(parts, x.detach().contiguous())
        whole.append(unshard(parts, cfg.layout))
    var = av.get_variant(cfg.variant, **cfg.variant_options())
    with torch.no_grad():
        ref = var.reference(*(x.double() for x in whole), causal=cfg.causal)
        one = var(*whole, causal=cfg.causal, backend="auto")
    ref_mine = shard(ref, rank, cfg.world, cfg.layout)
    err = float((out.detach().double() - ref_mine).abs().max())
    base = float((shard(one, rank, cfg.world, cfg.layout).double() - ref_mine).abs().max())
    return err, 2 * base + CHECK_ATOL[cfg.dtype]


def _row(cfg: CPConfig, rank: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from attention_variants.distributed import analytic_bytes, context_parallel_attention, count_bytes

    dtype = getattr(torch, cfg.dtype)
    n = cfg.n_total // cfg.world
    gen = torch.Generator().manual_seed(rank)
    dev = f"cuda:{rank}" if cfg.device == "cuda" else "cpu"
    q = torch.randn(cfg.batch, cfg.heads, n, cfg.head_dim, generator=gen, dtype=dtype).to(dev)
    k = torch.randn(cfg.batch, cfg.kv_heads, n, cfg.head_dim, generator=gen, dtype=dtype).to(dev)
    v = torch.randn(cfg.batch, cfg.kv_heads, n, cfg.head_dim, generator=gen, dtype=dtype).to(dev)
    xs = [t.requires_grad_() for t in (q, k, v)]
    kw = dict(layout=cfg.layout, causal=cfg.causal, backend="auto", **cfg.variant_options())

    def fwd() -> Any:
        with torch.no_grad():
            return context_parallel_attention(*xs, cfg.variant, **kw)

    def fwd_bwd() -> None:
        context_parallel_attention(*xs, cfg.variant, **kw).sum().backward()

    with count_bytes() as tf:
        out = context_parallel_attention(*xs, cfg.variant, **kw)
    with count_bytes() as tb_:
        out.sum().backward()
    want = analytic_bytes(
        cfg.variant, q.shape, k.shape, v.shape, world=cfg.world, rank=rank, layout=cfg.layout, causal=cfg.causal,
        dtype=dtype, **cfg.variant_options(),
    )  # fmt: skip
    err, bound = _check(cfg, out, xs, rank)
    fails = float(err > bound)  # NaN compares False: an unchecked row passes
    t_f, t_fb = _time(fwd, repeats, dist), _time(fwd_bwd, repeats, dist)
    stats = [t_f, t_fb, tf.total, tb_.total, want["forward"], want["backward"], err, bound, fails]
    mine = torch.tensor(stats, dtype=torch.float64)
    mine = mine.to(dev)  # NCCL gathers CUDA tensors only
    every = [torch.empty_like(mine) for _ in range(cfg.world)]
    dist.all_gather(every, mine)
    s = torch.stack(every).cpu()
    worst = int(torch.nan_to_num(s[:, 6] - s[:, 7], nan=-1.0).argmax())  # the rank furthest over its bound
    wrong = bool(s[:, 8].any())
    why = f"rank {worst}: max_err {float(s[worst, 6]):.3g} > bound {float(s[worst, 7]):.3g}" if wrong else ""
    return cfg.row(
        n_per_rank=n,
        fwd_s=float(s[:, 0].max()),
        fwd_bwd_s=float(s[:, 1].max()),
        fwd_bytes_max=float(s[:, 2].max()),
        bwd_bytes_max=float(s[:, 3].max()),
        fwd_bytes_analytic_max=float(s[:, 4].max()),
        bwd_bytes_analytic_max=float(s[:, 5].max()),
        # measured / analytic over all ranks, fwd + bwd (NaN on one rank: nothing is sent)
        bytes_ratio=float((s[:, 2] + s[:, 3]).sum() / (s[:, 4] + s[:, 5]).sum()) if s[:, 4:6].sum() else float("nan"),
        max_err=float(s[worst, 6]),
        err_bound=float(s[worst, 7]),
        status="wrong" if wrong else "ok",
        error=why,
    )


def _worker(
    rank: int,
    world: int,
    port: int,
    configs: list[CPConfig],
    repeats: int,
    threads: int,
    results: Any,
    plugins: tuple[str, ...] = (),
) -> None:
    import torch
    import torch.distributed as dist

    from attn_bench.core.plugins import load_plugins

    load_plugins(plugins)  # the plug-ins' variants, registered in this rank's process too
    torch.set_num_threads(threads)
    cuda = bool(configs) and configs[0].device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    from attn_bench.core.variants import unsupported

    for cfg in configs:
        # every rank skips the same rows: a variant that does not compute this causal setting
        why = unsupported(cfg.variant, cfg.variant_options(), ["causal" if cfg.causal else "non_causal"])
        try:
            inject_fault(cfg)
            row = cfg.row(status="unsupported", error=why) if why else _row(cfg, rank, repeats)
        except Exception as e:  # every rank fails alike (the same inputs and collectives): record it
            row = cfg.row(status="error", error=f"{type(e).__name__}: {e}")
        if rank == 0:
            results.put(row)
    if rank == 0:
        results.put(None)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect(
    procs: list[Any], results: Any, mine: list[CPConfig], timeout_s: float, on_row: Any, echo: Any
) -> tuple[list[dict], bool]:
    """The rows rank 0 sends for ``mine`` (each passed to ``on_row`` as it comes) and whether the
    pool finished. A rank whose process ends before the last row ends the wait at once (the rows
    not received: ``error``); no row within ``timeout_s`` ends it too (``timeout``)."""
    rows: list[dict] = []
    deadline = time.monotonic() + timeout_s
    gone_since = None
    while True:
        try:
            row = results.get(timeout=POLL_S)
        except queue.Empty:
            now = time.monotonic()
            gone = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
            if gone and gone_since is None:
                gone_since = now  # rows sent before it ended may still be on their way
            if gone and now - gone_since > GRACE_S:
                status, why = "error", "; ".join(f"rank {r}'s process ended ({exit_text(c)})" for r, c in gone)
            elif now > deadline:
                status, why = "timeout", f"no row within {timeout_s:g} s; ranks killed"
            else:
                continue
            echo(f"P={len(procs)}: {why}; {len(mine) - len(rows)} rows recorded as {status}")
            return rows + [c.row(status=status, error=why) for c in mine[len(rows) :]], False
        if row is None:
            return rows, True
        rows.append(row)
        on_row(row)
        deadline = time.monotonic() + timeout_s


def run_cp(
    configs: list[CPConfig],
    out: Path,
    *,
    repeats: int = 5,
    threads: int = 1,
    timeout_s: float = 600.0,
    plugins: tuple[str, ...] = (),
    echo: Any = print,
) -> pd.DataFrame:
    """Run every row (one worker pool per rank count), printing a line per row, and write the
    report into ``out``. RunSetupError (before anything runs) for an ``out`` that cannot hold
    the run or a bad ``repeats``, ``threads`` or ``timeout_s``. ``plugins``: what every rank
    imports first (:func:`attn_bench.core.plugins.load_plugins`)."""
    import torch.multiprocessing as mp

    check_run_options(repeats, threads, timeout_s)
    prepare_run_dir(out, {c.device for c in configs}, resume=False)
    device = configs[0].device if configs else "cpu"
    meta = {**machine_metadata(device), "kind": "cp", "command": shlex.join(["attn-bench", *sys.argv[1:]])}
    meta.update(
        repeats=repeats, threads_per_rank=threads, backend="auto", process_group="nccl" if device == "cuda" else "gloo"
    )
    meta.update(plugins=list(plugins), check_max_n=CHECK_MAX_N)
    atomic_write(out / "metadata.json", json.dumps(meta, indent=2, default=str))
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    shown = [0]

    def show(row: dict[str, Any]) -> None:
        shown[0] += 1
        if row["status"] == "ok":
            what = f"fwd+bwd {row['fwd_bwd_s'] * 1e3:.1f} ms, bytes ratio {row['bytes_ratio']:.3f}"
        else:
            what = row.get("error", row["status"])
        echo(
            f"[{shown[0]}/{len(configs)}] P={row['world']} {row['variant']} {row['layout']} "
            f"causal={row['causal']} {row['scaling']} N={row['n_total']}: {what}"
        )

    for world in sorted({c.world for c in configs}):
        mine = [c for c in configs if c.world == world]
        results = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world, port, mine, repeats, threads, results, plugins), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        got, finished = _collect(procs, results, mine, timeout_s, show, echo)
        rows += got
        for p in procs:
            p.join(timeout=5 if finished else 0)  # the others of a broken pool may wait in a collective
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        atomic_write(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    from attn_bench.cp.report import write_cp_report  # here: the ranks' processes need no matplotlib

    df = pd.DataFrame(rows)
    write_cp_report(df, out, meta)
    return df
