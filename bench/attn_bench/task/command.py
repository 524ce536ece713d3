"""``attn-bench task``, ``long`` and ``swap`` as one function: options checked, the preset's runs
through :func:`attn_bench.task.run.run_tasks`, then the report."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import (
    Echo,
    JobExit,
    check_out,
    choose_preset,
    command_line,
    exclusive,
    exit_if_all_failed,
    load_plugins,
    positive,
    resumed_spec,
    run_dir,
    values,
)
from attn_bench.core.variants import check_names, preflight

Presets = dict[str, Any] | Callable[[list[str] | None], dict[str, Any]]


def preflight_configs(configs: list[Any]) -> None:
    """The pre-flight gate (:func:`attn_bench.core.variants.preflight`) of every variant and option
    set the runs use, causal and not as they need it; runs their variant cannot do are skipped
    (they become ``unsupported`` rows)."""
    from attn_bench.task.run import _variant_options

    todo: dict[tuple, tuple[str, dict, str, set[bool]]] = {}
    for cfg in configs:
        if cfg.unsupported() is not None:
            continue
        for variant, need in cfg.needs():
            if need not in ("causal", "non_causal"):
                continue
            opts = _variant_options(cfg) if variant == cfg.variant else {}
            key = (variant, repr(sorted(opts.items())), cfg.device)
            todo.setdefault(key, (variant, opts, cfg.device, set()))[3].add(need == "causal")
    for variant, opts, device, causal in todo.values():
        preflight(variant, opts, sorted(causal), device=device)


def train_study(
    *,
    kind: str,
    default: str,
    presets: Presets,
    write_report: Callable[[Path], Path],
    preset: str | None = None,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    timeout: float | None = None,
    plugin: list[str] | None = None,
    variants: str | None = None,
    report: bool = True,
    progress: bool = True,
    extra_meta: dict | None = None,
    echo: Echo = print,
    **run_kw: Any,
) -> None:
    """Run preset ``preset`` (default ``default``) of the ``kind`` study into ``out`` and report it
    with ``write_report``; ``run_kw`` goes to :func:`~attn_bench.task.run.run_tasks` (the row job
    and result class), ``extra_meta`` to ``metadata.json``. ``presets``: the presets, or a function
    of ``variants`` (a comma list that replaces the presets' variants) that returns them. Every
    variant passes the pre-flight gate before anything is written."""
    from attn_bench.task.run import RESULTS, run_tasks

    exclusive(resume, overwrite)
    positive(timeout, "--timeout")
    if out is not None:
        check_out(out)
    # What decides the runs: stored in metadata.json, so that `--resume` alone reproduces it.
    spec = {"preset": preset, "plugins": list(load_plugins(plugin)), "timeout": timeout, "variants": variants}
    if resume:
        spec = resumed_spec(out, spec, key=f"{kind}_run", kind=kind)
    spec["preset"] = spec["preset"] or default
    plugins = load_plugins(spec["plugins"])
    names = values(spec.get("variants"), "--variants", str)
    if names is not None:
        check_names(names)
        if not callable(presets):
            raise RunSetupError("--variants", f"attn-bench {kind} takes no --variants here")
    p = choose_preset(spec["preset"], presets(names) if callable(presets) else presets)
    out = run_dir(out, spec["preset"], RESULTS, resume, overwrite, "replace it")
    from attn_bench.core.results import cuda_problem

    problem = cuda_problem(c.device for c in p.configs)
    if problem is not None:
        raise RunSetupError("--preset", f"preset {spec['preset']!r}: {problem}")
    preflight_configs(list(p.configs))
    settings = dataclasses.replace(p.settings, plugins=plugins)
    if spec["timeout"] is not None:
        settings = dataclasses.replace(settings, timeout_s=spec["timeout"])
    from attn_bench.core.machine import machine_metadata

    devices = {c.device for c in p.configs}
    meta = {**machine_metadata(next(iter(devices))), "preset": spec["preset"], "description": p.description}
    meta["command"] = shlex.join(["attn-bench", *sys.argv[1:]])
    meta[f"{kind}_run"] = spec
    meta.update(extra_meta or {})
    t0 = time.perf_counter()
    try:
        rows = run_tasks(
            list(p.configs), out, settings, resume=resume, meta=meta, progress=progress, kind=kind, **run_kw
        )
    except KeyboardInterrupt:
        again = command_line(kind, "--out", str(out), "--resume")
        message = f"Interrupted; finished runs are in {out / RESULTS}; continue with: {again}"
        raise JobExit(message, 130, "yellow") from None
    ok = sum(r.status == "ok" for r in rows)
    echo(f"{ok}/{len(rows)} runs ok in {time.perf_counter() - t0:.0f} s: {out / RESULTS}")
    if report:
        echo(f"Report: [bold]{write_report(out)}[/]")
    exit_if_all_failed([r.status for r in rows])
