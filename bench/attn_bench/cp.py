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

from .report import md_table
from .sweep import atomic_write, machine_metadata

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
    q = torch.randn(cfg.batch, cfg.heads, n, cfg.head_dim, generator=gen, dtype=dtype)
    k = torch.randn(cfg.batch, cfg.kv_heads, n, cfg.head_dim, generator=gen, dtype=dtype)
    v = torch.randn(cfg.batch, cfg.kv_heads, n, cfg.head_dim, generator=gen, dtype=dtype)
    xs = [t.requires_grad_() for t in (q, k, v)]
    kw = dict(layout=cfg.layout, causal=cfg.causal, backend="torch", **cfg.options())

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
    every = [torch.empty_like(mine) for _ in range(cfg.world)]
    dist.all_gather(every, mine)
    s = torch.stack(every)
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
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    for cfg in configs:
        try:
            row = _row(cfg, rank, repeats)
        except Exception as e:  # every rank fails alike (the same inputs and collectives): record it
            row = {**asdict(cfg), "status": "error", "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        if rank == 0:
            results.put(row)
    results.put(None) if rank == 0 else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cp(
    configs: list[CPConfig], out: Path, *, repeats: int = 5, threads: int = 1, timeout_s: float = 600.0
) -> pd.DataFrame:
    """Run every row (one worker pool per rank count) and write the report into ``out``."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    meta = {**machine_metadata("cpu"), "kind": "cp", "command": shlex.join(["attn-bench", *sys.argv[1:]])}
    meta.update(repeats=repeats, threads_per_rank=threads, backend="torch", process_group="gloo")
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
        except queue.Empty:
            rows += [{**asdict(c), "status": "timeout"} for c in mine[got:]]
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        atomic_write(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    df = pd.DataFrame(rows)
    write_cp_report(df, out)
    return df


def write_cp_report(df: pd.DataFrame, out: Path) -> None:
    """Plots (strong-scaling speed-up, weak-scaling efficiency, bytes measured vs analytic) and README.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"] if "status" in df else df
    lines = ["# Context-parallel attention (gloo, CPU)", "", "Times are the slowest rank's median.", ""]
    if ok.empty:
        atomic_write(out / "README.md", "\n".join([*lines, "No row ran.", ""]))
        return
    keys = ["variant", "layout", "causal"]
    for scaling, ycol, title in (
        ("strong", "speedup", "strong scaling: speed-up"),
        ("weak", "efficiency", "weak scaling: efficiency"),
    ):
        sub = ok[ok["scaling"] == scaling].copy()
        if sub.empty:
            continue
        base = sub[sub["world"] == sub["world"].min()].set_index(
            [*keys, "n_per_rank" if scaling == "weak" else "n_total"]
        )
        idx = [*keys, "n_per_rank" if scaling == "weak" else "n_total"]
        t1 = sub.join(base["fwd_bwd_s"].rename("t1"), on=idx)["t1"]
        sub[ycol] = t1 / sub["fwd_bwd_s"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, g in sub.groupby([*keys, idx[-1]]):
            ax.plot(g["world"], g[ycol], marker="o", label="/".join(str(x) for x in name))
        ax.set_xlabel("ranks")
        ax.set_ylabel(f"{ycol} (fwd+bwd)")
        ax.set_title(title)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{scaling}.png", dpi=120)
        plt.close(fig)
        lines += [f"## {title}", "", f"![{scaling}]({scaling}.png)", ""]
    fig, ax = plt.subplots(figsize=(5, 4))
    measured = ok["fwd_bytes_max"] + ok["bwd_bytes_max"]
    analytic = ok["fwd_bytes_analytic_max"] + ok["bwd_bytes_analytic_max"]
    ax.loglog(analytic.clip(lower=1), measured.clip(lower=1), "o")
    ax.set_xlabel("analytic bytes (max rank, fwd+bwd)")
    ax.set_ylabel("measured bytes")
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close(fig)
    cols = [
        *keys,
        "scaling",
        "world",
        "n_total",
        "fwd_s",
        "fwd_bwd_s",
        "fwd_bytes_max",
        "fwd_bytes_analytic_max",
        "bytes_ratio",
    ]
    lines += ["## Bytes sent, measured against analytic", "", "![bytes](bytes.png)", "", md_table(ok[cols]), ""]
    atomic_write(out / "README.md", "\n".join(lines))
