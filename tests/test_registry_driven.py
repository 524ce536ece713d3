"""bench/ asks the registry, never a table of names: no string in the harness's code names one of
the project's variants, except the peer declarations (which variants a peer library computes) and
the design's CPU performance targets (a specification of the three built-ins, like a preset).
Presets (TOML) name the variants they run. Docstrings and comments may name them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import attn_bench

BENCH = Path(attn_bench.__file__).resolve().parent
# Allowed, with the reason.
ALLOWED = {
    "baselines/peers.py": "peer declarations: the variants each peer library computes",
    "sweep/targets.py": "the design's CPU performance targets, stated for the three built-in variants",
}
NAMES = ("full", "sliding_window", "performer")
# A variant's name (or its Hugging Face implementation) as a word: not part of a longer name such as
# performer-pytorch (a peer library) or sliding_window_mask.
WORD = re.compile(r"(?<![\w-])(?:av_)?(?:sliding_window|performer)(?![\w-])|(?<![\w-])av_full(?![\w-])")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (a body's first string, attribute docstrings included)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        for i, stmt in enumerate(body if isinstance(body, list) else []):
            first = i == 0 or isinstance(body[i - 1], ast.AnnAssign | ast.Assign)
            if first and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                out.add(id(stmt.value))
    return out


def variant_names_in(source: str) -> list[tuple[int, str]]:
    """``(line, string)`` of the string constants of ``source`` (docstrings aside) that name a
    variant: one of :data:`NAMES` exactly, or a variant name as a word inside a longer string."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        text = node.value if isinstance(node, ast.Constant) and id(node) not in docs else None
        if isinstance(text, str) and (text in NAMES or WORD.search(text)):
            found.append((node.lineno, text))
    return sorted(found)


def test_the_scan_sees_names() -> None:
    src = 'x = "full"\ny = f"{v} sliding_window"\nz = {"av_performer": 1}\ndef f():\n    "full and performer"\n'
    assert [line for line, _ in variant_names_in(src)] == [1, 2, 3]
    assert not variant_names_in('a = "performer-pytorch"\nb = "full attention"\nc = "sliding_window_mask"\n')


def test_bench_names_no_variant() -> None:
    found = []
    for path in sorted(BENCH.rglob("*.py")):
        rel = path.relative_to(BENCH).as_posix()
        if rel in ALLOWED:
            continue
        found += [f"{rel}:{line}: {text[:80]!r}" for line, text in variant_names_in(path.read_text())]
    assert not found, "bench/ names variants (ask the registry instead):\n" + "\n".join(found)
