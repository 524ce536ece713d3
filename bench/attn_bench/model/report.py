"""Report of an ``attn-bench model`` run: a Markdown page and PNG plots in the run directory.

Every figure comes from ``results.csv``. The share of time in attention of a row is
``1 - t_skip / t``, with ``t_skip`` the time of the same model, N and pass with attention skipped
(``skip``). The crossover N of an implementation against a baseline is the smallest measured N
from which it is faster at every larger N where both ran (running where the other ran out of
memory counts as faster); it is empty when that never happens.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from attn_bench.core import variants
from attn_bench.core.results import METADATA, atomic_write
from attn_bench.model.config import RESULTS, SKIP_IMPL, impl_variant, impls, read_model_results

BASE_COLORS = {"sdpa": "tab:gray", SKIP_IMPL: "black"}  # an av_* line takes its variant's colour


def impl_color(impl: str) -> str | None:
    variant = impl_variant(impl)
    return BASE_COLORS.get(impl) if variant is None else variants.color(variant)


def crossover_pairs() -> list[tuple[str, str]]:
    """What the crossover table compares: each variant's implementation against ``sdpa``, each
    inexact one against the exact variant's, then the exact one against ``sdpa`` (registry order)."""
    from attention_variants import hf

    exact = hf.PREFIX + variants.exact_variant()
    others = [i for i in impls() if impl_variant(i) is not None and i != exact]
    return [*((i, "sdpa") for i in others), *((i, exact) for i in others), (exact, "sdpa")]


# Columns that, with N and the pass, name one model (the skip row's partner).
MODEL_KEY = ("arch", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "batch", "dtype", "device")


def load_model_frame(directory: Path) -> pd.DataFrame:
    """Every row as a frame, with ``line`` (implementation and options) and ``attn_share``."""
    df = pd.DataFrame([r.to_row() for r in read_model_results(directory / RESULTS)])
    if df.empty:
        return df
    df["line"] = [
        i + "".join(f" {k}={x}" for k, x in json.loads(o).items())
        for i, o in zip(df["impl"], df["options"], strict=True)
    ]
    key = [*MODEL_KEY, "seq_len", "pass"]
    skip = df[(df["impl"] == SKIP_IMPL) & (df["status"] == "ok")][[*key, "time_ms"]]
    df = df.merge(skip.rename(columns={"time_ms": "skip_ms"}), on=key, how="left")
    df["attn_share"] = np.where(df["impl"] == SKIP_IMPL, np.nan, 1.0 - df["skip_ms"] / df["time_ms"])
    # Two models of one arch (a preset's groups at different sizes) are told apart by their sizes;
    # the tables and the crossover key on this label.
    models = df[list(MODEL_KEY)].astype(str).agg("|".join, axis=1).groupby(df["arch"]).nunique()
    if (models > 1).any():
        df["arch"] = [
            f"{r.arch} ({r.layers}x{r.hidden}, {r.heads}/{r.kv_heads} heads, ffn {r.intermediate}, {r.dtype})"
            if models[r.arch] > 1
            else r.arch
            for r in df.itertuples()
        ]
    return df


def crossover(df: pd.DataFrame, arch: str, pass_: str, impl: str, base: str) -> tuple[str, str]:
    """``(crossover N or "", how)`` of ``impl`` against ``base`` (see the module doc)."""
    d = df[(df["arch"] == arch) & (df["pass"] == pass_)]
    a = d[d["impl"] == impl].set_index("seq_len")
    b = d[d["impl"] == base].set_index("seq_len")
    wins = []  # (N, impl faster, base out of memory)
    for n in sorted(set(a.index) & set(b.index)):
        sa, sb = a.loc[n, "status"], b.loc[n, "status"]
        if sa == "ok" and sb == "ok":
            wins.append((n, a.loc[n, "time_ms"] < b.loc[n, "time_ms"], False))
        elif sa == "ok" and sb == "oom":
            wins.append((n, True, True))
        elif sa == "oom" and sb == "ok":
            wins.append((n, False, False))
    if not wins:
        return "", "no N where both ran"
    first = None
    for n, win, _ in reversed(wins):
        if not win:
            break
        first = n
    if first is None:
        return "", f"slower at the largest N compared ({wins[-1][0]})"
    oom = [n for n, _, o in wins if o]
    note = f"; {base} out of memory from N={oom[0]}" if oom else ""
    if first == wins[0][0]:
        return str(first), f"faster at every N compared{note}"
    return str(first), f"faster from N={first}{note}"


def largest_common_speedup(df: pd.DataFrame, arch: str, pass_: str, impl: str, base: str) -> str:
    """``"1.8x at N=4096"``: ``t_base / t_impl`` at the largest N where both ran, or ``""``."""
    d = df[(df["arch"] == arch) & (df["pass"] == pass_) & (df["status"] == "ok")]
    a = d[d["impl"] == impl].set_index("seq_len")["time_ms"]
    b = d[d["impl"] == base].set_index("seq_len")["time_ms"]
    common = sorted(set(a.index) & set(b.index))
    if not common:
        return ""
    n = common[-1]
    return f"{b.loc[n] / a.loc[n]:.2f}x at N={n}"


def _plot(df: pd.DataFrame, y: str, ylabel: str, name: str, out: Path, log_y: bool = True) -> str | None:
    ok = df[(df["status"] == "ok") & df[y].notna()]
    if ok.empty:
        return None
    archs = list(dict.fromkeys(ok["arch"]))
    passes = [p for p in ("fwd", "fwd_bwd") if p in set(ok["pass"])]
    fig, axes = plt.subplots(len(archs), len(passes), figsize=(5 * len(passes), 3.6 * len(archs)), squeeze=False)
    for r, arch in enumerate(archs):
        for c, pass_ in enumerate(passes):
            ax = axes[r][c]
            d = ok[(ok["arch"] == arch) & (ok["pass"] == pass_)]
            for line, g in d.groupby("line", sort=False):
                g = g.sort_values("seq_len")
                if g[y].notna().any():
                    impl = g["impl"].iloc[0]
                    ls = ":" if impl == SKIP_IMPL else "-"
                    ax.plot(g["seq_len"], g[y], marker="o", ls=ls, color=impl_color(impl), label=line)
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            ax.set(title=f"{arch}, {pass_}", xlabel="N (tokens)", ylabel=ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _f(x: object, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return ""
    return f"{x:.{digits}g}"


def _cell(r: pd.Series) -> str:
    if r.status != "ok":
        return r.status
    share = "" if np.isnan(r.attn_share) else f", {r.attn_share:.0%} attn"
    return f"{r.time_ms:.3g} ms ({r.tokens_per_s:.3g} tok/s, {r.peak_mem_bytes / 2**20:.3g} MiB{share})"


def write_model_report(directory: Path) -> Path:
    """Write ``README.md`` and the plots into ``directory``; returns the page's path."""
    df = load_model_frame(directory)
    try:
        meta = json.loads((directory / METADATA).read_text())
    except (OSError, ValueError):
        meta = {}
    lines = [f"# Whole-model benchmark: {meta.get('preset', directory.name)}", ""]
    if meta:
        lines += [
            f"Machine: **{meta.get('cpu_model')}**, {meta.get('cpu_count')} logical cores; gpu: {meta.get('gpu')}. "
            f"Python {meta.get('python')}, torch {meta.get('torch')}"
            + (f", transformers {meta['transformers']}" if meta.get("transformers") else "")
            + f", commit `{meta.get('git_commit')}`.",
            "",
            f"Command: `{meta.get('command')}`; started {meta.get('started')}, finished {meta.get('finished')} "
            f"({meta.get('status')}).",
            "",
            str(meta.get("description", "")),
            "",
        ]
    lines += [
        "Each row builds a Hugging Face Transformers model with random weights (`llama`: `LlamaForCausalLM`, "
        "causal; `bert`: `BertForMaskedLM`, bidirectional) with one attention implementation and times one "
        "pass over a batch of random tokens: `fwd` (logits, no grad) or `fwd_bwd` (the LM loss and its "
        "backward, gradients of every weight). `sdpa` is Transformers' own attention, the baseline; `av_*` "
        "are this project's variants; `skip` is the same model with attention skipped (`q + k + v`), and "
        "a row's attention share is `1 - t_skip / t` (a negative share: the model without attention was "
        "measured slower, i.e. the difference is within the timing noise). Time: median; tokens/s = "
        "batch x N / time; peak memory: what one pass allocates beyond the weights and inputs (CPU: the "
        "profiler's allocator "
        "events; CUDA: `max_memory_allocated`). Before timing, each row's logits on the first `gate_n` "
        "tokens are checked against the same weights run in float64 (`max_err <= err_bound`, else "
        "`wrong`). Raw rows: [results.csv](results.csv), [metadata.json](metadata.json).",
        "",
    ]
    if df.empty:
        page = directory / "README.md"
        atomic_write(page, "\n".join(lines) + "\n")
        return page
    counts = df["status"].value_counts().to_dict()
    lines += ["Rows by status: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".", ""]
    ok = df[df["status"] == "ok"]
    if not ok.empty and ok["params"].notna().any():
        sizes = ok.groupby("arch")["params"].first()
        lines += ["Parameters: " + ", ".join(f"{a} {p / 1e6:.2f} M" for a, p in sizes.items()) + ".", ""]

    lines += ["## From which N does each variant pay off in the whole model?", ""]
    lines += [
        "Speed-up: the baseline's time over the variant's at the largest N where both ran.",
        "",
        "| model | pass | variant | vs | crossover N | how | speed-up at the largest common N |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in dict.fromkeys(df["arch"]):
        for pass_ in ("fwd", "fwd_bwd"):
            if not (df["pass"] == pass_).any():
                continue
            for impl, base in crossover_pairs():
                if not ((df["impl"] == impl) & (df["arch"] == arch)).any():
                    continue
                if not ((df["impl"] == base) & (df["arch"] == arch)).any():
                    continue
                n, how = crossover(df, arch, pass_, impl, base)
                lines.append(
                    f"| {arch} | {pass_} | {impl} | {base} | {n or '-'} | {how} | "
                    f"{largest_common_speedup(df, arch, pass_, impl, base)} |"
                )
    lines += [""]

    order = {name: i for i, name in enumerate(impls())}
    for arch in dict.fromkeys(df["arch"]):
        for pass_ in ("fwd", "fwd_bwd"):
            d = df[(df["arch"] == arch) & (df["pass"] == pass_)]
            if d.empty:
                continue
            shown = sorted(dict.fromkeys(d["line"]), key=lambda x: order.get(x.split()[0], 99))
            lines += [f"## {arch}, {pass_}", ""]
            lines += ["| N | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
            for n, g in d.groupby("seq_len"):
                cells = []
                for line in shown:
                    r = g[g["line"] == line]
                    cells.append(_cell(r.iloc[0]) if len(r) else "")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            lines += [""]

    lines += ["## Plots", ""]
    plots = [
        (df, "time_ms", "time per pass (ms)", "time_vs_n.png", True),
        (df, "tokens_per_s", "tokens/s", "tokens_per_s_vs_n.png", True),
        (df[df["impl"] != SKIP_IMPL], "attn_share", "share of time in attention", "attn_share.png", False),
        (df, "peak_mem_bytes", "peak memory (bytes)", "peak_memory_vs_n.png", True),
    ]
    for frame, y, label, file, log_y in plots:
        name = _plot(frame, y, label, file, directory, log_y=log_y)
        if name is not None:
            lines += [f"![{label} vs N]({name})", ""]

    gated = df[df["max_err"].notna()]
    if not gated.empty:
        lines += ["## Numerics gate of the logits (worst row per model and implementation)", ""]
        lines += [
            "`naive_err`: the same model with the ground-truth attention computed in the row's dtype; `skip_err`: "
            "the model with attention skipped, i.e. how far a wrong attention moves the logits; `sdpa_diff`: the "
            "distance from the same model with Transformers' `sdpa` (for the exact variant's implementation "
            "an agreement check, for the others how far they move the model's output from exact attention).",
            "",
            "| model | implementation | gate N | max_err | err_bound | naive_err | skip_err | sdpa_diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        worst = gated.loc[gated.groupby(["arch", "line"])["max_err"].idxmax()]
        for _, r in worst.iterrows():
            lines.append(
                f"| {r.arch} | {r.line} | {int(r.gate_n)} | {_f(r.max_err)} | {_f(r.err_bound)} | {_f(r.naive_err)} "
                f"| {_f(r.skip_err)} | {_f(r.sdpa_diff)} |"
            )
        lines += [""]
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        lines += [
            "## Rows that did not run",
            "",
            "| model | pass | line | N | status | reason |",
            "|---|---|---|---|---|---|",
        ]
        for _, r in bad.iterrows():
            reason = str(r.error).replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {r.arch} | {r['pass']} | {r.line} | {r.seq_len} | {r.status} | {reason} |")
        lines += [""]
    page = directory / "README.md"
    atomic_write(page, "\n".join(lines) + "\n")
    return page
