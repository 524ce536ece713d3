"""``attn-bench sweep`` / ``decode`` / ``report`` as functions: the options checked, the configs
expanded from a preset, the run started and reported. The CLI only parses the command line."""

from __future__ import annotations

import json
import math
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from attn_bench.core.config import (
    ConfigError,
    RunSettings,
    config_fields,
    expand,
    load_presets,
    name_problems,
    parse_bool,
    parse_option,
    sweep_options,
)
from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import (
    Echo,
    JobExit,
    check_out,
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

DEFAULT_PRESET = "cpu-quick"
GPU_PRESET = "gpu-quick"
DECODE_PRESETS = ("decode-quick", "decode-gpu")


def default_preset() -> tuple[str, str]:
    """``(preset, why)``: ``gpu-quick`` when CUDA is available, else ``cpu-quick``."""
    import torch

    if torch.cuda.is_available():
        return GPU_PRESET, f"CUDA is available ({torch.cuda.get_device_name(0)})"
    why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
    return DEFAULT_PRESET, f"{why}; on a GPU the default is {GPU_PRESET}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def overrides_of(options: dict) -> dict:
    """Preset-group overrides from the config options (``--variants`` ... and the variants' sweep
    options), each a comma list, each value parsed and validated."""
    overrides: dict = {}
    for f in config_fields():
        key = f.metadata["group"]
        if options.get(key) is None:
            continue
        if f.metadata["parse"] is parse_bool:
            overrides[key] = [options[key]]
        else:
            overrides[key] = values(options[key], flag(key), f.metadata["parse"])
    for o in sweep_options():
        if options.get(o.name) is not None:
            overrides[o.name] = values(options[o.name], flag(o.name), parse_option)
    names = {k: overrides.get(k) or [] for k in ("variants", "backends", "passes", "dtypes")}
    for key, message in name_problems(names["variants"], names["backends"], names["passes"], names["dtypes"]):
        raise RunSetupError(flag(key), message)
    return overrides


def decode_preset(preset: str | None, passes: str | None) -> str:
    """``attn-bench decode``: the decode pass only; ``preset`` or decode-gpu with CUDA, else decode-quick."""
    other = [x for x in values(passes, "--passes", str) or [] if x != "decode"]
    if other:
        raise RunSetupError(
            "--passes",
            f"attn-bench decode measures the decode pass only, got {', '.join(other)}; "
            "use attn-bench sweep for fwd and fwd_bwd",
        )
    if preset is not None:
        return preset
    import torch

    return DECODE_PRESETS[1] if torch.cuda.is_available() else DECODE_PRESETS[0]


def _configs(preset: str, presets: dict, options: dict) -> list:
    overrides = overrides_of(options)
    if overrides.get("seq_lens"):  # explicit lengths override the preset's per-backend caps too
        overrides["max_seq_len"] = {}
    try:
        configs = expand(presets[preset].groups, overrides)
    except ConfigError as exc:
        # The option given that made the row (heads with the preset's kv_heads, say), else the preset.
        keys = [k for k in (exc.key, *(["heads"] if exc.key == "kv_heads" else [])) if k in overrides]
        where = "" if keys else f" (from preset {preset!r})"
        raise RunSetupError(flag(keys[0]) if keys else "--preset", f"{exc}{where}") from None
    if not configs:
        raise RunSetupError("--preset", f"preset {preset!r} with these options gives no configs to run")
    return configs


def _spec(preset, preset_file, plugin, out, resume, fields) -> tuple[dict, dict]:
    """What decides the configs (stored in metadata.json, so that ``--resume`` alone reproduces
    it) and the presets it names."""
    spec = {
        "preset": preset,
        "preset_file": None if preset_file is None else str(preset_file.resolve()),
        "plugins": list(load_plugins(plugin)),
        "options": {k: v for k, v in fields.items() if v is not None},
    }
    if resume:
        spec = resumed_spec(out, spec)
    preset_path = None if spec["preset_file"] is None else Path(spec["preset_file"])
    if preset_path is not None and not preset_path.is_file():
        raise RunSetupError("--preset-file", f"{preset_path} is not a readable file")
    try:
        presets = load_presets(preset_path.read_text() if preset_path else None)
    except (OSError, ValueError) as exc:
        raise RunSetupError("--preset-file" if preset_path else "--preset", str(exc)) from None
    return spec, presets


def sweep_command(
    *,
    preset: str | None = None,
    preset_file: Path | None = None,
    plugin: list[str] | None = None,
    out: Path | None = None,
    resume: bool = False,
    retry_failed: bool = False,
    overwrite: bool = False,
    timeout: float | None = None,
    min_run_time: float | None = None,
    mem_limit_gb: float | None = None,
    accuracy: bool = True,
    report: bool = True,
    progress: bool = True,
    budget_s: float | None = None,
    decode: bool = False,
    executor: str = "local",
    address: str | None = None,
    devices: str | None = None,
    cpus_per_row: int | None = None,
    card: str | None = None,
    echo: Echo = print,
    **fields: Any,
) -> None:
    """Run a sweep into ``out`` (results.csv + metadata.json), then write its report. ``fields``:
    the config options (``variants="full,performer"``, ``window="64"`` ...), each a comma list that
    replaces that key in every group of the preset. ``decode``: ``attn-bench decode``, the decode
    pass only and a decode preset by default. ``executor``: ``local`` (this machine; ``devices``:
    CUDA device indices or ``all``, one worker each) or ``ray`` (each row a Ray task on the cluster
    at ``address``; ``cpus_per_row``: the cores a CPU row reserves; ``card``: only GPUs of that Ray
    accelerator type), see :mod:`attn_bench.core.executor`."""
    from attn_bench.core.executor import check_executor_options, make_executor

    check_executor_options(executor, address, devices, cpus_per_row, card)
    if decode:
        preset = decode_preset(preset, fields.get("passes"))
    exclusive(resume, overwrite)
    if retry_failed and not resume:
        raise RunSetupError("--retry-failed", "needs --resume")
    positive(budget_s, "--budget-s")
    positive(timeout, "--timeout")
    positive(min_run_time, "--min-run-time")
    positive(mem_limit_gb, "--mem-limit-gb")
    if out is not None:
        check_out(out)
    spec, presets = _spec(preset, preset_file, plugin, out, resume, fields)
    plugins = load_plugins(spec["plugins"])
    preset = spec["preset"]
    if preset is None:
        preset, why = default_preset()
        spec["preset"] = preset
        echo(f"preset [cyan]{preset}[/] (the default here: {why})")
    if preset not in presets:
        raise RunSetupError("--preset", f"unknown preset {preset!r}; presets are {', '.join(presets)}")
    p = presets[preset]
    configs = _configs(preset, presets, spec["options"])
    changes = {"timeout_s": timeout, "min_run_time": min_run_time, "mem_limit_gb": mem_limit_gb, "plugins": plugins}
    settings = RunSettings(**{**p.settings.__dict__, **{k: v for k, v in changes.items() if v is not None}})
    out = run_dir(out, preset, "results.csv", resume, overwrite, "start afresh")
    results_path = out / "results.csv"
    from attn_bench.core.results import cuda_problem

    problem = None if executor == "ray" else cuda_problem(c.device for c in configs)
    if problem is not None:  # refused before the results of a run being replaced are removed
        raise RunSetupError("--device", problem)
    from attn_bench.core.variants import preflight_plugin_rows

    preflight_plugin_rows(configs)  # a broken plug-in variant stops the sweep before anything is written
    where = make_executor(
        executor, settings, str(out / "worker.log"), [c.device for c in configs],
        address=address, devices=devices, cpus_per_row=cpus_per_row, card=card,
    )  # fmt: skip
    if overwrite and results_path.exists():
        results_path.unlink()
        (out / "performer_accuracy.csv").unlink(missing_ok=True)
    from attn_bench.core.machine import machine_metadata, now
    from attn_bench.core.results import ResultsFileError
    from attn_bench.core.worker import WorkerStartError
    from attn_bench.sweep.run import run_sweep

    dev = configs[0].device if configs else "cpu"
    command = shlex.join(["attn-bench", *sys.argv[1:]])
    meta = {**machine_metadata(dev), "preset": preset, "command": command, "sweep": spec, "started": now()}
    meta["executor"] = {"kind": executor, "address": address, "slots": where.slots, "where": where.summary}
    if configs and where.runs_here:  # what no row's rate may exceed (each row is checked against it in its worker)
        import torch

        from attn_bench.core import ceilings

        dtypes = sorted({c.dtype for c in configs if c.device == dev})
        meta["ceilings"] = ceilings.measure(dev, [getattr(torch, d) for d in dtypes]).to_json()
    want_accuracy = accuracy and p.accuracy is not None and any(c.variant == p.accuracy.variant for c in configs)
    echo(
        f"[bold]attn-bench[/] preset [cyan]{preset}[/]: {len(configs)} configs -> {out} "
        f"({meta['cpu_model']}, {meta['cpu_count']} cores{', ' + meta['gpu'] if meta['gpu'] else ''})"
        + (f"; rows on {where.summary}" if where.slots > 1 or not where.runs_here else "")
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
            executor=where,
        )
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        message = _interrupted(out, "decode" if decode else "sweep", signal.Signals(signum).name, report, echo)
        raise JobExit(message, 128 + signum, "yellow") from None
    except ResultsFileError as exc:
        raise JobExit(str(exc), 2) from None
    except WorkerStartError as exc:
        raise JobExit(f"Sweep stopped: {exc}. Finished rows are in {results_path}.", 1) from None
    finally:
        where.close()
    summary = status_summary(r.status for r in results)
    echo(f"Sweep done in {time.perf_counter() - t0:.0f} s: {summary}. Results: {results_path}")
    if report:
        from attn_bench.sweep.report import write_report

        echo(f"Report: [bold]{write_report(out)}[/]")
    exit_if_all_failed([r.status for r in results])


def _interrupted(out: Path, job: str, signame: str, report: bool, echo: Echo) -> str:
    """After a signal stopped a sweep: the partial report written (unless ``report`` is off) and the
    message that says what ran and the two ways on, ``--resume`` and ``report``."""
    from attn_bench.core.results import RESULTS, read_results
    from attn_bench.sweep.run import not_run

    meta = json.loads((out / "metadata.json").read_text()) if (out / "metadata.json").exists() else {}
    missing, planned = not_run(out, meta)
    ran = len(read_results(out / RESULTS, warn=None))
    page, problem = None, ""
    if report and ran:
        from attn_bench.sweep.report import write_report

        echo(f"Interrupted ({signame}): writing the partial report (Ctrl-C again to skip it) ...")
        try:
            page = write_report(out)
        except KeyboardInterrupt:
            problem = " The report was not written (interrupted again)."
        except Exception as exc:  # the rows are safe: say why the page is missing, do not hide the exit
            problem = f" The report was not written ({type(exc).__name__}: {exc})."
    resume = command_line(job, "--out", str(out), "--resume")
    again = command_line("report", str(out))
    return (
        f"Interrupted ({signame}): {ran} of {planned if planned is not None else '?'} configs have a row in "
        f"{out / RESULTS}; {len(missing)} did not run."
        + (f" Partial report: {page}." if page else problem)
        + f"\nContinue the run with: {resume}\nWrite its report with: {again}"
    )


def report_command(
    directory: Path | list[Path],
    baseline: str | None = None,
    compare: Path | None = None,
    threshold: float = 0.10,
    out: Path | None = None,
    echo: Echo = print,
) -> None:
    """Plots and README.md in ``directory``; with ``compare``, exit 1 when a row regressed (slower
    beyond ``threshold``, or ok before and not now) and 3 when the two runs share no row.
    ``baseline``: the backend speed-ups divide by (default ``sdpa``; a run without it has no
    speed-up plot, while a ``baseline`` asked for and absent is refused). Several directories
    (runs on different cards): their rows side by side per card (:mod:`attn_bench.sweep.cards`),
    written into ``out`` (default ``runs/cards-<date>-<time>``); exit 3 when no row was measured
    on every card."""
    from attn_bench.core.results import ResultsFileError
    from attn_bench.sweep.analysis import compare_runs, load_results
    from attn_bench.sweep.report import write_report

    dirs = [directory] if isinstance(directory, Path) else list(directory)
    for d in dirs:
        if not (d / "results.csv").exists():
            raise RunSetupError("DIRECTORY", f"{d / 'results.csv'} does not exist")
    if not (math.isfinite(threshold) and threshold > 0):
        raise RunSetupError("--threshold", f"must be a positive fraction such as 0.1, got {threshold:g}")
    if compare is not None and not (compare / "results.csv").exists():
        raise RunSetupError("--compare", f"{compare / 'results.csv'} does not exist")
    if len(dirs) > 1:
        _cards_report(dirs, baseline, compare, out, echo)
        return
    if out is not None:
        raise RunSetupError(
            "--out", "is for several directories (their cards side by side); one run's report goes into it"
        )
    directory = dirs[0]
    try:
        df = load_results(directory)
        if baseline is not None and baseline not in set(df["backend"]):
            present = ", ".join(sorted(set(df["backend"])))
            raise RunSetupError("--baseline", f"no {baseline!r} rows in this run; its backends are {present}")
        page = write_report(directory, baseline=baseline or "sdpa", compare=compare, threshold=threshold)
        cmp = None if compare is None else compare_runs(df, load_results(compare), threshold)
    except ResultsFileError as exc:
        raise JobExit(str(exc), 2) from None
    echo(f"Report: [bold]{page}[/]")
    if cmp is not None:
        from attn_bench.sweep.cards import load_cards

        cards = [set(load_cards([d])["card"]) for d in (directory, compare)]
        if not cards[0] & cards[1]:  # a regression is a change on the same card
            raise JobExit(
                f"No card in common with {compare} ({', '.join(sorted(cards[0]))} here; "
                f"{', '.join(sorted(cards[1]))} there): put them side by side with "
                + command_line("report", str(directory), str(compare)),
                3,
            )
        if len(cmp) == 0:
            raise JobExit(f"No row in common with {compare}: nothing was compared", 3)
        n = int(cmp["regression"].sum())
        echo(f"{n} regression(s) beyond {threshold:.0%} in {len(cmp)} common rows against {compare}")
        if n:
            raise JobExit("", 1)


def _cards_report(dirs: list[Path], baseline: str | None, compare: Path | None, out: Path | None, echo: Echo) -> None:
    """``attn-bench report DIR1 DIR2 ...``: the runs' cards side by side (see :func:`report_command`)."""
    from attn_bench.core.results import ResultsFileError
    from attn_bench.sweep.cards import write_cards_report

    if compare is not None:
        raise RunSetupError("--compare", "compares one run with another; several directories are put side by side")
    if len(set(d.resolve() for d in dirs)) < len(dirs):
        raise RunSetupError("DIRECTORY", "a run is given twice")
    out = out or Path("runs") / f"cards-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out(out)
    try:
        page, shared = write_cards_report(dirs, out, baseline or "sdpa")
    except ResultsFileError as exc:
        raise JobExit(str(exc), 2) from None
    echo(f"Cards side by side: [bold]{page}[/] ({shared} rows measured on every card)")
    if shared == 0:
        raise JobExit("No row was measured on every card: nothing was compared", 3)
