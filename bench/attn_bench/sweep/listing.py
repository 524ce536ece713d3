"""``attn-bench list``: the variants x backends available on a device (or why not), the baselines
and peers, the passes and the sweep presets, as rich tables."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from attn_bench.core.config import PASSES, all_backends, expand, load_presets, parse_device
from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import load_plugins
from attn_bench.sweep.command import GPU_PRESET, default_preset


def list_command(device: str = "cpu", plugin: list[str] | None = None, echo: Any = print) -> None:
    """Print what can run on ``device`` (float32, head dim 64) and the presets through ``echo``
    (a rich console's ``print``: it is given tables)."""
    import torch

    import attention_variants as av
    from attn_bench.baselines import baseline_names, get_baseline, unsupported_reason

    load_plugins(plugin)
    try:
        parse_device(device)
    except ValueError as exc:
        raise RunSetupError("--device", str(exc)) from None
    dev = torch.device(device)
    table = Table(title=f"variants x backends on {device} (float32, head dim 64)")
    for col in ("variant", "options", "backend", "available here"):
        table.add_column(col, overflow="fold")
    for name in av.list_variants():
        var = av.get_variant(name, **av.variant_class(name).sweep_defaults())
        for i, b in enumerate(all_backends()):
            if b == "auto":
                q = torch.zeros(1, 1, 1, 64, device=dev) if dev.type == "cpu" or torch.cuda.is_available() else None
                cell = f"yes: runs {var.resolve_backend('auto', q)}" if q is not None else "no: no such device"
            else:
                reason = unsupported_reason(var, b, dev, torch.float32, 64)
                cell = "[green]yes[/]" if reason is None else f"[dim]no: {escape(reason)}[/]"
            opts = ", ".join(type(var).option_names()) if i == 0 else ""
            table.add_row(name if i == 0 else "", opts, b, cell)
    echo(table)
    for name in baseline_names():
        echo(f"{name}: {escape(get_baseline(name).description)}")
    echo(f"passes: {', '.join(PASSES)}")
    pt = Table(title="presets (bench/attn_bench/sweep/presets.toml)")
    pt.add_column("preset")
    pt.add_column("configs", justify="right")
    pt.add_column("description", overflow="fold")
    default, _ = default_preset()
    for name, p in load_presets().items():
        tag = " (default here)" if name == default else " (default with CUDA)" if name == GPU_PRESET else ""
        pt.add_row(name + tag, str(len(expand(p.groups))), p.description)
    echo(pt)
