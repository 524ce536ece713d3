"""Cards side by side: the same rows measured on several cards (several runs, or one run over a
cluster of mixed cards), each card's time and its speed-up against the same card's baseline.

Rows are matched on everything but where they ran: the setting without the device (dtype, batch,
heads, head dim, causal), the line (variant, options, backend), the pass and N. A row's *card* is
the device it ran on (``device_name``, recorded per row since the runs name it); a row from an
older ``results.csv`` without it takes its run's ``metadata.json`` (the GPU, or the CPU's model).
Two runs on cards of the same name stay apart, each named with its directory.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from attn_bench.core.variants import PALETTE
from attn_bench.sweep.analysis import (
    SETTING,
    line_label,
    load_results,
    ok_rows,
    option_cols,
    setting_label,
    without_copies,
)
from attn_bench.sweep.markdown import md_table
from attn_bench.sweep.plots import MARKER, OTHER_STYLE, STYLE, _slug

PAGE = "README.md"
TABLE = "cards.csv"
# What matches a row across cards: the setting without the device, the line, the pass and N.
MATCH = [c for c in SETTING if c != "device"]


def _options(df: pd.DataFrame) -> list[str]:
    """The variants' option columns (the columns added here are none)."""
    return [c for c in option_cols(df) if c not in ("card", "run", "speedup", "time_ms_base")]


def card_names(df: pd.DataFrame, meta: dict, fallback: str) -> pd.Series:
    """Each row's card: its ``device_name``, else its run's GPU (CUDA rows) or CPU model."""
    names = df["device_name"].astype("string").fillna("") if "device_name" in df else pd.Series("", index=df.index)
    cuda = df["device"].astype(str).str.startswith("cuda")
    old = cuda.map({True: meta.get("gpu"), False: meta.get("cpu_model")}).fillna(fallback)
    return names.where(names != "", old.astype("string"))


def load_cards(directories: list[Path]) -> pd.DataFrame:
    """The ``results.csv`` of each directory with a ``card`` column (the same card name from two
    directories becomes ``name (directory)`` in each)."""
    frames = []
    for d in directories:
        meta = json.loads((d / "metadata.json").read_text()) if (d / "metadata.json").exists() else {}
        df = load_results(d)
        frames.append(df.assign(card=card_names(df, meta, d.name), run=str(d)))
    seen: dict[str, set[str]] = {}
    for f in frames:
        for name in f["card"].unique():
            seen.setdefault(name, set()).update(f["run"].unique())
    for f in frames:
        shared = f["card"].map(lambda name: len(seen[name]) > 1)
        f.loc[shared, "card"] = f.loc[shared, "card"] + " (" + f.loc[shared, "run"].map(lambda r: Path(r).name) + ")"
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in _options(df):  # an option column one run lacks: -1, it does not apply
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(-1).astype(int)
    return df


def card_rows(df: pd.DataFrame, baseline: str = "sdpa") -> pd.DataFrame:
    """One row per card and match (see :data:`MATCH`) with its time and ``speedup``: the time of
    ``baseline`` on the same card and match over its own (NaN without a baseline row)."""
    line = ["variant", *_options(df), "pass", "seq_len", *MATCH]
    key = ["card", *line, "backend"]

    def times(rows: pd.DataFrame) -> pd.DataFrame:
        return rows.groupby(key, dropna=False, sort=False, as_index=False)["time_ms"].median()

    ok = ok_rows(df)
    base = times(ok[ok["backend"] == baseline])[["card", *line, "time_ms"]]  # copies too: the Performer's SDPA
    m = times(without_copies(ok)).merge(base, on=["card", *line], how="left", suffixes=("", "_base"))
    m["speedup"] = m["time_ms_base"] / m["time_ms"]
    return m


def shared_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`card_rows` whose match every card measured: what can be compared."""
    cards = rows["card"].nunique()
    key = [c for c in rows.columns if c not in ("card", "time_ms", "time_ms_base", "speedup")]
    count = rows.groupby(key, dropna=False, sort=False)["card"].transform("nunique")
    return rows[count == cards]


def headline(rows: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per setting, pass and line, at the largest N that every card measured: each card's time
    and speed-up against its own ``baseline``, side by side."""
    both = shared_rows(rows)
    if both.empty:
        return pd.DataFrame()
    cards = list(dict.fromkeys(rows["card"]))
    group = [c for c in both.columns if c not in ("card", "time_ms", "time_ms_base", "speedup", "seq_len")]
    out = []
    for _, g in both.groupby(group, dropna=False, sort=False):
        last = g[g["seq_len"] == g["seq_len"].max()].set_index("card")
        first = g.iloc[0]
        row = {
            "setting": _setting(first),
            "pass": first["pass"],
            "line": line_label(first),
            "N": int(g["seq_len"].max()),
        }
        for card in cards:
            row[f"{card} ms"] = last.at[card, "time_ms"]
            if first["backend"] != baseline:
                row[f"{card} vs {baseline}"] = last.at[card, "speedup"]
        out.append(row)
    return pd.DataFrame(out)


def _setting(row) -> str:
    return setting_label({**row, "device": "-"}).split(" ", 1)[1]  # without the device: the cards say where


def card_plots(rows: pd.DataFrame, out: Path, baseline: str) -> list[Path]:
    """Per setting, variant (with its options) and pass: time against N (left) and the speed-up
    against the same card's ``baseline`` (right); colour says the card, line style the backend."""
    cards = list(dict.fromkeys(rows["card"]))
    colours = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(cards)}
    files = []
    group = [*MATCH, "variant", *_options(rows), "pass"]
    for _, g in rows.groupby(group, dropna=False, sort=False):
        first = g.iloc[0]
        fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
        for (card, backend), line in g.groupby(["card", "backend"], sort=False):
            line = line.sort_values("seq_len")
            style = {"color": colours[card], "linestyle": STYLE.get(backend, OTHER_STYLE)}
            style["marker"] = MARKER.get(backend, "o")
            ax_t.plot(line["seq_len"], line["time_ms"], label=f"{card}: {backend}", **style)
            if backend != baseline and line["speedup"].notna().any():
                ax_s.plot(line["seq_len"], line["speedup"], label=f"{card}: {backend}", **style)
        name = line_label(first).rsplit(" / ", 1)[0]
        ax_t.set(xscale="log", yscale="log", xlabel="N", ylabel="time (ms)", title=f"{name}, {first['pass']}: time")
        ax_s.set(xscale="log", yscale="log", xlabel="N", ylabel=f"speed-up vs {baseline} (same card)")
        ax_s.set_title(f"{name}, {first['pass']}: speed-up")
        ax_s.axhline(1.0, color="grey", linewidth=0.8)
        for ax in (ax_t, ax_s):
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(_setting(first), fontsize=9)
        fig.tight_layout()
        path = out / f"cards_{_slug(name)}_{first['pass']}_{_slug(_setting(first))}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def cards_section(rows: pd.DataFrame, files: list[Path], baseline: str) -> str:
    """The Markdown of the comparison: the cards, the headline table and the plots."""
    cards = list(dict.fromkeys(rows["card"]))
    both = shared_rows(rows)
    md = [
        f"Cards: {', '.join(f'**{c}**' for c in cards)}. Rows are matched on everything but the device "
        f"(dtype, shapes, causal, variant and options, backend, pass, N); {len(both) // max(1, len(cards))} "
        f"matches were measured on every card. Speed-up: the time of `{baseline}` on the same card over the "
        "row's own.\n",
        f"\n### At the largest N every card measured\n\n{md_table(headline(rows, baseline))}",
    ]
    for f in files:
        md.append(f"\n![{f.stem}]({f.name})\n")
    return "\n".join(md)


def write_cards_report(directories: list[Path], out: Path, baseline: str = "sdpa") -> tuple[Path, int]:
    """The comparison of the runs in ``directories`` across their cards, into ``out`` (README.md,
    cards.csv, PNGs); returns the page and the number of matches measured on every card."""
    out.mkdir(parents=True, exist_ok=True)
    rows = card_rows(load_cards(directories), baseline)
    rows.to_csv(out / TABLE, index=False)
    files = card_plots(rows, out, baseline) if len(rows) else []
    runs = ", ".join(f"`{shlex.quote(str(d))}`" for d in directories)
    text = f"# Attention benchmark: cards side by side\n\nRuns: {runs}. All rows: [{TABLE}]({TABLE}).\n\n"
    (out / PAGE).write_text(text + cards_section(rows, files, baseline))
    cards = max(1, rows["card"].nunique()) if len(rows) else 1
    return out / PAGE, len(shared_rows(rows)) // cards if len(rows) else 0


def several_cards(df: pd.DataFrame) -> bool:
    """Whether one run's rows ran on more than one card (a cluster of mixed cards)."""
    if "device_name" not in df:
        return False
    names = df["device_name"].astype("string").fillna("")
    return names[names != ""].nunique() > 1
