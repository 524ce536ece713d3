"""``attn-bench tune``'s command: its options parsed and checked, the plan made, the tuner run
(:func:`attn_bench.device.tune.tune`) and the table written."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from attn_bench.core.plugins import load_plugins
from attn_bench.device.tune import CudaRunner, tune
from attn_bench.device.tune_keys import (
    DEFAULT_DTYPES,
    DEFAULT_HEAD_DIMS,
    DEFAULT_NS,
    DTYPES,
    FAVOR_KERNELS,
    FLASH_KERNELS,
    KERNELS,
    plan,
)
from attn_kernels import tuning


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma list of positive ints, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{name} must be a comma list of positive ints, got {text!r}")
    return vals


def parse_args(kernels: str | None, dtypes: str, n: str, head_dims: str) -> dict:
    """The :func:`plan` arguments from the command line's comma lists; ValueError names the option.
    ``kernels`` may name families (``flash``, ``favor``) as well as kernels."""
    names: list[str] = []
    for x in (kernels or "flash,favor").split(","):
        x = x.strip()
        if not x:
            continue
        fam = {"flash": FLASH_KERNELS, "favor": FAVOR_KERNELS}.get(x)  # favor: both implementations and the switch
        if fam is None and x not in KERNELS:
            raise ValueError(f"--kernels: unknown kernel {x!r}; choose from flash, favor, {', '.join(KERNELS)}")
        names.extend(fam or (x,))
    dts = []
    for x in dtypes.split(","):
        if x.strip() and x.strip() not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {x.strip()!r}; choose from {', '.join(DTYPES)}")
        if x.strip():
            dts.append(DTYPES[x.strip()])
    if not names or not dts:
        raise ValueError("--kernels and --dtypes must name at least one each")
    return {
        "kernels": list(dict.fromkeys(names)),
        "dtypes": dts,
        "ns": _ints(n, "--n"),
        "head_dims": _ints(head_dims, "--head-dims"),
    }


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "not importable"
    return out


def main(
    budget_s: float,
    out: Path,
    *,
    kernels: str | None = None,
    dtypes: str = ",".join(DEFAULT_DTYPES),
    n: str = ",".join(map(str, DEFAULT_NS)),
    head_dims: str = ",".join(map(str, DEFAULT_HEAD_DIMS)),
    install: bool = False,
    retune: bool = False,
    plugins: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> int:
    """``attn-bench tune``: 0 when the table was written, 1 when no key could be tuned, 2 without
    CUDA (nothing is measured then) or for a bad argument (a plug-in that does not import)."""
    try:
        load_plugins(list(plugins))  # a PluginError is a ValueError
        args = parse_args(kernels, dtypes, n, head_dims)
        if not 0 < budget_s < float("inf"):
            raise ValueError(f"--budget-s must be a positive number of seconds, got {budget_s:g}")
    except ValueError as exc:
        echo(f"attn-bench tune: {exc}")
        return 2
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none"
        echo(f"attn-bench tune: needs a CUDA device (torch {torch.__version__}, CUDA build {build}); nothing tuned")
        return 2
    keys = plan(**args)
    card = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    out_dirs = [Path(out)] + ([tuning.PACKAGE_DIR] if install else [])
    previous = None
    for d in (Path(out), *tuning.table_dirs()):
        path = tuning.find_table(card, [d])
        if path is not None:
            try:
                previous = tuning.Table.read(path)
                echo(f"tune: starting from {path}")
                break
            except (OSError, ValueError) as exc:
                echo(f"tune: ignoring unreadable table {path}: {exc}")
    meta = {"capability": f"{cap[0]}.{cap[1]}", "versions": _versions(), "created": time.strftime("%Y-%m-%d %H:%M %Z")}
    dirs = ", ".join(map(str, out_dirs))
    echo(f"tune: {card} (sm_{cap[0]}{cap[1]}), {len(keys)} keys, budget {budget_s:.0f} s -> {dirs}")
    run = tune(
        keys, CudaRunner(), card=card, capability=cap, budget_s=budget_s, out_dirs=out_dirs, table=previous,
        meta=meta, retune=retune, echo=echo,
    )  # fmt: skip
    for key, why in run.failed:
        echo(f"tune: FAILED {key}: {why}")
    if not run.paths:
        echo("tune: no table written (no key tuned)")
        return 1
    echo(f"tune: {len(run.tuned)} key(s) tuned, {len(run.fresh)} kept; table: {', '.join(map(str, run.paths))}")
    return 0


__all__ = ["main", "parse_args"]
