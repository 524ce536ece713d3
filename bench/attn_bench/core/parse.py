"""Parsing one value of a config field, from the command line, a preset or a CSV cell: each parser
returns the value or raises ValueError saying what it expected."""

from __future__ import annotations

import math
from typing import Any


def cell_text(x: Any) -> str:
    """The text of a value, stripped; NaN (pandas' empty cell) is empty."""
    if isinstance(x, float) and math.isnan(x):
        return ""
    return str(x).strip()


def parse_name(x: Any) -> str:
    text = cell_text(x)
    if not text:
        raise ValueError("expected a name, got an empty value")
    return text


def parse_count(x: Any) -> int:
    """A positive int (also from ``"64"`` or ``64.0``); ValueError otherwise."""
    if isinstance(x, bool):
        raise ValueError(f"expected a positive integer, got {x!r}")
    text = cell_text(x)
    try:
        value = float(text) if not isinstance(x, int) else x
    except ValueError:
        raise ValueError(f"expected a positive integer, got {text!r}") from None
    if not (isinstance(value, int) or (math.isfinite(value) and value == int(value))) or value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return int(value)


def parse_option(x: Any) -> int:
    """A variant's sweep-option value: a non-negative int (the variant's constructor checks the rest)."""
    text = cell_text(x)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= 0):
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return int(value)


def parse_device(x: Any) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    text = cell_text(x)
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def parse_bool(x: Any) -> bool:
    if isinstance(x, bool):
        return x
    text = cell_text(x).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")
