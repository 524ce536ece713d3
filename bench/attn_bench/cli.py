"""``attn-bench``: sweeps, reports, the numerics gate, the GPU check, and listings.

With no subcommand, ``attn-bench`` runs the default preset (``gpu-quick`` where CUDA is
available, ``cpu-quick`` otherwise) into ``runs/<preset>-<date>-<time>`` and writes its report there.
"""

from __future__ import annotations

import inspect
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attn_bench.core.config import (
    PASSES,
    ConfigError,
    RunSettings,
    all_backends,
    config_fields,
    expand,
    load_presets,
    name_problems,
    parse_bool,
    parse_device,
    parse_option,
    sweep_options,
    validate_names,
)

DEFAULT_PRESET = "cpu-quick"
GPU_PRESET = "gpu-quick"


def default_preset() -> tuple[str, str]:
    """``(preset, why)``: ``gpu-quick`` when CUDA is available, else ``cpu-quick``."""
    import torch

    if torch.cuda.is_available():
        return GPU_PRESET, f"CUDA is available ({torch.cuda.get_device_name(0)})"
    why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
    return DEFAULT_PRESET, f"{why}; on a GPU the default is {GPU_PRESET}"


app = typer.Typer(
    help="Benchmark full, sliding-window and Performer attention: sweeps, reports, numerics.",
    add_completion=False,
    no_args_is_help=False,
    invoke_without_command=True,
)
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for the tables
    console.width = 160


def _split(text: str | None, conv=str) -> list | None:
    if text is None:
        return None
    return [conv(x.strip()) for x in text.split(",") if x.strip()]


def _values(text: str | None, option: str, parse) -> list | None:
    """A comma list of one option, each value parsed; exit 2 naming the option on a bad value."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise typer.BadParameter("needs at least one value", param_hint=option)
    try:
        return [parse(x) for x in items]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


PLUGIN_HELP = "a module name or a .py file that registers variants or backends (repeat for several)"


def load_plugins(specs: list[str] | None) -> tuple[str, ...]:
    """Import each plug-in; exit 2 naming ``--plugin`` if one cannot be imported. Returns the specs
    as the worker processes import them (files as absolute paths)."""
    from attn_bench.core.plugins import PluginError, load_plugin

    out = []
    for spec in specs or []:
        try:
            out.append(load_plugin(spec))
        except PluginError as exc:
            raise typer.BadParameter(str(exc), param_hint="--plugin") from None
    return tuple(out)


@app.callback()
def _root(ctx: typer.Context) -> None:
    """With no subcommand: run the default sweep (gpu-quick with CUDA, else cpu-quick) and write its report."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(_sweep_command())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_parameters() -> list[inspect.Parameter]:
    """``attn-bench sweep`` options derived from the config declarations (bench/attn_bench/config.py) and from
    every registered variant's sweep options: each takes a comma list and replaces that key in
    every group of the preset."""
    params = []
    for f in config_fields():
        key = f.metadata["group"]
        if f.metadata["parse"] is parse_bool:
            opt = typer.Option(f"{_flag(key)}/--no-{key.replace('_', '-')}", help=f"only {key} / only not {key}")
            params.append(inspect.Parameter(key, KW, default=None, annotation=Annotated[bool | None, opt]))
            continue
        decls = [_flag(key), *([_flag(f.metadata["alias"])] if f.metadata["alias"] else [])]
        opt = typer.Option(*decls, help=f.metadata["help"])
        params.append(inspect.Parameter(key, KW, default=None, annotation=Annotated[str | None, opt]))
    for o in sweep_options():
        opt = typer.Option(_flag(o.name), help=f"comma list: {o.help} (variants that take `{o.name}`)")
        params.append(inspect.Parameter(o.name, KW, default=None, annotation=Annotated[str | None, opt]))
    return params


KW = inspect.Parameter.KEYWORD_ONLY


def _overrides(values: dict) -> dict:
    """Preset-group overrides from the generated options, each value parsed and validated."""
    overrides: dict = {}
    for f in config_fields():
        key = f.metadata["group"]
        if values.get(key) is None:
            continue
        if f.metadata["parse"] is parse_bool:
            overrides[key] = [values[key]]
        else:
            overrides[key] = _values(values[key], _flag(key), f.metadata["parse"])
    for o in sweep_options():
        if values.get(o.name) is not None:
            overrides[o.name] = _values(values[o.name], _flag(o.name), parse_option)
    names = {k: overrides.get(k) or [] for k in ("variants", "backends", "passes", "dtypes")}
    for key, message in name_problems(names["variants"], names["backends"], names["passes"], names["dtypes"]):
        raise typer.BadParameter(message, param_hint=_flag(key))
    return overrides


def _positive(value: float | None, option: str) -> None:
    if value is not None and not (value > 0 and value < float("inf")):
        raise typer.BadParameter(f"must be a positive number of seconds or GB, got {value:g}", param_hint=option)


def _sweep(
    preset: Annotated[
        str | None,
        typer.Option(help="presets.toml name (`attn-bench list`) [default: gpu-quick with CUDA, else cpu-quick]"),
    ] = None,
    preset_file: Annotated[Path | None, typer.Option(help="presets TOML to read instead of the shipped one")] = None,
    plugin: Annotated[list[str] | None, typer.Option(help=PLUGIN_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="output directory [default: runs/<preset>-<date>-<time>]")] = None,
    resume: Annotated[bool, typer.Option(help="skip configs already in DIR/results.csv")] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="with --resume: run again the configs whose rows are timeout, oom or error")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="start afresh even if DIR/results.csv exists")] = False,
    timeout: Annotated[float | None, typer.Option(help="per-config timeout in seconds")] = None,
    min_run_time: Annotated[float | None, typer.Option(help="seconds per torch.utils.benchmark block (CPU)")] = None,
    mem_limit_gb: Annotated[float | None, typer.Option(help="dense N x N work above this is not run (oom)")] = None,
    accuracy: Annotated[bool, typer.Option(help="run the preset's Performer accuracy study")] = True,
    report: Annotated[bool, typer.Option(help="write the report (plots + README.md) when done")] = True,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
    budget_s: Annotated[
        float | None, typer.Option(help="seconds for the whole sweep; configs not started in time are rows 'skipped'")
    ] = None,
    **fields: Any,
) -> None:
    """Run a sweep: results.csv + metadata.json in the output directory, then the report.

    The config options (--variants ... --device) and the variants' own sweep options (--window,
    --num-features, a plug-in's) each take a comma list that replaces that key in every group of
    the preset; they are derived from the config declarations and the variant registry."""
    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in --out, --overwrite replaces it: pass one")
    if retry_failed and not resume:
        raise typer.BadParameter("needs --resume", param_hint="--retry-failed")
    if budget_s is not None and budget_s <= 0:
        raise typer.BadParameter(f"must be positive, got {budget_s:g}", param_hint="--budget-s")
    _positive(timeout, "--timeout")
    _positive(min_run_time, "--min-run-time")
    _positive(mem_limit_gb, "--mem-limit-gb")
    if out is not None:
        _check_out(out)
    # What decides the configs: stored in metadata.json, so that `--resume` alone reproduces it.
    spec = {
        "preset": preset,
        "preset_file": None if preset_file is None else str(preset_file.resolve()),
        "plugins": list(load_plugins(plugin)),
        "options": {k: v for k, v in fields.items() if v is not None},
    }
    if resume:
        spec = _resumed_spec(out, spec)
    plugins = load_plugins(spec["plugins"])
    preset_path = None if spec["preset_file"] is None else Path(spec["preset_file"])
    if preset_path is not None and not preset_path.is_file():
        raise typer.BadParameter(f"{preset_path} is not a readable file", param_hint="--preset-file")
    try:
        presets = load_presets(preset_path.read_text() if preset_path else None)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset-file" if preset_path else "--preset") from None
    preset = spec["preset"]
    if preset is None:
        preset, why = default_preset()
        spec["preset"] = preset
        console.print(f"preset [cyan]{preset}[/] (the default here: {why})")
    if preset not in presets:
        raise typer.BadParameter(f"unknown preset {preset!r}; presets are {', '.join(presets)}", param_hint="--preset")
    p = presets[preset]
    overrides = _overrides(spec["options"])
    if overrides.get("seq_lens"):  # explicit lengths override the preset's per-backend caps too
        overrides["max_seq_len"] = {}
    try:
        configs = expand(p.groups, overrides)
    except ConfigError as exc:
        # The option given that made the row (heads with the preset's kv_heads, say), else the preset.
        keys = [k for k in (exc.key, *(["heads"] if exc.key == "kv_heads" else [])) if k in overrides]
        where = "" if keys else f" (from preset {preset!r})"
        raise typer.BadParameter(f"{exc}{where}", param_hint=_flag(keys[0]) if keys else "--preset") from None
    if not configs:
        raise typer.BadParameter(f"preset {preset!r} with these options gives no configs to run", param_hint="--preset")
    settings = p.settings
    changes = {"timeout_s": timeout, "min_run_time": min_run_time, "mem_limit_gb": mem_limit_gb, "plugins": plugins}
    settings = RunSettings(**{**settings.__dict__, **{k: v for k, v in changes.items() if v is not None}})
    # A fresh directory by default, so a run never collides with an earlier one or a committed report.
    out = out or Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(out)
    results_path = out / "results.csv"
    if results_path.exists() and not (resume or overwrite):
        console.print(f"[red]{results_path} exists: pass --resume to continue it or --overwrite to start afresh")
        raise typer.Exit(2)
    from attn_bench.core.results import cuda_problem

    problem = cuda_problem(c.device for c in configs)
    if problem is not None:  # refused before the results of a run being replaced are removed
        raise typer.BadParameter(problem, param_hint="--device")
    if overwrite and results_path.exists():
        results_path.unlink()
        for name in ("performer_accuracy.csv",):
            (out / name).unlink(missing_ok=True)
    from attn_bench.core.machine import machine_metadata, now
    from attn_bench.core.results import ResultsFileError, RunSetupError
    from attn_bench.core.worker import WorkerStartError
    from attn_bench.sweep.run import run_sweep

    dev = configs[0].device if configs else "cpu"
    meta = {
        **machine_metadata(dev),
        "preset": preset,
        "command": shlex.join(["attn-bench", *sys.argv[1:]]),
        "sweep": spec,
        "started": now(),
    }
    want_accuracy = accuracy and p.accuracy is not None and any(c.variant == p.accuracy.variant for c in configs)
    console.print(
        f"[bold]attn-bench[/] preset [cyan]{preset}[/]: {len(configs)} configs -> {out} "
        f"({meta['cpu_model']}, {meta['cpu_count']} cores{', ' + meta['gpu'] if meta['gpu'] else ''})"
    )
    t0 = time.perf_counter()
    try:
        results = run_sweep(
            configs,
            out,
            settings,
            resume=resume,
            retry_failed=retry_failed,
            meta=meta,
            accuracy=p.accuracy if want_accuracy else None,
            progress=progress,
            budget_s=budget_s,
        )
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        again = shlex.join(["attn-bench", "sweep", "--out", str(out), "--resume"])
        console.print(
            f"\n[yellow]Interrupted ({signal.Signals(signum).name}): finished rows are in {results_path}; "
            f"continue with: {again}"
        )
        raise typer.Exit(128 + signum) from None
    except ResultsFileError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    except RunSetupError as exc:
        raise _setup_error(exc) from None
    except WorkerStartError as exc:
        console.print(f"[red]Sweep stopped: {exc}. Finished rows are in {results_path}.")
        raise typer.Exit(1) from None
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(f"Sweep done in {time.perf_counter() - t0:.0f} s: {summary}. Results: {results_path}")
    if report:
        from attn_bench.sweep.report import write_report

        page = write_report(out)
        console.print(f"Report: [bold]{page}[/]")
    _exit_if_all_failed([r.status for r in results])


def _check_out(out: Path) -> None:
    """Exit 2 naming ``--out`` unless it may hold a run (:func:`attn_bench.core.results.out_dir_problem`, the
    rule every job's run function applies again before it starts)."""
    from attn_bench.core.results import out_dir_problem

    problem = out_dir_problem(out)
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="--out")


def _setup_error(exc: Exception) -> typer.BadParameter:
    """A run function's :class:`~attn_bench.core.results.RunSetupError` as the CLI's exit 2 naming the option."""
    return typer.BadParameter(str(exc), param_hint=getattr(exc, "option", None))


def _exit_if_all_failed(statuses: list[str]) -> None:
    """Exit 1 when no row ran ok and some failed (:func:`attn_bench.core.results.all_failed`)."""
    from attn_bench.core.results import all_failed

    if all_failed(statuses):
        console.print(f"[red]No row ran ok ({len(statuses)} rows)")
        raise typer.Exit(1)


def _resumed_spec(out: Path | None, given: dict, key: str = "sweep", kind: str | None = None) -> dict:
    """The options of the run in ``out`` (``metadata.json``'s ``key`` entry): used as they are when
    the command gives none, refused with a message when it gives different ones. ``kind``: the
    job that wrote it (``metadata.json``'s ``kind``; None for a sweep); another job's run is refused,
    and so is an ``out`` that holds no run."""
    from attn_bench.core.results import holds_run

    if out is None:
        raise typer.BadParameter("needs --out (the run to continue)", param_hint="--resume")
    if not holds_run(out):
        raise typer.BadParameter(
            f"{out} holds no run to continue (no results.csv or metadata.json)", param_hint="--resume"
        )
    meta_path = out / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except (OSError, ValueError):
        meta = {}
    if meta.get("kind") != kind:
        job = f"attn-bench {meta.get('kind') or 'sweep'}"
        raise typer.BadParameter(f"{out} holds an {job} run, not this command's", param_hint="--out")
    stored = meta.get(key)
    if stored is None:  # a run from before the options were stored: take the command's
        return given
    asked = {k: v for k, v in given.items() if v not in (None, [], {})}
    differs = {k: v for k, v in asked.items() if stored.get(k) != v}
    if differs:
        raise typer.BadParameter(
            f"{out} was started with {json.dumps(stored)}; these options differ: {json.dumps(differs)}. "
            "Pass --resume with no options (or the same ones), or start a new run",
            param_hint="--resume",
        )
    return stored


DECODE_PRESETS = ("decode-quick", "decode-gpu")


def _sweep_command(decode: bool = False):
    """``attn-bench sweep`` (or ``decode``: the same with a decode preset by default) with its options
    derived from the declarations and the registry as it is now (built again after loading
    plug-ins that declare sweep options)."""
    base = [
        p
        for p in inspect.signature(_sweep, eval_str=True).parameters.values()
        if p.kind != inspect.Parameter.VAR_KEYWORD
    ]
    params = [p.replace(kind=KW) for p in base] + _config_parameters()

    def sweep(**kwargs: Any) -> None:
        if decode and kwargs.get("passes") is not None:
            other = [x for x in _values(kwargs["passes"], "--passes", str) if x != "decode"]
            if other:
                raise typer.BadParameter(
                    f"attn-bench decode measures the decode pass only, got {', '.join(other)}; "
                    "use attn-bench sweep for fwd and fwd_bwd",
                    param_hint="--passes",
                )
        if decode and kwargs.get("preset") is None:
            import torch

            kwargs["preset"] = DECODE_PRESETS[1] if torch.cuda.is_available() else DECODE_PRESETS[0]
        _sweep(**kwargs)

    sweep.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    sweep.__doc__ = DECODE_DOC if decode else _sweep.__doc__
    return sweep


DECODE_DOC = """Decode benchmark: per-token latency (median, p90), tokens/s, state memory and prefill time
    of each variant's incremental state against SDPA over the whole cache, versus context length.

    A sweep of `decode` rows: the default preset is decode-gpu with CUDA, else decode-quick; every
    sweep option applies."""


def _install_sweep_command() -> None:
    for name, decode in (("sweep", False), ("decode", True)):
        for info in app.registered_commands:
            if info.name == name:
                info.callback = _sweep_command(decode)
                break
        else:
            app.command(name)(_sweep_command(decode))


_install_sweep_command()


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="a sweep's output directory")],
    baseline: Annotated[str, typer.Option(help="backend the speed-up plot divides by")] = "sdpa",
    compare: Annotated[Path | None, typer.Option(help="an earlier run's directory to compare against")] = None,
    threshold: Annotated[float, typer.Option(help="relative slow-down counted as a regression")] = 0.10,
) -> None:
    """Plots (PNG) and a Markdown page (README.md) in DIR; --compare DIR2 flags regressions.

    With --compare the exit status gates CI: 1 when a row regressed (slower beyond --threshold,
    or ok before and not now), 3 when the two runs have no row in common."""
    import math

    from attn_bench.core.results import ResultsFileError
    from attn_bench.sweep.analysis import compare_runs, load_results
    from attn_bench.sweep.report import write_report

    if not (directory / "results.csv").exists():
        raise typer.BadParameter(f"{directory / 'results.csv'} does not exist", param_hint="DIRECTORY")
    if not (math.isfinite(threshold) and threshold > 0):
        raise typer.BadParameter(
            f"must be a positive fraction such as 0.1, got {threshold:g}", param_hint="--threshold"
        )
    if compare is not None and not (compare / "results.csv").exists():
        raise typer.BadParameter(f"{compare / 'results.csv'} does not exist", param_hint="--compare")
    try:
        df = load_results(directory)
        if baseline not in set(df["backend"]):
            present = ", ".join(sorted(set(df["backend"])))
            raise typer.BadParameter(
                f"no {baseline!r} rows in this run; its backends are {present}", param_hint="--baseline"
            )
        page = write_report(directory, baseline=baseline, compare=compare, threshold=threshold)
        cmp = None if compare is None else compare_runs(df, load_results(compare), threshold)
    except ResultsFileError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    console.print(f"Report: [bold]{page}[/]")
    if cmp is not None:
        if len(cmp) == 0:
            console.print(f"[red]No row in common with {compare}: nothing was compared")
            raise typer.Exit(3)
        n = int(cmp["regression"].sum())
        console.print(f"{n} regression(s) beyond {threshold:.0%} in {len(cmp)} common rows against {compare}")
        if n:
            raise typer.Exit(1)


@app.command()
def task(
    preset: Annotated[
        str | None,
        typer.Option(help="task_presets.toml name: task-quick (CPU) or task-gpu (CUDA) [default: task-quick]"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory [default: runs/<preset>-<date>-<time>]")] = None,
    resume: Annotated[bool, typer.Option(help="skip the runs already in DIR/results.csv")] = False,
    overwrite: Annotated[bool, typer.Option(help="start afresh even if DIR/results.csv exists")] = False,
    timeout: Annotated[float | None, typer.Option(help="per-run timeout in seconds")] = None,
    plugin: Annotated[list[str] | None, typer.Option(help=PLUGIN_HELP)] = None,
    report: Annotated[bool, typer.Option(help="write the report (plots + README.md) when done")] = True,
    progress: Annotated[bool, typer.Option(help="show the progress bars")] = True,
) -> None:
    """Train small Transformers with each variant on synthetic tasks (ListOps, MQAR, local max):
    accuracy over seeds, training time, time to a target accuracy, tokens/s, peak memory."""
    from attn_bench.task.report import write_task_report
    from attn_bench.task.run import load_task_presets

    _train_study(
        preset, out, resume, overwrite, timeout, plugin, report, progress,
        kind="task", default="task-quick", presets=load_task_presets(), write_report=write_task_report,
    )  # fmt: skip


def _model_overrides(options: dict[str, Any], known: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Preset-group overrides from ``attn-bench model``'s options, each checked (exit 2 naming the option)."""
    from attn_bench.model.run import ARCHS, IMPLS, MODEL_DTYPES, MODEL_PASSES

    allowed = {"archs": ARCHS, "impls": IMPLS, "passes": MODEL_PASSES, "dtype": MODEL_DTYPES}
    out: dict[str, Any] = {}
    for name, value in options.items():
        key, conv = known[name]
        option = _flag(name)
        values = _values(value, option, conv) if name in ("archs", "impls", "seq_lens", "passes") else [value]
        for x in values:
            if name in allowed and x not in allowed[name]:
                raise typer.BadParameter(f"{x!r} is not one of {', '.join(allowed[name])}", param_hint=option)
            if name == "device":
                try:
                    parse_device(x)
                except ValueError as exc:
                    raise typer.BadParameter(str(exc), param_hint=option) from None
            if conv is int and x < 1:
                raise typer.BadParameter(f"must be a positive integer, got {x}", param_hint=option)
        out[key] = values if name in ("archs", "impls", "seq_lens", "passes") else values[0]
    return out


@app.command()
def model(
    preset: Annotated[
        str | None,
        typer.Option(help="model_presets.toml name: model-quick (CPU), model-gpu (CUDA) [default: model-quick]"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory [default: runs/<preset>-<date>-<time>]")] = None,
    resume: Annotated[bool, typer.Option(help="skip the rows already in DIR/results.csv")] = False,
    overwrite: Annotated[bool, typer.Option(help="start afresh even if DIR/results.csv exists")] = False,
    timeout: Annotated[float | None, typer.Option(help="per-row timeout in seconds")] = None,
    budget_s: Annotated[
        float | None, typer.Option(help="seconds for the whole run; rows not started in time are 'skipped'")
    ] = None,
    archs: Annotated[str | None, typer.Option(help="comma list: llama, bert")] = None,
    impls: Annotated[
        str | None, typer.Option(help="comma list: skip, sdpa, av_full, av_sliding_window, av_performer")
    ] = None,
    seq_lens: Annotated[str | None, typer.Option("--seq-lens", "-n", help="comma list of N")] = None,
    passes: Annotated[str | None, typer.Option(help="comma list: fwd, fwd_bwd")] = None,
    layers: Annotated[int | None, typer.Option(help="decoder/encoder layers")] = None,
    hidden: Annotated[int | None, typer.Option(help="hidden size")] = None,
    heads: Annotated[int | None, typer.Option(help="attention heads")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="key/value heads (llama; bert has heads)")] = None,
    batch: Annotated[int | None, typer.Option(help="sequences per batch")] = None,
    vocab: Annotated[int | None, typer.Option(help="vocabulary size")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    window: Annotated[int | None, typer.Option(help="sliding window (av_sliding_window)")] = None,
    num_features: Annotated[int | None, typer.Option(help="random features (av_performer)")] = None,
    gate_len: Annotated[int | None, typer.Option(help="tokens of the logits' numerics gate")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads of the worker [default: the preset's]")] = None,
    report: Annotated[bool, typer.Option(help="write the report (plots + README.md) when done")] = True,
    progress: Annotated[bool, typer.Option(help="show the progress bars")] = True,
) -> None:
    """Whole Hugging Face models (a Llama-style decoder, a BERT encoder) with random weights, with
    each attention implementation: fwd and fwd+bwd time, tokens/s, peak memory, the share of time
    in attention (against the model with attention skipped), and the logits' numerics gate."""
    import dataclasses

    from attn_bench.core.results import RunSetupError
    from attn_bench.model.run import OVERRIDES, RESULTS, expand_model_groups, load_model_presets, run_models

    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in --out, --overwrite replaces it: pass one")
    if resume and out is None:
        raise typer.BadParameter("needs --out (the run to continue)", param_hint="--resume")
    _positive(timeout, "--timeout")
    _positive(budget_s, "--budget-s")
    given = dict(
        archs=archs,
        impls=impls,
        seq_lens=seq_lens,
        passes=passes,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        batch=batch,
        vocab=vocab,
        dtype=dtype,
        device=device,
        window=window,
        num_features=num_features,
        gate_len=gate_len,
        threads=threads,
    )
    spec = {"preset": preset, "options": {k: v for k, v in given.items() if v is not None}}
    if out is not None:
        _check_out(out)
    if resume:
        spec = _resumed_spec(out, spec, key="model_run", kind="model")
    spec["preset"] = spec["preset"] or "model-quick"
    presets = load_model_presets()
    if spec["preset"] not in presets:
        raise typer.BadParameter(
            f"unknown preset {spec['preset']!r}; presets are {', '.join(presets)}", param_hint="--preset"
        )
    p = presets[spec["preset"]]
    overrides = _model_overrides(spec["options"], OVERRIDES)
    try:
        configs = expand_model_groups(p.groups, overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    out = out or Path("runs") / f"{spec['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(out)
    if (out / RESULTS).exists() and not (resume or overwrite):
        console.print(f"[red]{out / RESULTS} exists: pass --resume to continue it or --overwrite to replace it")
        raise typer.Exit(2)
    from attn_bench.core.results import cuda_problem

    problem = cuda_problem(c.device for c in configs)
    if problem is not None:  # refused before the results of a run being replaced are removed
        raise typer.BadParameter(problem, param_hint="--device")
    if overwrite:
        (out / RESULTS).unlink(missing_ok=True)
    settings = p.settings
    if timeout is not None:
        settings = dataclasses.replace(settings, timeout_s=timeout)
    from attn_bench.core.machine import machine_metadata

    meta = {**machine_metadata(configs[0].device), "preset": spec["preset"], "description": p.description}
    meta["command"] = shlex.join(["attn-bench", *sys.argv[1:]])
    meta["model_run"] = spec
    import transformers

    meta["transformers"] = transformers.__version__
    budget = budget_s if budget_s is not None else p.budget_s
    console.print(f"[bold]attn-bench model[/] preset [cyan]{spec['preset']}[/]: {len(configs)} rows -> {out}")
    t0 = time.perf_counter()
    try:
        rows = run_models(configs, out, settings, resume=resume, meta=meta, progress=progress, budget_s=budget)
    except RunSetupError as exc:
        raise _setup_error(exc) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]Interrupted; finished rows are in {out / RESULTS} (continue with --resume)")
        raise typer.Exit(130) from None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(f"Done in {time.perf_counter() - t0:.0f} s: {summary}. Results: {out / RESULTS}")
    if report:
        from attn_bench.model.report import write_model_report

        page = write_model_report(out)
        console.print(f"Report: [bold]{page}[/]")
    _exit_if_all_failed([r.status for r in rows])


@app.command()
def verify(
    backends: Annotated[str | None, typer.Option(help="comma list [default: every registry backend + sdpa]")] = None,
    dtypes: Annotated[str, typer.Option(help="comma list of dtypes")] = "float32,float16,bfloat16,float64",
    variants: Annotated[str | None, typer.Option(help="comma list of variants [default: all]")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    quick: Annotated[bool, typer.Option(help="one shape instead of three")] = False,
    grads: Annotated[bool, typer.Option(help="check gradients too")] = True,
    show: Annotated[str, typer.Option(help="all | failures: which rows to print")] = "all",
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="also write every check to this CSV, a row as it finishes")
    ] = None,
    resume: Annotated[bool, typer.Option(help="with --csv: skip the checks already in that CSV")] = False,
    plugin: Annotated[list[str] | None, typer.Option(help=PLUGIN_HELP)] = None,
) -> None:
    """The numerics gate: every variant x backend against the float64 ground truth; exit 1 on failure."""
    import attention_variants as av

    load_plugins(plugin)
    from attn_bench.core.worker import context_lost
    from attn_bench.verify.cases import run_case, verify_cases

    backend_list = _split(backends) or [*av.list_backends(), "sdpa"]
    dtype_list = _split(dtypes) or []
    try:
        validate_names(_split(variants) or [], backend_list, [], dtype_list)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    cases = verify_cases(backend_list, dtype_list, quick=quick, variants=_split(variants))
    table = Table(title=f"attn-bench verify ({device}): max error against the float64 reference")
    for col in ("variant", "shape", "dtype", "backend", "ran", "status", "max_err", "bound", "grad_err", "note"):
        table.add_column(col, overflow="fold")
    failures = 0
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    if resume and csv_out is None:
        raise typer.BadParameter("needs --csv (the file of the checks already done)", param_hint="--resume")
    sink = VerifyCsv(csv_out, append=resume) if csv_out is not None else None
    if sink is not None and resume:
        cases = [c for c in cases if sink.key(c) not in sink.done]
    done = []
    for case in cases:
        res = run_case(case, device=device, grads=grads)
        if sink is not None:
            sink.add(res, device)
        done.append(res)
        if res.status == "error" and context_lost(res.message):
            # Every later CUDA call in this process would fail too: stop, so that a fresh process
            # can go on (`--resume`); exit status 3 says so.
            name, shape = case.label()
            console.print(f"[red]{name} {shape} {case.dtype} {case.backend}: {res.message.splitlines()[0]}")
            console.print("[red]The CUDA context is lost; continue in a fresh process with --csv FILE --resume")
            raise typer.Exit(3)
    order = {name: i for i, name in enumerate(av.list_variants())}
    done.sort(key=lambda r: (order.get(r.case.variant, 99), str(r.case.options), r.case.backend, r.case.dtype))
    for res in done:
        case = res.case
        counts[res.status] = counts.get(res.status, 0) + 1
        bad = res.status in ("wrong", "error")
        failures += bad
        if show == "failures" and not bad:
            continue
        c = res.check
        name, shape = case.label()
        style = {"ok": "green", "wrong": "red", "error": "red", "unsupported": "dim"}[res.status]
        table.add_row(
            name,
            shape,
            case.dtype,
            case.backend,
            res.backend_used,
            f"[{style}]{res.status}[/]",
            _num(c.max_err if c else None),
            _num(c.bound if c else None),
            _num(c.grad_err if c else None),
            res.message[:80],
        )
    console.print(table)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(f"{len(cases)} checks in {time.perf_counter() - t0:.1f} s: {summary}")
    if failures:
        console.print(f"[red]{failures} check(s) failed")
        raise typer.Exit(1)


VERIFY_COLUMNS = [
    "variant",
    "options",
    "shape",
    "device",
    "dtype",
    "backend",
    "backend_used",
    "causal",
    "status",
    "max_err",
    "bound",
    "grad_err",
    "grad_bound",
    "message",
]


class VerifyCsv:
    """``attn-bench verify --csv``: one row per check, flushed as it finishes (a killed run keeps them)."""

    def __init__(self, path: Path, append: bool = False) -> None:
        import csv

        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and path.exists())
        self.done: set[tuple] = set()
        if not fresh:
            with open(path, newline="") as f:
                self.done = {self._key(r) for r in csv.DictReader(f)}
        self.file = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115 - rows are flushed one by one
        self.writer = csv.DictWriter(self.file, fieldnames=VERIFY_COLUMNS, lineterminator="\n")
        if fresh:
            self.writer.writeheader()
        self.file.flush()

    @staticmethod
    def _case_fields(case) -> dict[str, str]:
        """The columns that name a check (its identity for ``--resume``)."""
        options = ",".join(f"{k}={v}" for k, v in case.options)
        return {
            "variant": case.variant,
            "options": options,
            "shape": case.label()[1],
            "dtype": case.dtype,
            "backend": case.backend,
            "causal": str(case.causal),
        }

    @staticmethod
    def _key(row: dict[str, str]) -> tuple:
        return tuple(row[c] for c in ("variant", "options", "shape", "dtype", "backend", "causal"))

    def key(self, case) -> tuple:
        return self._key(self._case_fields(case))

    def add(self, res, device: str) -> None:
        c = res.check

        def num(x: float | None) -> str:
            return "" if x is None else repr(x)

        self.writer.writerow(
            {
                **self._case_fields(res.case),
                "device": device,
                "backend_used": res.backend_used,
                "status": res.status,
                "max_err": num(c and c.max_err),
                "bound": num(c and c.bound),
                "grad_err": num(c and c.grad_err),
                "grad_bound": num(c and c.grad_bound),
                "message": res.message,
            }
        )
        self.file.flush()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2e}"


@app.command("list")
def list_cmd(
    device: Annotated[str, typer.Option(help="device to check availability on")] = "cpu",
    plugin: Annotated[list[str] | None, typer.Option(help=PLUGIN_HELP)] = None,
) -> None:
    """Variants, backends (available here or why not), baselines and peers, and presets."""
    import torch

    import attention_variants as av
    from attn_bench.baselines.registry import baseline_names, get_baseline, unsupported_reason

    load_plugins(plugin)
    try:
        parse_device(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None
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
    console.print(table)
    for name in baseline_names():
        console.print(f"{name}: {escape(get_baseline(name).description)}")
    console.print(f"passes: {', '.join(PASSES)}")
    pt = Table(title="presets (bench/attn_bench/presets.toml)")
    pt.add_column("preset")
    pt.add_column("configs", justify="right")
    pt.add_column("description", overflow="fold")
    default, _ = default_preset()
    for name, p in load_presets().items():
        tag = " (default here)" if name == default else " (default with CUDA)" if name == GPU_PRESET else ""
        pt.add_row(name + tag, str(len(expand(p.groups))), p.description)
    console.print(pt)


@app.command()
def tune(
    budget_s: Annotated[float, typer.Option(help="seconds for all keys together")] = 300.0,
    out: Annotated[Path, typer.Option(help="folder for the table, <card>.json")] = Path("runs/tune"),
    kernels: Annotated[str | None, typer.Option(help="comma list: flash, favor or kernel names [default: all]")] = None,
    dtypes: Annotated[str, typer.Option(help="comma list of dtypes")] = "bfloat16",
    n: Annotated[str, typer.Option(help="comma list of sequence lengths, most important first")] = "16384,4096,1024",
    head_dims: Annotated[str, typer.Option(help="comma list of head dims, most important first")] = "128,64",
    install: Annotated[bool, typer.Option(help="also write the table into the package's tuned/ folder")] = False,
    retune: Annotated[bool, typer.Option(help="tune keys that already have a fresh entry again")] = False,
) -> None:
    """Time each kernel's candidate configs on this GPU and write the card's tuning table (needs CUDA)."""
    from attn_bench.device.tune import main as tune_main

    raise typer.Exit(
        tune_main(
            budget_s, out, kernels=kernels, dtypes=dtypes, n=n, head_dims=head_dims, install=install, retune=retune,
            echo=lambda line: console.print(escape(line), soft_wrap=True),
        )
    )  # fmt: skip


@app.command("device-check")
def device_check_cmd(
    out: Annotated[Path, typer.Option(help="folder for SUMMARY.md, logs, packed run, tuning table (at most 7 files)")],
    budget_s: Annotated[float, typer.Option(help="seconds for all steps together")] = 500.0,
    work: Annotated[Path | None, typer.Option(help="where the run directory is built [default: a temp folder]")] = None,
) -> None:
    """The GPU check in one command: environment and ceilings, GPU tests, verify, gpu-quick sweep, report.

    Each step runs in its own time box; failures are recorded and the next step still runs.
    Without CUDA it runs dry (GPU steps recorded as skipped) and still writes its files."""
    from attn_bench.device.check import device_check

    if budget_s < 30:
        raise typer.BadParameter(f"must be at least 30 s, got {budget_s:g}", param_hint="--budget-s")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    raise typer.Exit(device_check(out, budget_s=budget_s, work=work, echo=console.print))


@app.command()
def targets(
    quick: Annotated[bool, typer.Option(help="shorter timing (less stable ratios)")] = False,
    flex: Annotated[bool, typer.Option(help="include the compiled FlexAttention comparison")] = True,
) -> None:
    """The CPU performance targets (ratios against baselines measured in the same run)."""
    from attn_bench.sweep.targets import main as targets_main

    ok = targets_main(quick=quick, flex=flex)
    if not ok:
        raise typer.Exit(1)


@app.command()
def cp(
    ranks: Annotated[str, typer.Option(help="comma list of gloo rank counts")] = "1,2,4",
    n: Annotated[
        str, typer.Option("--n", "-n", help="comma list of N (strong: total; weak: per rank at 1 rank)")
    ] = "4096",
    variants: Annotated[
        str, typer.Option(help="comma list: full, sliding_window, performer")
    ] = "full,sliding_window,performer",
    layouts: Annotated[str, typer.Option(help="comma list: contiguous, zigzag")] = "contiguous,zigzag",
    causal: Annotated[str, typer.Option(help="comma list of true/false")] = "true,false",
    batch: Annotated[int, typer.Option(help="sequences per batch")] = 1,
    heads: Annotated[int, typer.Option(help="query heads")] = 4,
    kv_heads: Annotated[int, typer.Option(help="key/value heads")] = 4,
    head_dim: Annotated[int, typer.Option(help="head dim")] = 64,
    dtype: Annotated[str, typer.Option(help="float32 or float64 (CUDA also bfloat16, float16)")] = "float32",
    device: Annotated[str, typer.Option(help="cpu (gloo ranks) or cuda (NCCL, one GPU per rank)")] = "cpu",
    window: Annotated[int, typer.Option(help="sliding window (sliding_window)")] = 128,
    num_features: Annotated[int, typer.Option(help="random features (performer)")] = 128,
    repeats: Annotated[int, typer.Option(help="timed calls per row and pass")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads per rank")] = 1,
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for one row before giving up on a rank count")
    ] = 600.0,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("reports/cp-quick"),
) -> None:
    """Context-parallel attention on gloo ranks (CPU): fwd and fwd+bwd time per variant and layout,
    strong and weak scaling, and bytes sent (measured by the collectives, against the analytic count)."""
    import attention_variants as av
    from attn_bench.cp.run import expand, run_cp

    try:
        vs = _split(variants)
        bad = [v for v in vs if v not in av.list_variants()]
        if bad:
            raise ValueError(f"unknown variant(s) {', '.join(bad)}; variants are {', '.join(av.list_variants())}")
        configs = expand(
            _values(ranks, "--ranks", int), _values(n, "--n", int), vs, _split(layouts),
            [parse_bool(c) for c in _split(causal)], batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            dtype=dtype, window=window, num_features=num_features, device=device,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(f"[bold]attn-bench cp[/]: {len(configs)} rows -> {out}")
    df = run_cp(
        configs, out, repeats=repeats, threads=threads, timeout_s=timeout, echo=lambda line: console.print(escape(line))
    )
    bad_rows = df[df["status"] != "ok"]
    console.print(f"{len(df) - len(bad_rows)} rows ok, {len(bad_rows)} not; report in {out}")


def _train_study(
    preset: str | None,
    out: Path | None,
    resume: bool,
    overwrite: bool,
    timeout: float | None,
    plugin: list[str] | None,
    report: bool,
    progress: bool,
    *,
    kind: str,
    default: str,
    presets: dict[str, Any],
    write_report: Any,
    extra_meta: dict | None = None,
    **run_kw: Any,
) -> None:
    """The body of ``task``, ``long`` and ``swap``: check the options, run the preset's configs
    through :func:`attn_bench.task.run.run_tasks` (``run_kw``: its job and result class) and
    report; ``extra_meta`` goes to ``metadata.json``."""

    import dataclasses

    from attn_bench.core.results import RunSetupError
    from attn_bench.task.run import RESULTS, run_tasks

    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in --out, --overwrite replaces it: pass one")
    _positive(timeout, "--timeout")
    if out is not None:
        _check_out(out)
    # What decides the runs: stored in metadata.json, so that `--resume` alone reproduces it.
    spec = {"preset": preset, "plugins": list(load_plugins(plugin)), "timeout": timeout}
    if resume:
        spec = _resumed_spec(out, spec, key=f"{kind}_run", kind=kind)
    spec["preset"] = spec["preset"] or default
    plugins = load_plugins(spec["plugins"])
    if spec["preset"] not in presets:
        raise typer.BadParameter(
            f"unknown preset {spec['preset']!r}; presets are {', '.join(presets)}", param_hint="--preset"
        )
    p = presets[spec["preset"]]
    out = out or Path("runs") / f"{spec['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(out)
    if (out / RESULTS).exists() and not (resume or overwrite):
        console.print(f"[red]{out / RESULTS} exists: pass --resume to continue it or --overwrite to replace it")
        raise typer.Exit(2)
    from attn_bench.core.results import cuda_problem

    problem = cuda_problem(c.device for c in p.configs)
    if problem is not None:
        raise typer.BadParameter(f"preset {spec['preset']!r}: {problem}", param_hint="--preset")
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
    except RunSetupError as exc:
        raise _setup_error(exc) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]Interrupted; finished runs are in {out / RESULTS} (continue with --resume)")
        raise typer.Exit(130) from None
    ok = sum(r.status == "ok" for r in rows)
    console.print(f"{ok}/{len(rows)} runs ok in {time.perf_counter() - t0:.0f} s: {out / RESULTS}")
    if report:
        page = write_report(out)
        console.print(f"Report: [bold]{page}[/]")
    _exit_if_all_failed([r.status for r in rows])


@app.command()
def long(
    preset: Annotated[
        str | None,
        typer.Option(help="long_presets.toml name: long-quick (CPU) or long-gpu (CUDA) [default: long-quick]"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory [default: runs/<preset>-<date>-<time>]")] = None,
    resume: Annotated[bool, typer.Option(help="skip the runs already in DIR/results.csv")] = False,
    overwrite: Annotated[bool, typer.Option(help="start afresh even if DIR/results.csv exists")] = False,
    timeout: Annotated[float | None, typer.Option(help="per-run timeout in seconds")] = None,
    plugin: Annotated[list[str] | None, typer.Option(help=PLUGIN_HELP)] = None,
    report: Annotated[bool, typer.Option(help="write the report (plots + README.md) when done")] = True,
    progress: Annotated[bool, typer.Option(help="show the progress bars")] = True,
) -> None:
    """Documents longer than the model: truncate, segment + mean-pool, hierarchical, sliding window
    and Performer over the whole input, at N = 1-16 L: accuracy, training and inference time, memory."""
    from attn_bench.long.report import write_long_report
    from attn_bench.long.run import JOB, LongResult, load_long_presets

    _train_study(
        preset, out, resume, overwrite, timeout, plugin, report, progress,
        kind="long", default="long-quick", presets=load_long_presets(), write_report=write_long_report,
        job=JOB, result_cls=LongResult,
    )  # fmt: skip


@app.command()
def swap(
    preset: Annotated[
        str | None,
        typer.Option(help="swap_presets.toml name: swap-quick (CPU) or swap-gpu (CUDA) [default: swap-quick]"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory [default: runs/<preset>-<date>-<time>]")] = None,
    resume: Annotated[bool, typer.Option(help="skip the runs already in DIR/results.csv")] = False,
    overwrite: Annotated[bool, typer.Option(help="start afresh even if DIR/results.csv exists")] = False,
    timeout: Annotated[float | None, typer.Option(help="per-run timeout in seconds")] = None,
    report: Annotated[bool, typer.Option(help="write the report (plots + README.md) when done")] = True,
    progress: Annotated[bool, typer.Option(help="show the progress bars")] = True,
) -> None:
    """Swap the attention of a trained byte-level LM (the Python standard library's sources) for a
    sliding window or FAVOR+, keeping its weights: the loss right after the swap, the fine-tuning
    steps that win it back, and the same variant trained from scratch; also through Transformers."""
    from attn_bench.swap.corpus import load_corpus, manifest
    from attn_bench.swap.report import write_swap_report
    from attn_bench.swap.run import JOB, SwapResult, load_swap_presets

    try:
        corpus = manifest(load_corpus())
    except (OSError, ValueError) as exc:
        console.print(f"[red]Error: the corpus: {exc}")
        raise typer.Exit(2) from None
    _train_study(
        preset, out, resume, overwrite, timeout, None, report, progress,
        kind="swap", default="swap-quick", presets=load_swap_presets(), write_report=write_swap_report,
        extra_meta={"corpus": corpus}, job=JOB, result_cls=SwapResult,
    )  # fmt: skip


def main() -> None:
    # Plug-ins may declare sweep options (each an `attn-bench sweep` option): import them before
    # the command line is parsed, then rebuild the sweep command with them.
    args = sys.argv[1:]
    specs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--plugin"]
    specs += [a.split("=", 1)[1] for a in args if a.startswith("--plugin=")]
    if specs:
        from attn_bench.core.plugins import PluginError, load_plugins

        try:
            load_plugins(specs)
        except PluginError as exc:
            console.print(f"[red]Error: --plugin: {exc}")
            raise SystemExit(2) from None
        _install_sweep_command()
    app()


if __name__ == "__main__":
    main()
