"""``attn-bench cp`` as a function: the comma lists parsed and checked, the rows run on gloo (or
NCCL) ranks, the report written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from attn_bench.core.config import parse_bool
from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import Echo, split, values


def cp_command(
    *,
    ranks: str = "1,2,4",
    n: str = "4096",
    variants: str = "full,sliding_window,performer",
    layouts: str = "contiguous,zigzag",
    causal: str = "true,false",
    repeats: int = 5,
    threads: int = 1,
    timeout: float = 600.0,
    out: Path = Path("reports/cp-quick"),
    echo: Echo = print,
    **shape: Any,
) -> None:
    """Run the cross product of the comma lists (``shape``: batch, heads, kv_heads, head_dim, dtype,
    window, num_features, device) and write ``out``'s CSV and report."""
    import attention_variants as av
    from attn_bench.cp.run import expand, run_cp

    try:
        vs = split(variants)
        bad = [v for v in vs if v not in av.list_variants()]
        if bad:
            raise ValueError(f"unknown variant(s) {', '.join(bad)}; variants are {', '.join(av.list_variants())}")
        configs = expand(
            values(ranks, "--ranks", int), values(n, "--n", int), vs, split(layouts),
            [parse_bool(c) for c in split(causal)], **shape,
        )  # fmt: skip
    except RunSetupError:
        raise
    except ValueError as exc:
        raise RunSetupError(None, str(exc)) from None
    echo(f"[bold]attn-bench cp[/]: {len(configs)} rows -> {out}")
    df = run_cp(configs, out, repeats=repeats, threads=threads, timeout_s=timeout, echo=lambda line: echo(escape(line)))
    bad_rows = df[df["status"] != "ok"]
    echo(f"{len(df) - len(bad_rows)} rows ok, {len(bad_rows)} not; report in {out}")
