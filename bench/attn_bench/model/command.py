"""``attn-bench model`` as a function: options checked, rows expanded from a preset, run, reported."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from attn_bench.core.config import parse_device
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
    status_summary,
    values,
)

LIST_OPTIONS = ("archs", "impls", "seq_lens", "passes")


def model_overrides(options: dict[str, Any], known: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Preset-group overrides from the options (``known``: option -> (group key, parser)), each checked."""
    from attn_bench.model.config import ARCHS, MODEL_DTYPES, MODEL_PASSES, impls

    allowed = {"archs": ARCHS, "impls": impls(), "passes": MODEL_PASSES, "dtype": MODEL_DTYPES}
    out: dict[str, Any] = {}
    for name, value in options.items():
        key, conv = known[name]
        option = "--" + name.replace("_", "-")
        given = values(value, option, conv) if name in LIST_OPTIONS else [value]
        for x in given:
            if name in allowed and x not in allowed[name]:
                raise RunSetupError(option, f"{x!r} is not one of {', '.join(allowed[name])}")
            if name == "device":
                try:
                    parse_device(x)
                except ValueError as exc:
                    raise RunSetupError(option, str(exc)) from None
            if conv is int and x < 1:
                raise RunSetupError(option, f"must be a positive integer, got {x}")
        out[key] = given if name in LIST_OPTIONS else given[0]
    return out


def preflight_models(configs: list[Any]) -> None:
    """The pre-flight gate of the variant of every ``av_*`` row that can run, causal for Llama and
    bidirectional for BERT (:func:`attn_bench.core.variants.preflight`)."""
    from attn_bench.core.variants import preflight
    from attn_bench.model.config import ARCH_NEEDS, impl_variant, unsupported_reason

    todo: dict[tuple, set[bool]] = {}
    for cfg in configs:
        variant = impl_variant(cfg.impl)
        if variant is not None and unsupported_reason(cfg) is None:
            todo.setdefault((variant, cfg.options, cfg.device), set()).add(ARCH_NEEDS[cfg.arch] == "causal")
    for (variant, options, device), causal in todo.items():
        preflight(variant, dict(options), sorted(causal), device=device)


def model_command(
    *,
    preset: str | None = None,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    timeout: float | None = None,
    budget_s: float | None = None,
    plugin: list[str] | None = None,
    report: bool = True,
    progress: bool = True,
    echo: Echo = print,
    **options: Any,
) -> None:
    """Run a model preset into ``out``; ``options`` (``archs="llama"``, ``seq_lens="256,512"``,
    ``layers=2``, a variant's sweep option such as ``window=64`` ...) override its groups;
    ``plugin``: modules or files that register variants (``av_<name>`` implementations)."""
    from attn_bench.model.config import OVERRIDES, RESULTS, expand_model_groups, load_model_presets, option_keys
    from attn_bench.model.run import run_models

    exclusive(resume, overwrite)
    if resume and out is None:
        raise RunSetupError("--resume", "needs --out (the run to continue)")
    positive(timeout, "--timeout")
    positive(budget_s, "--budget-s")
    spec = {
        "preset": preset,
        "options": {k: v for k, v in options.items() if v is not None},
        "plugins": list(load_plugins(plugin)),
    }
    if out is not None:
        check_out(out)
    if resume:
        spec = resumed_spec(out, spec, key="model_run", kind="model")
    spec["preset"] = spec["preset"] or "model-quick"
    plugins = load_plugins(spec.get("plugins"))
    p = choose_preset(spec["preset"], load_model_presets())
    overrides = model_overrides(spec["options"], {**OVERRIDES, **{k: (k, int) for k in option_keys()}})
    try:
        configs = expand_model_groups(p.groups, overrides)
    except ValueError as exc:
        raise RunSetupError(None, str(exc)) from None
    out = run_dir(out, spec["preset"], RESULTS, resume, overwrite, "replace it")
    from attn_bench.core.results import cuda_problem

    problem = cuda_problem(c.device for c in configs)
    if problem is not None:  # refused before the results of a run being replaced are removed
        raise RunSetupError("--device", problem)
    preflight_models(configs)
    if overwrite:
        (out / RESULTS).unlink(missing_ok=True)
    settings = dataclasses.replace(p.settings, plugins=plugins)
    if timeout is not None:
        settings = dataclasses.replace(settings, timeout_s=timeout)
    from attn_bench.core.machine import machine_metadata

    meta = {**machine_metadata(configs[0].device), "preset": spec["preset"], "description": p.description}
    meta["command"] = shlex.join(["attn-bench", *sys.argv[1:]])
    meta["model_run"] = spec
    import transformers

    meta["transformers"] = transformers.__version__
    budget = budget_s if budget_s is not None else p.budget_s
    echo(f"[bold]attn-bench model[/] preset [cyan]{spec['preset']}[/]: {len(configs)} rows -> {out}")
    t0 = time.perf_counter()
    try:
        rows = run_models(configs, out, settings, resume=resume, meta=meta, progress=progress, budget_s=budget)
    except KeyboardInterrupt:
        again = command_line("model", "--out", str(out), "--resume")
        raise JobExit(
            f"Interrupted; finished rows are in {out / RESULTS}; continue with: {again}", 130, "yellow"
        ) from None
    echo(
        f"Done in {time.perf_counter() - t0:.0f} s: {status_summary(r.status for r in rows)}. Results: {out / RESULTS}"
    )
    if report:
        from attn_bench.model.report import write_model_report

        echo(f"Report: [bold]{write_model_report(out)}[/]")
    exit_if_all_failed([r.status for r in rows])
