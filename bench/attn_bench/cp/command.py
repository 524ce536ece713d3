"""``attn-bench cp`` as a function: the options parsed and checked (each refusal a
:class:`~attn_bench.core.results.RunSetupError` naming the option), the rows run on gloo (or
NCCL) ranks, the report written; exit 1 when no row ran ok."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from attn_bench.core.config import ConfigError, parse_bool, parse_count
from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import Echo, check_out, exit_if_all_failed, status_summary, values

# The option behind each field of a row (attn_bench.cp.run.CPConfig).
OPTION_OF = {
    "variant": "--variants",
    "layout": "--layouts",
    "causal": "--causal",
    "world": "--ranks",
    "n_total": "--n",
    "kv_heads": "--kv-heads",
    "head_dim": "--head-dim",
    "num_features": "--num-features",
}


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
    from attn_bench.cp.run import VARIANT_OPTIONS, check_run_options, expand, run_cp

    check_run_options(repeats, threads, timeout)
    check_out(out)
    vs = values(variants, "--variants", str)
    bad = [v for v in vs if v not in VARIANT_OPTIONS]
    if bad:
        raise RunSetupError(
            "--variants", f"unknown variant(s) {', '.join(bad)}; context parallelism runs {', '.join(VARIANT_OPTIONS)}"
        )
    try:
        configs = expand(
            values(ranks, "--ranks", parse_count), values(n, "--n", parse_count), vs,
            values(layouts, "--layouts", str), values(causal, "--causal", parse_bool), **shape,
        )  # fmt: skip
    except RunSetupError:
        raise
    except ConfigError as exc:
        raise RunSetupError(OPTION_OF.get(exc.key, "--" + exc.key.replace("_", "-")), str(exc)) from None
    except ValueError as exc:  # check_device: the message names --device or --dtype
        raise RunSetupError("--dtype" if "--dtype" in str(exc) else "--device", str(exc)) from None
    echo(f"[bold]attn-bench cp[/]: {len(configs)} rows -> {out}")
    df = run_cp(configs, out, repeats=repeats, threads=threads, timeout_s=timeout, echo=lambda line: echo(escape(line)))
    statuses = [str(s) for s in df["status"]] if len(df) else []
    echo(f"{status_summary(statuses)}; report in {out}")
    exit_if_all_failed(statuses)
