"""Progress lines that fit a narrow terminal, and an ETA that does not swing.

The count, the bar, the elapsed time and the ETA come first and keep their width; the row's label
comes last and is cut with an ellipsis when the line is too long (an 80-column terminal used to
lose the count and the ETA instead). The ETA adds up, for each row still to run, the mean wall
time of the rows of the same N and pass already run: a sweep's rows range from milliseconds to
minutes with N, so one mean over all rows swings as the lengths go by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def progress_bar(eta: bool = False, console: Any = None) -> Any:
    """A rich ``Progress`` whose line reads ``27/108 ━━━━━ 0:01:23 [ETA 0:00:31] label…``: the
    label takes what the terminal has left. ``eta``: show the task's ``eta`` field (see :func:`clock`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    cols: list[Any] = [MofNCompleteColumn(), BarColumn(bar_width=12), TimeElapsedColumn()]
    if eta:
        cols.append(TextColumn("ETA {task.fields[eta]}"))
    label = Column(no_wrap=True, overflow="ellipsis", ratio=1)  # with expand: the width that is left
    cols.append(TextColumn("[bold]{task.description}", table_column=label))
    return Progress(*cols, console=console, expand=True)


def eta_seconds(done: Iterable[tuple[int, str, float]], todo: Iterable[tuple[int, str]]) -> float | None:
    """Seconds the rows ``todo`` (``(N, pass)`` each) will take, from ``done`` (``(N, pass,
    seconds)`` each): per row, the mean of the done rows of its N and pass; for an (N, pass) not
    run yet, the mean at the nearest N run of that pass (any pass if none), scaled by the ratio
    of the lengths. None before any row has run."""
    by: dict[tuple[int, str], list[float]] = {}
    for n, p, s in done:
        by.setdefault((n, p), []).append(s)
    if not by:
        return None
    mean = {k: sum(v) / len(v) for k, v in by.items()}
    total = 0.0
    for n, p in todo:
        if (n, p) in mean:
            total += mean[(n, p)]
            continue
        same = [k for k in mean if k[1] == p] or list(mean)
        near = min(same, key=lambda k: (abs(math.log(max(k[0], 1) / max(n, 1))), k))
        total += mean[near] * max(n, 1) / max(near[0], 1)
    return total


def clock(seconds: float | None) -> str:
    """``h:mm:ss``, or ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
