"""The ``attn-bench cp`` report: scaling plots, bytes against the analytic count, and the targets.

Targets, each a ratio within one run:

- ``bytes``: every row's measured bytes (the collectives' own count) within 5% of the analytic
  count (:func:`attention_variants.distributed.analytic_bytes`).
- ``flat``: at fixed ``N / P`` (weak scaling) the bytes the busiest rank sends with the halo
  exchange and the prefix scan grow from the second-largest to the largest ``P`` (both >= 3, so
  both have interior ranks) by no more than an all-reduce's textbook factor ``2 (P - 1) / P``
  (a halo exchange and the prefix scan do not grow at all); ring attention and the all-gather
  fallback, shown for contrast, grow as ``P - 1``.
- ``ring``: on GPUs, ring attention's weak-scaling efficiency at 4 ranks for ``N / P >= 16k``
  at least 0.8. On the CPU, ranks share cores, so its value is shown without a verdict.

Lines are told apart by variant; the ``strategy`` column says which algorithm ran (``ring``,
``halo``, ``scan``, or ``all-gather``: the exact fallback of a variant without a strategy of
its own, which gathers K and V on every rank and computes the whole sequence there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from attn_bench.core.results import atomic_write
from attn_bench.core.variants import color
from attn_bench.sweep.report import md_table

BYTES_TOLERANCE = 0.05
RING_EFFICIENCY = 0.8
RING_MIN_N_PER_RANK = 16384
RING_WORLD = 4
FLAT_MIN_WORLD = 3


def _allreduce_factor(p: int) -> float:
    return 2.0 * (p - 1) / p


def targets(ok: pd.DataFrame, device: str) -> pd.DataFrame:
    """One row per checked line: ``target``, ``line``, ``value``, ``limit``, ``verdict``."""
    out: list[dict] = []
    sent = ok[(ok["fwd_bytes_analytic_max"] + ok["bwd_bytes_analytic_max"]) > 0]
    if not sent.empty:
        ratio = sent["bytes_ratio"].astype(float)
        worst = float((ratio - 1).abs().max())
        out.append(
            {
                "target": "bytes",
                "line": f"{len(sent)} rows that send",
                "value": f"worst measured/analytic {1 + worst if worst else 1:.4f}",
                "limit": f"within {BYTES_TOLERANCE:.0%}",
                "verdict": "pass" if worst <= BYTES_TOLERANCE else "FAIL",
            }
        )
    # Interior ranks (two neighbours) exist from P = 3 on; below that every rank is an end rank,
    # which sends less, so the two largest P >= 3 are compared.
    weak = ok[(ok["scaling"] == "weak") & (ok["world"] >= FLAT_MIN_WORLD)].copy()
    weak["bytes"] = weak["fwd_bytes_max"] + weak["bwd_bytes_max"]
    for key, g in weak.groupby(["variant", "layout", "causal", "n_per_rank"]):
        strategy = g["strategy"].iloc[0]
        if g["world"].nunique() < 2:
            continue
        g = g.sort_values("world")
        lo, hi = g.iloc[-2], g.iloc[-1]
        p_lo, p_hi = int(lo["world"]), int(hi["world"])
        growth = float(hi["bytes"] / lo["bytes"]) if lo["bytes"] else float("nan")
        limit = _allreduce_factor(p_hi) / _allreduce_factor(p_lo)
        verdict = "pass" if growth <= limit + 1e-9 else "FAIL"
        target = "flat"
        if strategy in ("ring", "all-gather"):
            target, verdict = "flat (contrast)", "-"
        elif strategy == "halo" and key[3] < int(json.loads(lo.get("options", "{}")).get("window", 0)):
            verdict = "- (N/P < window: the halo spans several ranks)"
        out.append(
            {
                "target": target,
                "line": f"{key[0]} ({strategy}) {key[1]} causal={key[2]} N/P={key[3]}",
                "value": f"bytes P={p_hi} / P={p_lo}: {growth:.2f}",
                "limit": f"<= {limit:.3f}",
                "verdict": verdict,
            }
        )
    ring = ok[(ok["strategy"] == "ring") & (ok["scaling"] == "weak")]
    for key, g in ring.groupby(["variant", "layout", "causal", "n_per_rank"]):
        base, at = g[g["world"] == 1], g[g["world"] == RING_WORLD]
        if base.empty or at.empty:
            continue
        eff = float(base["fwd_bwd_s"].iloc[0] / at["fwd_bwd_s"].iloc[0])
        big = key[3] >= RING_MIN_N_PER_RANK
        verdict = "pass" if eff >= RING_EFFICIENCY else "FAIL"
        if device != "cuda" or not big:
            verdict = "- (CPU ranks share cores)" if device != "cuda" else f"- (N/P < {RING_MIN_N_PER_RANK})"
        out.append(
            {
                "target": "ring",
                "line": f"{key[0]} {key[1]} causal={key[2]} N/P={key[3]}",
                "value": f"weak efficiency at P={RING_WORLD}: {eff:.2f}",
                "limit": f">= {RING_EFFICIENCY}",
                "verdict": verdict,
            }
        )
    return pd.DataFrame(out, columns=["target", "line", "value", "limit", "verdict"])


def write_cp_report(df: pd.DataFrame, out: Path, meta: dict | None = None) -> None:
    """Plots (strong-scaling speed-up, weak-scaling efficiency, bytes measured vs analytic), the
    targets and the rows, into ``out/README.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = meta or {}
    device = meta.get("device", "cpu")
    ok = df[df["status"] == "ok"] if "status" in df else df
    group = meta.get("process_group", "gloo")
    lines = [f"# Context-parallel attention ({group}, {device.upper() if device == 'cpu' else device})", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    lines += [
        "Times are the slowest rank's median. `strategy`: `ring`, `halo` and `scan` are the variants' own; "
        "`all-gather` is the exact fallback of a variant without one (every rank gathers K and V and computes "
        f"the whole sequence: bytes grow as P - 1, compute does not fall with P). `max_err`: each rank's output "
        f"against the float64 reference of the whole sequence (rows with N <= {meta.get('check_max_n')}).",
        "",
    ]
    cores, threads = meta.get("cpu_count"), meta.get("threads_per_rank", 1)
    if device == "cpu" and cores and not ok.empty and int(ok["world"].max()) * threads > cores:
        lines += [
            f"The largest rank count ({int(ok['world'].max())} ranks x {threads} thread(s)) exceeds the "
            f"{cores} cores: those times measure ranks waiting for a core, not the algorithm; the bytes do not "
            "depend on it.",
            "",
        ]
    if ok.empty:
        atomic_write(out / "README.md", "\n".join([*lines, "No row ran.", ""]))
        return
    keys = ["variant", "layout", "causal"]
    lines += ["## Targets", "", md_table(targets(ok, device)), ""]
    for scaling, ycol, title in (
        ("strong", "speedup", "strong scaling: speed-up"),
        ("weak", "efficiency", "weak scaling: efficiency"),
    ):
        sub = ok[ok["scaling"] == scaling].copy()
        if sub.empty:
            continue
        idx = [*keys, "n_per_rank" if scaling == "weak" else "n_total"]
        base = sub[sub["world"] == sub["world"].min()].set_index(idx)
        t1 = sub.join(base["fwd_bwd_s"].rename("t1"), on=idx)["t1"]
        sub[ycol] = t1 / sub["fwd_bwd_s"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, g in sub.groupby(idx):
            ax.plot(g["world"], g[ycol], marker="o", label="/".join(str(x) for x in name))
        ax.set_xlabel("ranks")
        ax.set_ylabel(f"{ycol} (fwd+bwd)")
        ax.set_title(title)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{scaling}.png", dpi=120)
        plt.close(fig)
        lines += [f"## {title}", "", f"![{scaling}]({scaling}.png)", ""]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    measured = ok["fwd_bytes_max"] + ok["bwd_bytes_max"]
    analytic = ok["fwd_bytes_analytic_max"] + ok["bwd_bytes_analytic_max"]
    sends = analytic > 0
    axes[0].loglog(analytic[sends], measured[sends], "o", alpha=0.6)
    axes[0].set_xlabel("analytic bytes (busiest rank, fwd+bwd)")
    axes[0].set_ylabel("measured bytes")
    axes[0].set_title("every row that sends")
    weak = ok[(ok["scaling"] == "weak") & (ok["world"] > 1)]
    if not weak.empty:
        weak = weak[weak["n_per_rank"] == weak["n_per_rank"].max()]
        for (variant, layout, causal), g in weak.groupby(keys):
            g = g.sort_values("world")
            axes[1].semilogy(
                g["world"],
                g["fwd_bytes_max"] + g["bwd_bytes_max"],
                marker="o" if causal else "s",
                linestyle="-" if layout == "contiguous" else "--",
                color=color(variant),
                label=f"{variant} {layout}{' causal' if causal else ''}",
            )
        axes[1].set_title(f"N / P = {int(weak['n_per_rank'].iloc[0])} fixed")
        axes[1].set_xlabel("ranks")
        axes[1].set_ylabel("bytes sent by the busiest rank (fwd+bwd)")
        axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close(fig)
    cols = [
        *keys,
        "strategy",
        "scaling",
        "world",
        "n_total",
        "fwd_s",
        "fwd_bwd_s",
        "fwd_bytes_max",
        "fwd_bytes_analytic_max",
        "bytes_ratio",
        "max_err",
    ]
    lines += ["## Bytes sent, measured against analytic, and against P", "", "![bytes](bytes.png)", ""]
    lines += ["## Rows", "", md_table(ok[cols]), ""]
    bad = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    if not bad.empty:
        lines += [
            "## Rows that did not run",
            "",
            md_table(
                bad[[c for c in [*keys, "strategy", "scaling", "world", "n_total", "status", "error"] if c in bad]]
            ),
            "",
        ]
    atomic_write(out / "README.md", "\n".join(lines))
