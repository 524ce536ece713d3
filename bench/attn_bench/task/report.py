"""Report of an ``attn-bench task`` run: a Markdown page and PNG plots in the run directory.

Every figure is computed from ``results.csv``: accuracy is the mean and standard deviation of
the final held-out accuracy over seeds; times are means over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from attn_bench.core.results import METADATA, atomic_write
from attn_bench.core.variants import color, exact_variant, order
from attn_bench.task.run import RESULTS, TaskResult, read_task_results


def load_task_results(directory: Path) -> pd.DataFrame:
    """The run's ok rows as a frame, with a ``line`` column (variant and options)."""
    rows = [r.to_row() for r in read_task_results(directory / RESULTS) if r.status == "ok"]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["line"] = [
        v + "".join(f" {k}={x}" for k, x in json.loads(o).items())
        for v, o in zip(df["variant"], df["options"], strict=True)
    ]
    return df


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per task, N and line: accuracy mean/std/seeds, chance, times, tokens/s, memory, approx_err."""
    g = df.groupby(["task", "seq_len", "variant", "line"], sort=False)
    out = g.agg(
        acc=("final_acc", "mean"),
        acc_std=("final_acc", "std"),
        seeds=("seed", "nunique"),
        chance=("chance_acc", "mean"),
        train_s=("train_s", "mean"),
        tokens_per_s=("tokens_per_s", "mean"),
        peak_mib=("peak_mem_bytes", lambda x: x.mean() / 2**20),
        approx_err=("approx_err", "mean"),
        target=("target_acc", "first"),
    ).reset_index()
    reached = g["time_to_target_s"].agg(lambda x: x.notna().sum()).reset_index(drop=True)
    out["reached"] = reached.to_numpy()
    out["time_to_target_s"] = g["time_to_target_s"].mean().reset_index(drop=True).to_numpy()
    # (task, N) in numeric order of N, the lines of each in the registry's order
    first = {t: i for i, t in enumerate(dict.fromkeys(out["task"]))}
    out["key"] = [
        (first[t], int(n), order(v)) for t, n, v in zip(out["task"], out["seq_len"], out["variant"], strict=True)
    ]
    return out.sort_values("key", kind="stable").drop(columns="key").reset_index(drop=True)


def _main_n(s: pd.DataFrame, task: str) -> int:
    """The length of a task with the most lines (its headline comparison)."""
    t = s[s["task"] == task]
    return int(t.groupby("seq_len")["line"].nunique().idxmax())


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another that is both faster and at least as accurate."""
    front, best = [], -np.inf
    for t, a in sorted(points):
        if a > best:
            front.append((t, a))
            best = a
    return front


def plot_pareto(s: pd.DataFrame, out: Path) -> list[str]:
    files = []
    for task in s["task"].unique():
        t = s[(s["task"] == task) & (s["seq_len"] == _main_n(s, task))]
        fig, ax = plt.subplots(figsize=(6, 4))
        for _, r in t.iterrows():
            ax.errorbar(r.train_s, r.acc, yerr=r.acc_std, fmt="o", color=color(r.variant), capsize=3, label=r.line)
        front = _pareto(list(zip(t["train_s"], t["acc"], strict=True)))
        ax.plot(*zip(*front, strict=True), "k--", lw=0.8, label="Pareto front")
        ax.axhline(t["chance"].mean(), color="grey", lw=0.8, ls=":", label="majority class")
        ax.set(xlabel="training time (s, mean over seeds)", ylabel="held-out accuracy (mean ± sd)")
        ax.set_title(f"{task}, N={int(t['seq_len'].iloc[0])}: accuracy vs training time")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"pareto_{task}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def plot_accuracy_vs_n(s: pd.DataFrame, out: Path) -> str:
    tasks = list(s["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        t = s[s["task"] == task]
        for line, d in t.groupby("line", sort=False):
            d = d.sort_values("seq_len")
            ax.errorbar(d["seq_len"], d["acc"], yerr=d["acc_std"], marker="o", capsize=3, label=line)
            ax.lines[-1].set_color(color(d["variant"].iloc[0]) or ax.lines[-1].get_color())
        ax.set_xscale("log", base=2)
        ax.set(title=task, xlabel="N", ylabel="accuracy (mean ± sd)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_n.png", dpi=110)
    plt.close(fig)
    return "accuracy_vs_n.png"


def option_studies(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and approx_err against one sweep option of one variant, where several values of it
    ran at one task and N (the other options fixed): columns task, seq_len, variant, option, value,
    acc, acc_std, approx_err, approx_err_std."""
    parts = []
    for variant, d in df.groupby("variant", sort=False):
        opts = pd.DataFrame([json.loads(o) for o in d["options"]], index=d.index)
        for name in opts.columns:
            others = [c for c in opts.columns if c != name]
            d2 = d.assign(value=opts[name], rest=opts[others].astype(str).agg(",".join, axis=1) if others else "")
            g = d2.groupby(["task", "seq_len", "rest", "value"])
            s = g.agg(acc=("final_acc", "mean"), acc_std=("final_acc", "std"), approx_err=("approx_err", "mean"))
            s = s.reset_index().assign(approx_err_std=g["approx_err"].std().to_numpy(), variant=variant, option=name)
            s = s[s.groupby(["task", "seq_len", "rest"])["value"].transform("nunique") > 1]
            parts.append(s.drop(columns="rest"))
    cols = ["task", "seq_len", "variant", "option", "value", "acc", "acc_std", "approx_err", "approx_err_std"]
    return pd.concat(parts)[cols] if parts else pd.DataFrame(columns=cols)


def plot_option_study(st: pd.DataFrame, exact_acc: dict[tuple[str, int], float], out: Path) -> str | None:
    """One panel per (variant, option) study: accuracy (left axis) and approx_err (right) against the value."""
    studies = list(st.groupby(["variant", "option"], sort=False))
    if not studies:
        return None
    fig, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies), 4), squeeze=False)
    for ax, ((variant, option), d) in zip(axes[0], studies, strict=True):
        ax2 = ax.twinx()
        for (task, n), e in d.groupby(["task", "seq_len"]):
            ax.errorbar(e["value"], e["acc"], yerr=e["acc_std"], marker="o", color=color(variant), capsize=3)
            ax2.errorbar(e["value"], e["approx_err"], yerr=e["approx_err_std"], marker="s", ls="--", color="tab:gray")
            if (task, n) in exact_acc:
                ax.axhline(exact_acc[(task, n)], color="k", ls=":", label=f"{exact_variant()} ({task}, N={n})")
            ax.set_title(f"{variant} on {task}, N={n}: accuracy and approx_err vs {option}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel=option, ylabel="accuracy (mean ± sd, coloured)")
        ax2.set_ylabel("approx_err: |attention - softmax| / |softmax| (grey)")
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(out / "option_studies.png", dpi=110)
    plt.close(fig)
    return "option_studies.png"


def plot_loss_curves(df: pd.DataFrame, s: pd.DataFrame, out: Path) -> str:
    tasks = list(s["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        n = _main_n(s, task)
        t = df[(df["task"] == task) & (df["seq_len"] == n)]
        for line, d in t.groupby("line", sort=False):
            curves = [np.array(json.loads(c)) for c in d["loss_curve"]]
            k = min(len(c) for c in curves)
            steps = curves[0][:k, 0]
            mean = np.mean([c[:k, 1] for c in curves], axis=0)
            ax.plot(steps, mean, label=line, color=color(d["variant"].iloc[0]))
        ax.set(title=f"{task}, N={n}", xlabel="step", ylabel="training loss (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    return "loss_curves.png"


def _f(x: float, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}g}"


def report_header(
    directory: Path, title: str, result_cls: type[TaskResult] = TaskResult
) -> tuple[dict, dict[str, int], list[str]]:
    """What every training study's page opens with: its ``metadata.json`` (empty if unreadable),
    the count of rows by status, and the title, machine and command lines."""
    try:
        meta = json.loads((directory / METADATA).read_text())
    except (OSError, ValueError):
        meta = {}
    rows = read_task_results(directory / RESULTS, result_cls)
    statuses = pd.Series([r.status for r in rows]).value_counts().to_dict() if rows else {}
    lines = [f"# {title}: {meta.get('preset', directory.name)}", ""]
    if meta:
        lines += [
            f"Machine: **{meta.get('cpu_model')}**, {meta.get('cpu_count')} logical cores; gpu: {meta.get('gpu')}. "
            f"Python {meta.get('python')}, torch {meta.get('torch')}, commit `{meta.get('git_commit')}`.",
            "",
            f"Command: `{meta.get('command')}`; started {meta.get('started')}, finished {meta.get('finished')} "
            f"({meta.get('status')}).",
            "",
        ]
    return meta, statuses, lines


def write_task_report(directory: Path) -> Path:
    """Write ``README.md`` and the plots into ``directory``; returns the page's path."""
    df = load_task_results(directory)
    meta, statuses, lines = report_header(directory, "Task benchmark")
    lines += [
        f"{meta.get('description', '')}",
        "",
        "Each run trains a small Transformer (token + learned position embeddings, pre-norm blocks of a short "
        "causal depthwise convolution, `AttentionLayer` with the variant, and an MLP) with AdamW, linear warm-up "
        "and cosine decay, gradient clipping at 1 and a fixed step budget, on data generated from the run's seed. "
        "Accuracy: final held-out accuracy (per query for MQAR, per position for local max, per sequence for "
        "ListOps), mean ± standard deviation over seeds. Training time excludes evaluation; time to target is "
        "the training time at the first evaluation at or above the target (mean over the seeds that reached "
        "it). Peak memory: `torch.cuda.max_memory_allocated` on CUDA; on CPU, parameters, gradients and AdamW "
        "state plus the bytes of the tensors one step saves for backward. approx_err: the trained model's own "
        "attention against exact softmax attention on the same q, k, v (relative Frobenius error, mean over "
        "layers). Raw rows: [results.csv](results.csv), [metadata.json](metadata.json).",
        "",
        "Runs by status: " + ", ".join(f"{n} {k}" for k, n in statuses.items()) + ".",
        "",
    ]
    if df.empty:
        page = directory / "README.md"
        atomic_write(page, "\n".join(lines) + "\n")
        return page
    s = summarise(df)
    lines += [
        "## Results",
        "",
        "| task | N | line | accuracy | seeds | majority class | train s | time to target s (reached) "
        "| tokens/s | peak MiB | approx_err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in s.iterrows():
        ttt = f"{_f(r.time_to_target_s)} ({int(r.reached)}/{int(r.seeds)}, target {r.target:g})"
        lines.append(
            f"| {r.task} | {r.seq_len} | {r.line} | {r.acc:.3f} ± {_f(r.acc_std, 2)} | {r.seeds} | {r.chance:.3f} "
            f"| {_f(r.train_s)} | {ttt} | {_f(r.tokens_per_s)} | {_f(r.peak_mib)} | {_f(r.approx_err, 2)} |"
        )
    figs = plot_pareto(s, directory)
    lines += ["", "## Accuracy against training time (Pareto front per task)", ""]
    lines += [f"![{f}]({f})" for f in figs]
    lines += ["", "## Accuracy against N", "", f"![accuracy vs N]({plot_accuracy_vs_n(s, directory)})", ""]
    st = option_studies(df)
    exact_acc = {(r.task, r.seq_len): r.acc for _, r in s[s["variant"] == exact_variant()].iterrows()}
    name = plot_option_study(st, exact_acc, directory)
    if name:
        lines += ["## Accuracy against a variant's option, next to its approx_err", ""]
        lines += ["| task | N | variant | option | accuracy | approx_err |", "|---|---|---|---|---|---|"]
        for _, r in st.iterrows():
            lines.append(
                f"| {r.task} | {r.seq_len} | {r.variant} | {r.option}={r.value} | {r.acc:.3f} ± {_f(r.acc_std, 2)} "
                f"| {_f(r.approx_err, 3)} ± {_f(r.approx_err_std, 2)} |"
            )
        lines += ["", f"![option studies]({name})", ""]
    lines += ["## Loss curves", "", f"![loss curves]({plot_loss_curves(df, s, directory)})", ""]
    page = directory / "README.md"
    atomic_write(page, "\n".join(lines) + "\n")
    return page
