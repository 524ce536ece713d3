"""``attn-bench kernels`` as a function: the options checked, every kernel compiled (progress on
stderr), ``kernels.csv`` and ``README.md`` written to the output folder."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape

from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import Echo, JobExit, split
from attn_bench.kernels.report import CSV, README, markdown_table, write_report


def _arch(text: str) -> int:
    from attn_kernels.static_report import ARCHS

    names = {f"sm_{a}": a for a in ARCHS}
    if text not in names:
        raise RunSetupError("--arch", f"must be one of {', '.join(names)}, got {text!r}")
    return names[text]


def _out_problem(out: Path) -> str | None:
    """Why ``out`` cannot take the report: it must be new, empty or an earlier kernel report's folder."""
    if str(out) in ("", "."):
        return "give a folder for the report (not the current directory)"
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a directory"
    if out.is_dir():
        entries = [e.name for e in out.iterdir() if not e.name.startswith(".")]
        if entries and CSV not in entries:
            return f"{out} holds files a kernel report did not write ({', '.join(sorted(entries)[:5])})"
    return None


def check_options(arch: str, dtype: str, head_dim: int, kernels: str | None, out: Path) -> tuple:
    """``(arch, torch dtype, kernels list or None)`` from the options; RunSetupError names a bad one."""
    from attn_kernels.static_report import DTYPES, FAMILIES, kernel_names

    sm = _arch(arch)
    if dtype not in DTYPES:
        raise RunSetupError("--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not 1 <= head_dim <= 256:
        raise RunSetupError("--head-dim", f"must be in 1..256, got {head_dim}")
    wanted = split(kernels)
    if wanted is not None:
        known = [*FAMILIES, *kernel_names()]
        bad = [k for k in wanted if k not in known]
        if bad or not wanted:
            raise RunSetupError("--kernels", f"unknown {', '.join(bad) or 'empty list'}; use {', '.join(known)}")
    problem = _out_problem(out)
    if problem is not None:
        raise RunSetupError("--out", problem)
    return sm, DTYPES[dtype], wanted


def _tools(sm: int) -> dict[str, str]:
    """The versions for the header; exit 2 with what to do when ptxas or cuobjdump is missing, and
    refuse an arch this ptxas cannot build."""
    import subprocess

    from attn_kernels import aot
    from attn_kernels.static_report import versions

    try:
        found = versions(sm)
    except aot.ToolMissing as exc:
        raise JobExit(escape(f"attn-bench kernels needs Triton's NVIDIA tools: {exc}"), 2) from None
    ptxas, _ = aot.tool("ptxas", sm)
    listing = subprocess.run([ptxas, "--help"], capture_output=True, text=True, check=False).stdout
    if f"sm_{sm}" not in listing:
        raise RunSetupError("--arch", f"the installed Triton's {found['ptxas']} cannot build sm_{sm}")
    return found


def kernels_command(
    *,
    arch: str = "sm_90",
    dtype: str = "bfloat16",
    head_dim: int = 128,
    causal: bool = False,
    candidates: bool = False,
    kernels: str | None = None,
    out: Path | None = None,
    echo: Echo = print,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, object]]:
    """Compile the kernels for ``arch`` (``sm_80``, ``sm_90``, ``sm_100``) at ``dtype`` and ``head_dim``
    and write ``out``'s ``kernels.csv`` and ``README.md``; returns the rows. ``progress`` gets a line
    per compile (default: stderr); ``echo`` the table and where it went."""
    out = out if out is not None else Path(f"runs/kernels-{arch}-{dtype}-d{head_dim}{'-causal' if causal else ''}")
    sm, torch_dtype, wanted = check_options(arch, dtype, head_dim, kernels, out)
    found = _tools(sm)
    from attn_kernels.static_report import kernel_report, kernel_specs

    specs, notes = kernel_specs(sm, torch_dtype, head_dim, causal=causal, candidates=candidates, kernels=wanted)
    if progress is None:
        progress = lambda line: print(line, file=sys.stderr, flush=True)
    progress(f"attn-bench kernels: {len(specs)} compiles for {arch} ({found['ptxas']}, Triton {found['triton']})")
    rows = kernel_report(specs, sm, torch_dtype, head_dim, causal, progress=progress)
    options = dict(arch=arch, dtype=dtype, head_dim=head_dim, causal=causal, candidates=candidates, kernels=kernels)
    write_report(rows, out, options=options, versions=found, notes=notes)
    echo(escape(markdown_table(rows)))
    failed = sum(r["status"] != "ok" for r in rows)
    echo(escape(f"{len(rows) - failed} kernels compiled, {failed} failed; {out / CSV} and {out / README}"))
    return rows
