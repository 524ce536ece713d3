"""What a sweep's report says about noise: how many timed rows stayed noisy, whether the machine
was busy while they ran (a warning at the top of the page), and the table of noisy rows.

A row's noise record (core/measure.py): ``spread`` = (p90 - p10) / median of its calls,
``other_cpu`` = other processes' share of its CPUs while it was timed, ``load_avg``, on CUDA
``gpu_clock_mhz`` and ``gpu_others``, ``remeasured`` and ``noisy``. Results from before the record
have none of these columns; the report then says so instead of guessing.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from attn_bench.core.config import RunSettings
from attn_bench.sweep.analysis import line_label, noisy_mask, ok_rows, without_copies


def thresholds(meta: dict[str, Any]) -> tuple[float, float, int]:
    """``(noisy_spread, busy_share, remeasure)`` the run used (metadata.json's settings, else the defaults)."""
    given = meta.get("settings") or {}
    default = RunSettings()
    return (
        float(given.get("noisy_spread", default.noisy_spread)),
        float(given.get("busy_share", default.busy_share)),
        int(given.get("remeasure", default.remeasure)),
    )


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(math.nan, index=df.index)


def busy_mask(df: pd.DataFrame, busy_share: float) -> pd.Series:
    """Rows timed while the machine was busy: (CPU) other processes used over ``busy_share`` of
    the row's CPUs, (CUDA) another process was on the card."""
    cuda = df["device"].astype(str).str.startswith("cuda")
    cpu_busy = ~cuda & (_num(df, "other_cpu") > busy_share)
    gpu_busy = cuda & (_num(df, "gpu_others") > 0)
    return (cpu_busy | gpu_busy).fillna(False).astype(bool)


def timed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that were timed here (ok, not copies of another row's measurement)."""
    return without_copies(ok_rows(df))


def recorded(df: pd.DataFrame) -> bool:
    """Whether the rows carry a noise record (results from before it have no ``spread`` column)."""
    return "spread" in df and _num(timed_rows(df), "spread").notna().any()


def _range(x: pd.Series, fmt: str) -> str:
    x = x.dropna()
    if x.empty:
        return "?"
    lo, hi = x.min(), x.max()
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}..{format(hi, fmt)}"


def noise_warning(df: pd.DataFrame, meta: dict[str, Any], directory: Path) -> str:
    """A Markdown warning for the top of the page when rows stayed noisy or the machine was busy
    ("" when neither, or when the rows carry no noise record); ``directory``: the run's."""
    timed = timed_rows(df)
    if timed.empty or not recorded(df):
        return ""
    spread_max, busy_share, remeasure = thresholds(meta)
    noisy = int(noisy_mask(timed).sum())
    busy = busy_mask(timed, busy_share)
    if not noisy and not busy.any():
        return ""
    parts = []
    if busy.any():
        cpu = timed[busy & ~timed["device"].astype(str).str.startswith("cuda")]
        what = (
            f"other processes used more than {busy_share:.0%} of the CPUs (median "
            f"{_num(cpu, 'other_cpu').median():.0%}, up to {_num(cpu, 'other_cpu').max():.0%})"
            if len(cpu)
            else "another process was on the GPU"
        )
        parts.append(f"{int(busy.sum())} of {len(timed)} timed rows ran while {what}")
    if noisy:
        parts.append(
            f"{noisy} row(s) stayed noisy after up to {remeasure} re-measurement(s) (spread (p90 - p10) / "
            f"median over {spread_max:g}, or a busy machine): they are marked *noisy* and left out of the "
            "scaling exponents and crossovers"
        )
    load = _range(_num(timed, "load_avg"), ".2g")
    return (
        f"> **Warning: the machine was busy while this ran.** {'; '.join(parts)}. 1-minute load average "
        f"{load} over the run. These times include other work: measure again on a quiet machine before "
        f"reading behaviour into them (`attn-bench sweep --out {shlex.quote(str(directory))} --resume "
        "--retry-failed` measures the noisy rows again and keeps the rest).\n"
    )


def noise_paragraph(df: pd.DataFrame, meta: dict[str, Any]) -> str:
    """One paragraph on how noise was measured and what it came to, for the page's preamble."""
    timed = timed_rows(df)
    if timed.empty:
        return ""
    if not recorded(df):
        return (
            "Noise: these rows carry no record of their spread or of the machine's load (a results.csv "
            "from before it was recorded); no row is marked noisy.\n"
        )
    spread_max, busy_share, remeasure = thresholds(meta)
    noisy = int(noisy_mask(timed).sum())
    text = (
        f"Noise: each timed row records its spread (p90 - p10) / median and the machine's load while it ran; a "
        f"row whose spread is over {spread_max:g}, or that ran while other processes used over {busy_share:.0%} "
        f"of its CPUs (on a GPU: shared the card), was measured again up to {remeasure} time(s). **{noisy} of "
        f"{len(timed)} timed rows stayed noisy** (left out of the exponents and crossovers, ringed on the "
        f"plots, `*` in the tables). Spread {_range(_num(timed, 'spread'), '.2f')}, other processes' CPU share "
        f"{_range(_num(timed, 'other_cpu'), '.0%')}, 1-minute load average {_range(_num(timed, 'load_avg'), '.2g')}"
    )
    if timed["device"].astype(str).str.startswith("cuda").any():
        text += f", GPU SM clock {_range(_num(timed, 'gpu_clock_mhz'), '.0f')} MHz"
    return text + ".\n"


def noisy_table(df: pd.DataFrame) -> pd.DataFrame:
    """The noisy rows: line, pass, N, time, spread, load and the reason."""
    timed = timed_rows(df)
    bad = timed[noisy_mask(timed)]
    if bad.empty:
        return pd.DataFrame()
    note = bad["note"].astype("string").fillna("").str.extract(r"noisy: (.*)$")[0].fillna("")
    return pd.DataFrame(
        {
            "line": bad.apply(line_label, axis=1),
            "pass": bad["pass"],
            "N": bad["seq_len"].astype(int),
            "time ms": bad["time_ms"],
            "spread": _num(bad, "spread"),
            "other CPU": _num(bad, "other_cpu").map(lambda x: "" if pd.isna(x) else f"{x:.0%}"),
            "load avg": _num(bad, "load_avg"),
            "why": note,
        }
    )
