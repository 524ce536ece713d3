"""Numbers the report is made of: scaling exponents, crossover lengths, speed-ups, run comparison.

All functions take the ``results.csv`` table as a pandas DataFrame (see :func:`load_results`).
A *line* is one variant (with its options) x backend x pass in one *setting* (device, dtype,
batch, heads, kv heads, head dim, causal): the times of a line along N.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

import attention_variants as av
from attn_bench.core.config import BenchResult, column, config_fields, option_columns, result_columns

SETTING = ["device", "dtype", "batch", "heads", "kv_heads", "head_dim", "causal"]


def option_cols(df: pd.DataFrame) -> list[str]:
    """The variants' sweep-option columns of a results table (``window``, ``num_features``, a
    plug-in's own): every column that is neither a declared config field nor a result field."""
    known = {column(f) for f in config_fields()} | {f.name for f in dataclasses.fields(BenchResult)}
    return [c for c in df.columns if c not in known]


def line_cols(df: pd.DataFrame) -> list[str]:
    """What makes a *line*: the variant with its options, the backend and the pass."""
    return ["variant", *option_cols(df), "backend", "pass"]


def key_cols(df: pd.DataFrame) -> list[str]:
    return [*SETTING, *line_cols(df), "seq_len"]


def load_results(directory: Path | str) -> pd.DataFrame:
    """``results.csv`` as a DataFrame, read through :func:`attn_bench.core.results.read_results`: lines that are
    not whole rows are left out (with a ``file:line`` message on stderr), and a foreign column set
    raises :class:`attn_bench.core.results.ResultsFileError`."""
    from attn_bench.core.results import read_results, rows_to_csv

    path = Path(directory) / "results.csv"
    with open(path, newline="", encoding="utf-8", errors="replace") as f:  # read_results judges the bytes
        header = f.readline().strip().split(",")
    rows = read_results(path)
    # Through CSV text again, so the columns get the types pandas gives the file itself; the
    # file's own option columns are kept (a plug-in's, even when it is not loaded here).
    columns = [*result_columns(), *(c for c in header if c not in result_columns())]
    df = pd.read_csv(io.StringIO(rows_to_csv((r.to_row() for r in rows), columns)))
    for col in option_cols(df):  # -1: the option does not apply (keeps comparisons NA-free)
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(-1).astype(int)
    df["causal"] = df["causal"].astype(str).str.lower().isin(["true", "1"])
    return df


def fit_exponent(n: np.ndarray | list, y: np.ndarray | list) -> float:
    """Least-squares slope of ``log y`` against ``log n`` (``y ~ n ** slope``); NaN with < 2 points."""
    n = np.asarray(n, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(n) & np.isfinite(y) & (n > 0) & (y > 0)
    n, y = n[keep], y[keep]
    if len(np.unique(n)) < 2:
        return math.nan
    slope, _ = np.polyfit(np.log(n), np.log(y), 1)
    return float(slope)


def crossover(n: list | np.ndarray, t_eff: list | np.ndarray, t_full: list | np.ndarray) -> tuple[str, float]:
    """Smallest ``N`` at which the efficient line is faster than full attention.

    Returns ``(kind, value)``: ``("at", N_grid)`` the first grid length where it is faster and
    stays faster at every larger measured length, with ``value`` the log-log interpolated
    crossing between that length and the previous one; ``("below", N_min)`` when it is faster
    already at the smallest length; ``("none", nan)`` when it never is in range.
    """
    n = np.asarray(n, dtype=float)
    ratio = np.asarray(t_eff, dtype=float) / np.asarray(t_full, dtype=float)
    order = np.argsort(n)
    n, ratio = n[order], ratio[order]
    keep = np.isfinite(ratio) & (ratio > 0) & (n > 0)  # N = 0 has no place on a log scale
    n, ratio = n[keep], ratio[keep]
    if len(n) == 0:
        return "none", math.nan
    faster = ratio < 1.0
    # First index from which it is faster at every larger length.
    idx = None
    for i in range(len(n) - 1, -1, -1):
        if faster[i]:
            idx = i
        else:
            break
    if idx is None:
        return "none", math.nan
    if idx == 0:
        return "below", float(n[0])
    # Interpolate log(ratio) linearly in log(n) between idx-1 (>= 1) and idx (< 1).
    x0, x1 = math.log(n[idx - 1]), math.log(n[idx])
    y0, y1 = math.log(ratio[idx - 1]), math.log(ratio[idx])
    x = x0 + (0 - y0) * (x1 - x0) / (y1 - y0) if y1 != y0 else x1
    return "at", float(math.exp(x))


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "ok") & df["time_ms"].notna()].copy()


def noisy_mask(df: pd.DataFrame) -> pd.Series:
    """Which rows were marked ``noisy`` (their spread or the machine's load stayed over the
    thresholds after re-measuring); all False for a results file from before the column."""
    if "noisy" not in df:
        return pd.Series(False, index=df.index)
    return df["noisy"].astype("string").str.lower().isin(["true", "1"]).fillna(False).astype(bool)


def quiet_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The ok rows that are not noisy: what fits (exponents, crossovers) are made of."""
    ok = ok_rows(df)
    return ok[~noisy_mask(ok)]


def without_copies(df: pd.DataFrame) -> pd.DataFrame:
    """Drop rows copied from an identical computation (the Performer's SDPA baseline is the
    ``full`` SDPA row): they would repeat a line in tables and plots."""
    if "note" not in df:
        return df
    return df[~df["note"].astype("string").fillna("").str.contains("measured once")]


def _option_label(name: str) -> str:
    for variant in av.list_variants():
        for o in av.variant_class(variant).sweep_options:
            if o.name == name:
                return o.label
    return name


def line_label(row) -> str:
    name = str(row["variant"])
    for col in option_columns():
        if col in row.index and not pd.isna(row[col]) and int(row[col]) >= 0:
            name += f" {_option_label(col)}={int(row[col])}"
    return f"{name} / {row['backend']}"


def setting_label(row) -> str:
    kv = f" Hk={row['kv_heads']}" if row["kv_heads"] != row["heads"] else ""
    causal = "causal" if row["causal"] else "non-causal"
    return f"{row['device']} {row['dtype']} B={row['batch']} H={row['heads']}{kv} D={row['head_dim']} {causal}"


def in_n_order(df: pd.DataFrame, within: list[str], n: str = "seq_len") -> pd.DataFrame:
    """``df`` with its rows in numeric order of ``n`` inside each group of ``within`` (groups keep
    the order in which they first appear; rows of equal N keep theirs)."""
    if df.empty:
        return df
    group = df.groupby(within, dropna=False, sort=False).ngroup()
    order = pd.DataFrame({"group": group.to_numpy(), "n": pd.to_numeric(df[n]).to_numpy()})
    return df.iloc[order.sort_values(["group", "n"], kind="stable").index.to_numpy()]


def _groups(df: pd.DataFrame, cols: list[str]):
    return df.groupby(cols, dropna=False, sort=False)


def exponents(df: pd.DataFrame, tail: int = 3) -> pd.DataFrame:
    """Fitted exponents of time and memory in N per line: over all lengths and over the ``tail``
    largest (small N is dominated by fixed overheads). Noisy rows are left out."""
    rows = []
    for _, g in _groups(without_copies(quiet_rows(df)), SETTING + line_cols(df)):
        g = g.sort_values("seq_len")
        if g["seq_len"].nunique() < 2:
            continue
        t = g.tail(tail)
        first = g.iloc[0]
        rows.append(
            {
                "setting": setting_label(first),
                "line": line_label(first),
                "pass": first["pass"],
                "N range": f"{int(g['seq_len'].min())}..{int(g['seq_len'].max())}",
                "points": len(g),
                "time exp (all)": fit_exponent(g["seq_len"], g["time_ms"]),
                f"time exp (top {tail})": fit_exponent(t["seq_len"], t["time_ms"]),
                f"mem exp (top {tail})": fit_exponent(t["seq_len"], t["peak_mem_bytes"]),
            }
        )
    return pd.DataFrame(rows)


def _compare_with(variant: str) -> str | None:
    try:
        return av.variant_class(variant).compare_with
    except ValueError:  # a plug-in's variant, not loaded here
        return av.EXACT_VARIANT


def crossovers(df: pd.DataFrame) -> pd.DataFrame:
    """For each line of a variant that declares ``compare_with`` (the efficient variants: full
    attention), the crossover against that variant on the same backend, and against its SDPA
    baseline. Noisy rows are left out."""
    ok = quiet_rows(df)
    rows = []
    for _, g in _groups(ok, SETTING + line_cols(df)):
        first = g.iloc[0]
        other = _compare_with(str(first["variant"]))
        if other is None or first["backend"] in ("reference", "sdpa"):  # dense computations: no crossover
            continue
        same = (ok[SETTING] == first[SETTING]).all(axis=1) & (ok["pass"] == first["pass"]) & (ok["variant"] == other)
        for against in dict.fromkeys([first["backend"], "sdpa"]):
            full = ok[same & (ok["backend"] == against)]
            if full.empty:
                continue
            m = g.merge(full[["seq_len", "time_ms"]], on="seq_len", suffixes=("", "_full"))
            if m.empty:
                continue
            kind, value = crossover(m["seq_len"], m["time_ms"], m["time_ms_full"])
            if kind == "none":
                text = f"none in {int(m['seq_len'].min())}..{int(m['seq_len'].max())}"
            elif kind == "below":
                text = f"<= {int(value)} (faster at every N)"
            else:
                text = f"~{value:.0f}"
            largest = m.sort_values("seq_len").iloc[-1]
            rows.append(
                {
                    "setting": setting_label(first),
                    "line": line_label(first),
                    "pass": first["pass"],
                    "against": f"{other} / {against}",
                    "crossover N": text,
                    "speed-up at largest N": f"{largest['time_ms_full'] / largest['time_ms']:.1f}x at "
                    f"N={int(largest['seq_len'])}",
                }
            )
    return pd.DataFrame(rows)


def speedups(df: pd.DataFrame, baseline: str = "sdpa") -> pd.DataFrame:
    """Rows of ``df`` (ok) with ``speedup = time(baseline backend, same variant/config) / time``."""
    ok = ok_rows(df)
    on = [*SETTING, "variant", *option_cols(df), "pass", "seq_len"]
    base = ok[ok["backend"] == baseline][[*on, "time_ms"]]
    m = ok[ok["backend"] != baseline].merge(base, on=on, suffixes=("", "_base"))
    m["speedup"] = m["time_ms_base"] / m["time_ms"]
    return m


def compare_runs(new: pd.DataFrame, old: pd.DataFrame, threshold: float = 0.10) -> pd.DataFrame:
    """Rows of both runs joined on the config; ``ratio = time_new / time_old``; ``regression``
    when slower by more than ``threshold`` or when a row that was ok is no longer ok."""
    key = [c for c in key_cols(new) if c in old.columns]
    cols = [*key, "status", "time_ms", "peak_mem_bytes", "max_err"]
    m = new[cols].merge(old[cols], on=key, suffixes=("", "_old"), how="inner")
    m["ratio"] = m["time_ms"] / m["time_ms_old"]
    m["mem_ratio"] = m["peak_mem_bytes"] / m["peak_mem_bytes_old"]
    broke = (m["status_old"] == "ok") & (m["status"] != "ok")
    m["regression"] = (m["ratio"] > 1.0 + threshold) | broke
    m["improvement"] = m["ratio"] < 1.0 / (1.0 + threshold)
    return m
