"""``attn-bench cp`` as a function: the options parsed and checked (each refusal a
:class:`~attn_bench.core.results.RunSetupError` naming the option), the rows run on gloo (or
NCCL) ranks, the report written; exit 1 when no row ran ok."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape

from attn_bench.core.config import ConfigError, parse_bool, parse_count, parse_option, sweep_options
from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import Echo, check_out, exit_if_all_failed, load_plugins, status_summary, values

# The option behind each field of a row (attn_bench.cp.run.CPConfig).
OPTION_OF = {
    "variant": "--variants",
    "layout": "--layouts",
    "causal": "--causal",
    "world": "--ranks",
    "n_total": "--n",
    "kv_heads": "--kv-heads",
    "head_dim": "--head-dim",
}


def variant_options(given: dict[str, Any]) -> dict[str, int]:
    """The variants' sweep options given (``window=64`` ...; None: not given), each a non-negative
    int that every variant declaring it accepts; RunSetupError naming the option otherwise."""
    import attention_variants as av

    out = {}
    for o in sweep_options():
        value = given.get(o.name)
        if value is None:
            continue
        option = "--" + o.name.replace("_", "-")
        try:
            out[o.name] = parse_option(value)
            for v in av.list_variants():
                cls = av.variant_class(v)
                if o.name in {x.name for x in cls.sweep_options}:
                    cls(**{**cls.sweep_defaults(), o.name: out[o.name]})
        except (TypeError, ValueError) as exc:
            raise RunSetupError(option, str(exc)) from None
    return out


def cp_command(
    *,
    ranks: str = "1,2,4",
    n: str = "4096",
    variants: str | None = None,
    layouts: str = "contiguous,zigzag",
    causal: str = "true,false",
    repeats: int = 5,
    threads: int = 1,
    timeout: float = 600.0,
    out: Path = Path("reports/cp-quick"),
    plugin: list[str] | None = None,
    echo: Echo = print,
    **shape: Any,
) -> None:
    """Run the cross product of the comma lists (``variants``: default every registered variant;
    ``shape``: batch, heads, kv_heads, head_dim, dtype, device, and the variants' sweep options
    such as window or num_features, each a single value) and write ``out``'s CSV and report.
    Every variant passes the pre-flight gate first."""
    import attention_variants as av
    from attn_bench.core.variants import check_names, preflight
    from attn_bench.cp.run import check_run_options, expand, run_cp

    check_run_options(repeats, threads, timeout)
    check_out(out)
    plugins = load_plugins(plugin)
    vs = check_names(values(variants, "--variants", str) or av.list_variants())
    opts = variant_options({o.name: shape.pop(o.name, None) for o in sweep_options()})
    try:
        configs = expand(
            values(ranks, "--ranks", parse_count), values(n, "--n", parse_count), vs,
            values(layouts, "--layouts", str), values(causal, "--causal", parse_bool), options=opts, **shape,
        )  # fmt: skip
    except RunSetupError:
        raise
    except ConfigError as exc:
        raise RunSetupError(OPTION_OF.get(exc.key, "--" + exc.key.replace("_", "-")), str(exc)) from None
    except ValueError as exc:  # check_device: the message names --device or --dtype
        raise RunSetupError("--dtype" if "--dtype" in str(exc) else "--device", str(exc)) from None
    gated: dict[tuple, set[bool]] = {}
    for c in configs:
        if c.causal in av.variant_class(c.variant).causal_modes:  # the others are unsupported rows
            gated.setdefault((c.variant, c.options, c.device), set()).add(c.causal)
    for (v, o, device), cs in gated.items():
        preflight(v, json.loads(o), sorted(cs), device="cuda" if device == "cuda" else "cpu")
    echo(f"[bold]attn-bench cp[/]: {len(configs)} rows -> {out}")
    df = run_cp(
        configs, out, repeats=repeats, threads=threads, timeout_s=timeout, plugins=plugins,
        echo=lambda line: echo(escape(line)),
    )  # fmt: skip
    statuses = [str(s) for s in df["status"]] if len(df) else []
    echo(f"{status_summary(statuses)}; report in {out}")
    exit_if_all_failed(statuses)
