"""Report of an ``attn-bench long`` run: ``README.md`` and PNG plots in the run directory.

Accuracy is the mean and standard deviation over seeds of the final held-out accuracy; times and
memory are means over seeds. ``prefix bound``: the best accuracy any classifier of the first
``L`` tokens can reach on the same test documents (:func:`attn_bench.task.tasks.prefix_bayes_accuracy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from attn_bench.core import variants
from attn_bench.core.results import atomic_write
from attn_bench.long.models import STRATEGIES, WHOLE
from attn_bench.long.run import LongResult
from attn_bench.task.report import _f, _pareto, report_header
from attn_bench.task.run import RESULTS, read_task_results

# The segment strategies' colours (greys and dark hues); a whole-input line takes its variant's.
STRATEGY_COLORS = {"truncate": "tab:gray", "segment_pool": "tab:olive", "hierarchical": "tab:brown"}


def load_long_results(directory: Path) -> pd.DataFrame:
    """The run's ok rows as a frame, with a ``line`` column: the strategy, or ``whole <variant>``
    and its options."""
    rows = [r.to_row() for r in read_task_results(directory / RESULTS, LongResult) if r.status == "ok"]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["line"] = [
        f"{WHOLE} {v}" + "".join(f" {k}={x}" for k, x in json.loads(o).items()) if s == WHOLE else s
        for s, v, o in zip(df["strategy"], df["variant"], df["options"], strict=True)
    ]
    return df


def line_color(strategy: str, variant: str) -> str | None:
    return variants.color(variant) if strategy == WHOLE else STRATEGY_COLORS.get(strategy)


def summarise_long(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (line, N): accuracy mean/sd/seeds, bounds, times, memory; in strategy order,
    whole-input lines in the registry's order."""
    g = df.groupby(["strategy", "variant", "line", "seq_len"])
    out = g.agg(
        L=("segment_len", "first"),
        acc=("final_acc", "mean"),
        acc_std=("final_acc", "std"),
        seeds=("seed", "nunique"),
        chance=("chance_acc", "mean"),
        prefix_bound=("prefix_bound", "mean"),
        train_s=("train_s", "mean"),
        infer_ms=("infer_ms_per_doc", "mean"),
        peak_mib=("peak_mem_bytes", lambda x: x.mean() / 2**20),
    ).reset_index()
    out["order"] = [
        (STRATEGIES.index(s) if s in STRATEGIES else len(STRATEGIES), variants.order(v))
        for s, v in zip(out["strategy"], out["variant"], strict=True)
    ]
    return out.sort_values(["seq_len", "order", "line"]).drop(columns="order").reset_index(drop=True)


def plot_accuracy_vs_n(s: pd.DataFrame, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for line, d in s.groupby("line", sort=False):
        d = d.sort_values("seq_len")
        r = d.iloc[0]
        ax.errorbar(d["seq_len"], d["acc"], yerr=d["acc_std"], marker="o", capsize=3, label=line,
                    color=line_color(r.strategy, r.variant))  # fmt: skip
    b = s.groupby("seq_len")["prefix_bound"].mean()
    ax.plot(b.index, b.to_numpy(), "k--", lw=0.9, label="best possible from the first L tokens")
    ax.axhline(s["chance"].mean(), color="grey", ls=":", lw=0.8, label="majority class")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="document length N (tokens)", ylabel="held-out accuracy (mean ± sd)")
    ax.set_title(f"Accuracy against N (model length L={int(s['L'].iloc[0])})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_n.png", dpi=110)
    plt.close(fig)
    return "accuracy_vs_n.png"


def plot_cost(s: pd.DataFrame, out: Path) -> str:
    """Accuracy against training time and inference time at the largest N, Pareto fronts dashed."""
    n = int(s["seq_len"].max())
    t = s[s["seq_len"] == n]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col, xlabel in (
        (axes[0], "train_s", "training time (s, mean over seeds)"),
        (axes[1], "infer_ms", "inference time per document (ms)"),
    ):
        for _, r in t.iterrows():
            color = line_color(r.strategy, r.variant)
            ax.errorbar(r[col], r.acc, yerr=r.acc_std, fmt="o", capsize=3, color=color, label=r.line)
        front = _pareto(list(zip(t[col], t["acc"], strict=True)))
        ax.plot(*zip(*front, strict=True), "k--", lw=0.8, label="Pareto front")
        ax.axhline(t["prefix_bound"].mean(), color="grey", ls=":", lw=0.8, label="first-L bound")
        ax.set(xlabel=xlabel, ylabel="held-out accuracy (mean ± sd)", title=f"N={n}: accuracy against cost")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    return "pareto.png"


def write_long_report(directory: Path) -> Path:
    """Write ``README.md`` and the plots into ``directory``; returns the page's path."""
    df = load_long_results(directory)
    meta, statuses, lines = report_header(directory, "Long inputs", LongResult)
    lines += [
        meta.get("description", ""),
        "",
        "Task: `long_majority`, documents of N tokens with an odd number of `<mark> yes|no` evidence pairs at "
        "uniformly random positions over the whole document, `yes`/`no` distractors (not after a mark) and "
        "filler words elsewhere; the label is the majority marked answer. Strategies: `truncate` (the encoder "
        "over the first L tokens), `segment_pool` (the same encoder over each L-chunk, chunk vectors "
        "mean-pooled), `hierarchical` (chunk vectors through one full-attention block over segments), and "
        "`whole` with each variant (one encoder with that attention over the whole input). "
        "Every model is trained to the same step budget. Peak memory: `torch.cuda.max_memory_allocated` on "
        "CUDA; on CPU, parameters, gradients and AdamW state plus the bytes one training step saves for "
        "backward. Inference: no-grad forward over the test set, per document. `first-L bound`: the best "
        "accuracy any classifier of the first L tokens can reach on these documents. "
        "Raw rows: [results.csv](results.csv), [metadata.json](metadata.json).",
        "",
        "Runs by status: " + ", ".join(f"{n} {k}" for k, n in statuses.items()) + ".",
        "",
    ]
    if not df.empty:
        s = summarise_long(df)
        lines += [
            "## Results",
            "",
            "| N | N/L | line | accuracy | seeds | first-L bound | train s | inference ms/doc | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in s.iterrows():
            lines.append(
                f"| {r.seq_len} | {r.seq_len / r.L:g} | {r.line} | {r.acc:.3f} ± {_f(r.acc_std, 2)} | {r.seeds} "
                f"| {r.prefix_bound:.3f} | {_f(r.train_s)} | {_f(r.infer_ms)} | {_f(r.peak_mib)} |"
            )
        lines += ["", "## Accuracy against N", "", f"![accuracy vs N]({plot_accuracy_vs_n(s, directory)})", ""]
        lines += ["## Accuracy against cost at the largest N", "", f"![Pareto]({plot_cost(s, directory)})", ""]
    page = directory / "README.md"
    atomic_write(page, "\n".join(lines) + "\n")
    return page
