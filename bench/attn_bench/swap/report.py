"""Report of an ``attn-bench swap`` run: ``README.md`` and PNG plots in the run directory.

Losses are held-out next-byte cross-entropy in nats. Per (model, mode, variant): the mean over
seeds of the seed's reference loss (its pretrained full-attention model), of the loss at step 0
(for ``swap`` rows: right after the swap, before any fine-tuning), of the loss at the end, and of
the first evaluated step within 5% of the reference (over the seeds that got there; ``k/n`` says
how many did).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from attn_bench.core.results import atomic_write
from attn_bench.core.variants import color, exact_variant
from attn_bench.swap.run import MODES, RECOVER_FRAC, SwapResult, loss_curve_of
from attn_bench.task.report import _f, report_header
from attn_bench.task.run import RESULTS, read_task_results

MODEL_NAMES = {"task": "TaskModel (attn_bench.task.train)", "hf": "Transformers Llama (attn_implementation)"}


def load_swap_results(directory: Path) -> pd.DataFrame:
    """The run's ok rows as a frame."""
    rows = [r.to_row() for r in read_task_results(directory / RESULTS, SwapResult) if r.status == "ok"]
    return pd.DataFrame(rows)


def summarise_swap(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, mode, variant): losses, ratios to the reference, steps to recover."""
    out = []
    for (model, mode, variant), d in df.groupby(["model", "mode", "variant"], sort=False):
        reached = d["steps_to_recover"].dropna()
        out.append(
            {
                "model": model,
                "mode": mode,
                "variant": variant,
                "options": d["options"].iloc[0],
                "seeds": d["seed"].nunique(),
                "steps": int(d["steps"].iloc[0]),
                "ref": d["ref_loss"].mean(),
                "start": d["start_loss"].mean(),
                "start_std": d["start_loss"].std(),
                "start_ratio": (d["start_loss"] / d["ref_loss"]).mean(),
                "end": d["eval_loss"].mean(),
                "end_std": d["eval_loss"].std(),
                "end_ratio": (d["eval_loss"] / d["ref_loss"]).mean(),
                "recover": reached.mean() if len(reached) else np.nan,
                "recovered": f"{len(reached)}/{len(d)}",
                "attn_err": d["approx_err"].mean() if "approx_err" in d else np.nan,
                "train_s": d["train_s"].mean(),
            }
        )
    s = pd.DataFrame(out)
    s["order"] = [10 * ("task", "hf").index(a) + MODES.index(m) for a, m in zip(s["model"], s["mode"], strict=True)]
    return s.sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps common to every curve and the mean loss there."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    maps = [dict(c) for c in curves]
    return np.array(common), np.array([np.mean([m[s] for m in maps]) for s in common])


def plot_curves(df: pd.DataFrame, out: Path) -> str:
    """Held-out loss against steps, a panel per model: after the swap (solid) and from scratch
    (dashed), the pretraining of full attention (dotted) and the 5% band over the reference."""
    models = [m for m in ("task", "hf") if m in set(df["model"])]
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        d = df[df["model"] == model]
        for (mode, variant), g in d.groupby(["mode", "variant"], sort=False):
            curves = [c for c in map(loss_curve_of, g["eval_loss_curve"]) if c]
            if not curves:
                continue
            x, y = mean_curve(curves)
            style = {"pretrain": ":", "swap": "-", "scratch": "--"}[mode]
            label = f"{variant}, pretraining" if mode == "pretrain" else f"{variant}, {mode}"
            if mode == "swap" and variant == exact_variant():
                label = f"{variant}, fine-tuned (no swap)"
            ax.plot(x, y, style, color=color(variant), marker="o" if mode == "swap" else None, ms=3, label=label)
        ref = d.groupby("seed")["ref_loss"].first().mean()
        ax.axhline((1 + RECOVER_FRAC) * ref, color="grey", lw=0.8, ls="-.", label="reference + 5%")
        hi = min(d["start_loss"].max(), 3 * ref) * 1.05
        ax.set_ylim(0.9 * d["eval_loss"].min(), hi)
        ax.set(xlabel="training steps (after the swap / from scratch)", ylabel="held-out loss (nats/byte)")
        ax.set_title(MODEL_NAMES[model], fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    return "loss_curves.png"


def write_swap_report(directory: Path) -> Path:
    """Write ``README.md`` and the plot into ``directory``; returns the page's path."""
    df = load_swap_results(directory)
    meta, statuses, lines = report_header(directory, "Attention swap", SwapResult)
    corpus = meta.get("corpus", {})
    lines += [meta.get("description", ""), ""]
    if corpus:
        lines += [
            f"Corpus: {corpus.get('source')}, Python {corpus.get('python')}: "
            f"{len(corpus.get('train_files', []))} training files ({corpus.get('train_bytes')} bytes), "
            f"{len(corpus.get('heldout_files', []))} held-out files ({corpus.get('heldout_bytes')} bytes); "
            f"SHA-256 `{corpus.get('sha256')}` (the file lists are in metadata.json).",
            "",
        ]
    lines += [
        "Each seed pretrains its model with full attention (`pretrain`); its final held-out loss is the seed's "
        "*reference*. `swap` rows take those weights, replace the attention (`full`: no swap, the control) and "
        "fine-tune; `scratch` rows train the variant from scratch with the pretraining's budget. `at step 0`: the "
        "held-out loss before the row's first step (for `swap`: right after the swap). `steps to 5%`: the first "
        "evaluated step with a held-out loss within 5% of the reference (mean over the seeds that reached it). "
        "`attention error`: ‖variant - softmax‖/‖softmax‖ on the trained model's own queries and keys, right after "
        "the swap. Raw rows: [results.csv](results.csv), [metadata.json](metadata.json).",
        "",
        "Runs by status: " + ", ".join(f"{n} {k}" for k, n in statuses.items()) + ".",
        "",
    ]
    if not df.empty:
        s = summarise_swap(df)
        lines += [
            "## Results",
            "",
            "| model | mode | variant | options | steps | reference | at step 0 (x ref) | at the end (x ref) "
            "| steps to 5% | reached | attention error | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in s.iterrows():
            opts = ", ".join(f"{k}={v}" for k, v in json.loads(r.options or "{}").items())
            lines.append(
                f"| {r.model} | {r['mode']} | {r.variant} | {opts} | {r.steps} | {r.ref:.3f} "
                f"| {r.start:.3f} ± {_f(r.start_std, 2)} ({r.start_ratio:.2f}x) "
                f"| {r.end:.3f} ± {_f(r.end_std, 2)} ({r.end_ratio:.3f}x) | {_f(r.recover)} | {r.recovered} "
                f"| {_f(r.attn_err)} | {_f(r.train_s)} |"
            )
        lines += ["", "## Held-out loss against steps", "", f"![loss curves]({plot_curves(df, directory)})", ""]
    page = directory / "README.md"
    atomic_write(page, "\n".join(lines) + "\n")
    return page
