"""``attn-bench cp``: context-parallel attention on gloo ranks (CPU), per variant and layout.

For each rank count ``P`` one pool of ``P`` worker processes runs every row: a forward and a
forward+backward step of :func:`attention_variants.distributed.context_parallel_attention`,
timed with ``torch.utils.benchmark`` (a fixed number of single-call blocks, a barrier before each,
so every rank issues the same collectives; a row's time is the slowest rank's median), and the
bytes each rank's collectives send (:func:`count_bytes`) against the analytic count
(:func:`analytic_bytes`). Strong scaling fixes the total ``N``; weak scaling fixes ``N / P``.
Writes ``results.csv`` (after every rank count, atomically), ``metadata.json``, plots and a
``README.md`` into the output directory.
"""

from __future__ import annotations

import json
import queue
import shlex
import socket
import sys
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from attn_bench.core.machine import machine_metadata
from attn_bench.core.results import atomic_write
from attn_bench.cp.report import write_cp_report

DEFAULT_OUT = Path("reports/cp-quick")
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {"full": {}, "sliding_window": {"window": 128}, "performer": {}}


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
    window: int
    num_features: int
    device: str = "cpu"

    def options(self) -> dict[str, Any]:
        if self.variant == "sliding_window":
            return {"window": self.window}
        if self.variant == "performer":
            return {"num_features": self.num_features}
        return {}


def expand(
    ranks: list[int], ns: list[int], variants: list[str], layouts: list[str], causal: list[bool], **shape: Any
) -> list[CPConfig]:
    """Strong rows (total N in ``ns``) and weak rows (N = n * P) for every rank count."""
    from attention_variants.distributed.layout import check_layout

    for lay in layouts:
        check_layout(lay)
    if any(p < 1 for p in ranks):
        raise ValueError(f"--ranks must be positive, got {ranks}")
    check_device(shape.get("device", "cpu"), shape.get("dtype", "float32"), max(ranks, default=1))
    out = []
    for p in ranks:
        for n in ns:
            for scaling, total in (("strong", n), ("weak", n * p)):
                if total % (2 * p):
                    raise ValueError(f"N={total} is not a multiple of 2 * {p} ranks (needed by the zigzag layout)")
                for v in variants:
                    for lay in layouts:
                        for c in causal:
                            out.append(CPConfig(v, lay, c, p, total, scaling, **shape))
    return out


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
    kw = dict(layout=cfg.layout, causal=cfg.causal, backend="auto", **cfg.options())

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
        dtype=dtype, **cfg.options(),
    )  # fmt: skip
    t_f, t_fb = _time(fwd, repeats, dist), _time(fwd_bwd, repeats, dist)
    mine = torch.tensor([t_f, t_fb, tf.total, tb_.total, want["forward"], want["backward"]], dtype=torch.float64)
    mine = mine.to(dev)  # NCCL gathers CUDA tensors only
    every = [torch.empty_like(mine) for _ in range(cfg.world)]
    dist.all_gather(every, mine)
    s = torch.stack(every).cpu()
    return {
        **asdict(cfg),
        "n_per_rank": n,
        "fwd_s": float(s[:, 0].max()),
        "fwd_bwd_s": float(s[:, 1].max()),
        "fwd_bytes_max": float(s[:, 2].max()),
        "bwd_bytes_max": float(s[:, 3].max()),
        "fwd_bytes_analytic_max": float(s[:, 4].max()),
        "bwd_bytes_analytic_max": float(s[:, 5].max()),
        # measured / analytic over all ranks, fwd + bwd (NaN on one rank: nothing is sent)
        "bytes_ratio": float((s[:, 2] + s[:, 3]).sum() / (s[:, 4] + s[:, 5]).sum()) if s[:, 4:].sum() else float("nan"),
        "status": "ok",
    }


def _worker(
    rank: int, world: int, port: int, configs: list[CPConfig], repeats: int, threads: int, results: Any
) -> None:
    import torch
    import torch.distributed as dist

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
    for cfg in configs:
        try:
            row = _row(cfg, rank, repeats)
        except Exception as e:  # every rank fails alike (the same inputs and collectives): record it
            row = {**asdict(cfg), "status": "error", "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
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


def run_cp(
    configs: list[CPConfig],
    out: Path,
    *,
    repeats: int = 5,
    threads: int = 1,
    timeout_s: float = 600.0,
    echo: Any = print,
) -> pd.DataFrame:
    """Run every row (one worker pool per rank count), printing a line per row, and write the
    report into ``out``."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    device = configs[0].device if configs else "cpu"
    meta = {**machine_metadata(device), "kind": "cp", "command": shlex.join(["attn-bench", *sys.argv[1:]])}
    meta.update(
        repeats=repeats, threads_per_rank=threads, backend="auto", process_group="nccl" if device == "cuda" else "gloo"
    )
    atomic_write(out / "metadata.json", json.dumps(meta, indent=2, default=str))
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    for world in sorted({c.world for c in configs}):
        mine = [c for c in configs if c.world == world]
        results = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world, port, mine, repeats, threads, results), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        got = 0
        try:
            while True:
                row = results.get(timeout=timeout_s)
                if row is None:
                    break
                rows.append(row)
                got += 1
                if row["status"] == "ok":
                    what = f"fwd+bwd {row['fwd_bwd_s'] * 1e3:.1f} ms, bytes ratio {row['bytes_ratio']:.3f}"
                else:
                    what = row.get("error", row["status"])
                echo(
                    f"[{len(rows)}/{len(configs)}] P={world} {row['variant']} {row['layout']} causal={row['causal']} "
                    f"{row['scaling']} N={row['n_total']}: {what}"
                )
        except queue.Empty:
            rows += [{**asdict(c), "status": "timeout"} for c in mine[got:]]
            echo(f"P={world}: no row within {timeout_s:.0f} s; {len(mine) - got} rows recorded as timeout")
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        atomic_write(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    df = pd.DataFrame(rows)
    write_cp_report(df, out, meta)
    return df
