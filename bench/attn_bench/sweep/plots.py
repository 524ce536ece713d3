"""Log-log plots of a sweep (matplotlib, Agg backend; PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import attention_variants as av
from attn_bench.core.variants import color
from attn_bench.sweep.analysis import (
    SETTING,
    line_cols,
    line_label,
    noisy_mask,
    ok_rows,
    setting_label,
    speedups,
    without_copies,
)

# Colour says the variant (the registry's order and palette, as in every job's report), line style
# and marker the backend.

STYLE = {"torch": "-", "triton": "-", "auto": "-", "sdpa": "--", "flex": "-.", "reference": ":"}
MARKER = {"torch": "o", "triton": "s", "sdpa": "^", "flex": "D", "reference": "x", "auto": "v"}


# Peers and plug-ins' backends: dash-dot-dot lines, one marker each.
OTHER_STYLE = (0, (4, 1, 1, 1, 1, 1))
OTHER_MARKERS = ["P", "*", "h", "<", ">", "p"]


def _other_marker(backend: str) -> str:
    from attn_bench.baselines.registry import baseline_names

    names = [*baseline_names(), *av.list_backends()]
    i = names.index(backend) if backend in names else len(backend)
    return OTHER_MARKERS[i % len(OTHER_MARKERS)]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def _lines(
    ax, df: pd.DataFrame, ycol: str, lines: list[str], scale: float = 1.0, bands: bool = False, rings: bool = True
) -> bool:
    """One polyline per line (``lines``: the columns that make one, see
    :func:`attn_bench.sweep.analysis.line_cols`) through its points in N order. ``bands``: the
    p10..p90 spread of each point as a shaded band; ``rings``: noisy points ringed."""
    drew = False
    for _, g in df.groupby(lines, dropna=False, sort=False):
        g = g.sort_values("seq_len")
        y = g[ycol].astype(float) * scale
        if not (y > 0).any():  # nothing to show on a log scale
            continue
        first = g.iloc[0]
        (line,) = ax.plot(
            g["seq_len"],
            y,
            color=color(first["variant"]),
            linestyle=STYLE.get(first["backend"], OTHER_STYLE),
            marker=MARKER.get(first["backend"]) or _other_marker(first["backend"]),
            label=line_label(first),
        )
        if bands and {"time_ms_p10", "time_ms_p90"} <= set(g.columns):
            lo, hi = g["time_ms_p10"].astype(float) * scale, g["time_ms_p90"].astype(float) * scale
            ax.fill_between(g["seq_len"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        noisy = noisy_mask(g) & rings
        if noisy.any():
            ax.plot(g["seq_len"][noisy], y[noisy], linestyle="none", **NOISY_RING)
        drew = True
    return drew


# How a noisy point is marked on the plots (a ring around its marker).
NOISY_RING = dict(marker="o", markersize=11, markerfacecolor="none", markeredgecolor="black", label="_noisy")


def _guides(ax, df: pd.DataFrame, ycol: str, scale: float = 1.0) -> None:
    """Faint N^1 and N^2 slopes through the lowest point, for reading exponents by eye."""
    y = df[ycol].astype(float) * scale
    y = y[y > 0]
    if y.empty:
        return
    n0, n1 = df["seq_len"].min(), df["seq_len"].max()
    if n0 <= 0:
        return
    y0 = y.min()
    xs = np.array([n0, n1], dtype=float)
    for p in (1, 2):
        ax.plot(xs, y0 * (xs / n0) ** p, color="0.8", linewidth=0.8, zorder=0)
        ax.annotate(f"N^{p}", (xs[1], y0 * (xs[1] / n0) ** p), color="0.6", fontsize=7)


def figure(
    df: pd.DataFrame,
    ycol: str,
    ylabel: str,
    title: str,
    lines: list[str],
    scale: float = 1.0,
    guides: bool = True,
    bands: bool = False,
    rings: bool = True,
):
    """A matplotlib figure of ``ycol`` against N, fwd and fwd_bwd side by side, one polyline per line
    and one legend for the figure below the axes (each line once); None when nothing can be drawn.
    ``bands``: p10..p90 bands (times); ``rings``: noisy points ringed (what is timed)."""
    from matplotlib.lines import Line2D

    passes = [p for p in ("fwd", "fwd_bwd") if (df["pass"] == p).any()]
    if not passes:
        return None
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 4.8), squeeze=False, layout="constrained")
    drew = False
    for ax, p in zip(axes[0], passes, strict=True):
        sub = df[df["pass"] == p]
        drawn = _lines(ax, sub, ycol, lines, scale, bands, rings)
        if drawn:
            drew = True
            if ycol == "speedup":
                ax.axhline(1.0, color="0.5", linewidth=0.8)
            if guides:
                _guides(ax, sub, ycol, scale)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lengths = sorted(sub["seq_len"].unique())
        ax.set_xticks(lengths, [str(int(n)) for n in lengths], rotation=45, fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{p}")
        ax.grid(True, which="both", alpha=0.3)
    if not drew:
        plt.close(fig)
        return None
    # One legend entry per line, although a line is drawn in each pass's axes.
    entries: dict[str, object] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if rings and noisy_mask(df).any():
        entries["noisy: left out of fits"] = Line2D([], [], linestyle="none", **{**NOISY_RING, "label": None})
    if bands:
        entries["band: p10..p90 of the calls"] = matplotlib.patches.Patch(color="0.5", alpha=0.3)
    ncols = 3 if len(passes) > 1 else 2
    rows = -(-len(entries) // ncols)
    fig.set_size_inches(6.5 * len(passes), 4.8 + 0.2 * rows)
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=ncols, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def _figure(df: pd.DataFrame, ycol: str, ylabel: str, title: str, path: Path, lines: list[str], **kw) -> Path | None:
    fig = figure(df, ycol, ylabel, title, lines, **kw)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plots(df: pd.DataFrame, out: Path, baseline: str = "sdpa") -> dict[str, list[Path]]:
    """Time, memory, speed-up and FLOP/s vs N, one figure per setting; returns the files by kind."""
    ok = without_copies(ok_rows(df))  # a copied row (Performer's SDPA = full's SDPA) is drawn once
    ok = ok[ok["seq_len"] > 0]  # the N axis is logarithmic
    files: dict[str, list[Path]] = {"time": [], "memory": [], "speedup": [], "flops": []}
    sp = speedups(df, baseline)
    sp = sp[sp["seq_len"] > 0] if len(sp) else sp
    lines = line_cols(df)  # of the results' own columns (the speed-up frame has more)
    for _, s in ok.groupby(SETTING, dropna=False, sort=False):
        first = s.iloc[0]
        label = setting_label(first)
        slug = _slug(label)
        for kind, col, ylabel, scale in (
            ("time", "time_ms", "median time (ms)", 1.0),
            ("memory", "peak_mem_bytes", "peak memory beyond inputs (MiB)", 1 / 2**20),
            ("flops", "tflops", "achieved GFLOP/s (analytic, mask-aware)", 1e3),
        ):
            path = out / f"{kind}_vs_n_{slug}.png"
            title = f"{kind} vs N: {label}"
            timed = dict(bands=kind == "time", rings=kind != "memory")  # memory is not timed: not noisy
            f = _figure(s, col, ylabel, title, path, lines, scale=scale, guides=kind != "flops", **timed)
            if f:
                files[kind].append(f)
        ssp = sp[(sp[SETTING] == first[SETTING]).all(axis=1)] if len(sp) else sp
        if len(ssp):
            f = _figure(
                ssp,
                "speedup",
                f"speed-up over {baseline} (x)",
                f"speed-up vs {baseline}: {label}",
                out / f"speedup_vs_{baseline}_{slug}.png",
                lines,
                guides=False,
            )
            if f:
                files["speedup"].append(f)
    return files


def accuracy_plots(acc: pd.DataFrame, out: Path) -> list[Path]:
    """Performer error vs number of features (orthogonal vs i.i.d.) and vs sharpness."""
    files = []
    for study, xcol, xlabel in (
        ("features", "num_features", "number of random features m"),
        ("sharpness", "sharpness", "sharpness s (standard deviation of the attention logits)"),
    ):
        sub = acc[acc["study"] == study]
        if sub.empty:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        for (causal, ortho), g in sub.groupby(["causal", "ortho"], sort=False):
            stats = g.groupby(xcol)["rel_err"].agg(["mean", "min", "max"]).reset_index()
            label = f"{'orthogonal' if str(ortho) == 'True' else 'i.i.d.'}{' causal' if str(causal) == 'True' else ''}"
            ax.plot(stats[xcol], stats["mean"], marker="o", label=label)
            ax.fill_between(stats[xcol], stats["min"], stats["max"], alpha=0.15)
        if study == "features":
            xs = np.array([sub[xcol].min(), sub[xcol].max()], dtype=float)
            y0 = sub[sub[xcol] == xs[0]]["rel_err"].mean()
            ax.plot(xs, y0 * (xs / xs[0]) ** -0.5, color="0.7", linewidth=0.8, label="m^-1/2")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("output error rms(out - exact) / rms(v)")
        first = sub.iloc[0]
        extra = f", m={int(first['num_features'])}" if study == "sharpness" else f", s={first['sharpness']:g}"
        ax.set_title(f"Performer vs exact softmax: N={int(first['seq_len'])}, D={int(first['head_dim'])}{extra}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"performer_error_vs_{study}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
