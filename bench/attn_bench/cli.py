"""``attn-bench``: sweeps, reports, the numerics gate, the GPU check, and listings.

With no subcommand, ``attn-bench`` runs the default preset (``gpu-quick`` where CUDA is
available, ``cpu-quick`` otherwise) into ``runs/<preset>-<date>-<time>`` and writes its report there.

Each command only parses its options and calls its job's function (``sweep_command``,
``model_command``, ``train_study`` ...), which checks them: a refusal names the option
(:class:`~attn_bench.core.results.RunSetupError`, exit 2) or carries its message and exit status
(:class:`~attn_bench.core.setup.JobExit`), the same from Python as from here.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console
from rich.markup import escape

from attn_bench.core.config import config_fields, parse_bool, sweep_options
from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import JobExit
from attn_bench.lazy_commands import lazy, stub, with_variant_options
from attn_bench.sweep.command import default_preset, flag

__all__ = ["app", "default_preset", "main"]

app = typer.Typer(
    help="Benchmark full, sliding-window and Performer attention: sweeps, reports, numerics.",
    add_completion=False,
    no_args_is_help=False,
    invoke_without_command=True,
)
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for the tables
    console.width = 160

PLUGIN_HELP = "a module name or a .py file that registers variants or backends (repeat for several)"
Plugin = Annotated[list[str] | None, typer.Option(help=PLUGIN_HELP)]
Variants = Annotated[
    str | None, typer.Option(help="comma list of registered variants (a plug-in's too): replaces the preset's")
]
Out = Annotated[Path | None, typer.Option(help="output directory [default: runs/<preset>-<date>-<time>]")]
Overwrite = Annotated[bool, typer.Option(help="start afresh even if DIR/results.csv exists")]
Report = Annotated[bool, typer.Option(help="write the report (plots + README.md) when done")]
Progress = Annotated[bool, typer.Option(help="show the progress bars")]
ResumeRuns = Annotated[bool, typer.Option(help="skip the runs already in DIR/results.csv")]
RunTimeout = Annotated[float | None, typer.Option(help="per-run timeout in seconds")]
KW = inspect.Parameter.KEYWORD_ONLY


def _call(job: Callable[..., Any], /, **options: Any) -> None:
    """Run a job's function with the console as its ``echo``; its refusals become exits. A command's
    ``variant_options`` (see :func:`with_variant_options`) are passed as options of their own."""
    options.update(options.pop("variant_options", {}))
    try:
        job(echo=console.print, **options)
    except RunSetupError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.option) from None
    except JobExit as exc:
        if exc.message:  # as it is: no markup, and no wrapping inside a command to copy
            console.print(escape(exc.message), style=exc.style, soft_wrap=True)
        raise typer.Exit(exc.code) from None


@app.callback()
def _root(ctx: typer.Context) -> None:
    """With no subcommand: run the default sweep (gpu-quick with CUDA, else cpu-quick) and write its report."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(_sweep_command())


def _sweep(
    preset: Annotated[
        str | None,
        typer.Option(help="presets.toml name (`attn-bench list`) [default: gpu-quick with CUDA, else cpu-quick]"),
    ] = None,
    preset_file: Annotated[Path | None, typer.Option(help="presets TOML to read instead of the shipped one")] = None,
    plugin: Plugin = None,
    out: Out = None,
    resume: Annotated[bool, typer.Option(help="skip configs already in DIR/results.csv")] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="with --resume: run again the configs whose rows are timeout, oom, error or noisy")
    ] = False,
    overwrite: Overwrite = False,
    timeout: Annotated[float | None, typer.Option(help="per-config timeout in seconds")] = None,
    min_run_time: Annotated[float | None, typer.Option(help="seconds per torch.utils.benchmark block (CPU)")] = None,
    mem_limit_gb: Annotated[float | None, typer.Option(help="dense N x N work above this is not run (oom)")] = None,
    accuracy: Annotated[bool, typer.Option(help="run the preset's Performer accuracy study")] = True,
    report: Report = True,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
    budget_s: Annotated[
        float | None, typer.Option(help="seconds for the whole sweep; configs not started in time are rows 'skipped'")
    ] = None,
    executor: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster; see --address)")] = "local",
    address: Annotated[str | None, typer.Option(help="with --executor ray: HOST:PORT, ray://HOST:PORT or auto")] = None,
    devices: Annotated[str | None, typer.Option(help="CUDA devices here, one worker each: all, or 0,1,...")] = None,
    cpus_per_row: Annotated[int | None, typer.Option(help="with --executor ray: the cores a CPU row reserves")] = None,
    card: Annotated[str | None, typer.Option(help="with --executor ray: only GPUs of this type, e.g. H100")] = None,
) -> None:
    """Run a sweep: results.csv + metadata.json in the output directory, then the report.

    The config options (--variants ... --device) and the variants' own sweep options (--window,
    --num-features, a plug-in's) each take a comma list that replaces that key in every group of
    the preset; they are derived from the config declarations and the variant registry."""


DECODE_DOC = """Decode benchmark: per-token latency (median, p90), tokens/s, state memory and prefill time
    of each variant's incremental state against SDPA over the whole cache, versus context length.

    A sweep of `decode` rows: the default preset is decode-gpu with CUDA, else decode-quick; every
    sweep option applies."""


def _config_parameters() -> list[inspect.Parameter]:
    """The sweep's config options (bench/attn_bench/core/config.py) and every registered variant's
    sweep options: each takes a comma list that replaces that key in every group of the preset."""
    params = []
    for f in config_fields():
        key = f.metadata["group"]
        if f.metadata["parse"] is parse_bool:
            opt = typer.Option(f"{flag(key)}/--no-{key.replace('_', '-')}", help=f"only {key} / only not {key}")
            params.append(inspect.Parameter(key, KW, default=None, annotation=Annotated[bool | None, opt]))
            continue
        decls = [flag(key), *([flag(f.metadata["alias"])] if f.metadata["alias"] else [])]
        opt = typer.Option(*decls, help=f.metadata["help"])
        params.append(inspect.Parameter(key, KW, default=None, annotation=Annotated[str | None, opt]))
    for o in sweep_options():
        opt = typer.Option(flag(o.name), help=f"comma list: {o.help} (variants that take `{o.name}`)")
        params.append(inspect.Parameter(o.name, KW, default=None, annotation=Annotated[str | None, opt]))
    return params


def _sweep_command(decode: bool = False) -> Callable[..., None]:
    """``attn-bench sweep`` (or ``decode``) with the options of :func:`_sweep` and those derived from
    the config declarations and the registry as it is now (rebuilt after plug-ins declare more)."""
    from attn_bench.sweep.command import sweep_command

    base = [p.replace(kind=KW) for p in inspect.signature(_sweep, eval_str=True).parameters.values()]

    def sweep(**kwargs: Any) -> None:
        _call(sweep_command, decode=decode, **kwargs)

    sweep.__signature__ = inspect.Signature(base + _config_parameters())  # type: ignore[attr-defined]
    sweep.__doc__ = DECODE_DOC if decode else _sweep.__doc__
    return sweep


def _registry_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Register ``fn`` as a command with an option per variant sweep option
    (:func:`with_variant_options`), built lazily (:func:`lazy`)."""
    app.command(fn.__name__, cls=lazy(lambda: with_variant_options(fn)))(stub(fn.__doc__))
    return fn


def _install_sweep_command() -> None:
    """(Re)register ``sweep`` and ``decode``, built lazily with the variants' options as they are then."""
    for name, decode in (("sweep", False), ("decode", True)):
        cls = lazy(lambda decode=decode: _sweep_command(decode))
        doc = DECODE_DOC if decode else _sweep.__doc__
        for info in app.registered_commands:
            if info.name == name:
                info.callback, info.cls = stub(doc), cls
                break
        else:
            app.command(name, cls=cls)(stub(doc))


_install_sweep_command()


@app.command()
def report(
    directories: Annotated[
        list[Path], typer.Argument(help="a sweep's output directory, or several (cards side by side)")
    ],
    baseline: Annotated[str | None, typer.Option(help="backend the speed-ups divide by [default: sdpa]")] = None,
    compare: Annotated[Path | None, typer.Option(help="an earlier run's directory to compare against")] = None,
    threshold: Annotated[float, typer.Option(help="relative slow-down counted as a regression")] = 0.10,
    out: Annotated[
        Path | None, typer.Option(help="several directories: where their comparison goes [default: runs/cards-<time>]")
    ] = None,
) -> None:
    """Plots (PNG) and a Markdown page (README.md) in DIR; --compare DIR2 flags regressions.

    With --compare the exit status gates CI: 1 when a row regressed (slower beyond --threshold,
    or ok before and not now), 3 when the two runs have no row (or no card) in common. With several
    directories (runs on different cards), each card's time and speed-up against its own baseline,
    side by side, rows matched on everything but the device; exit 3 when no row was on every card."""
    from attn_bench.sweep.command import report_command

    _call(report_command, directory=directories, baseline=baseline, compare=compare, threshold=threshold, out=out)


@app.command()
def task(
    preset: Annotated[
        str | None,
        typer.Option(help="task_presets.toml name: task-quick (CPU) or task-gpu (CUDA) [default: task-quick]"),
    ] = None,
    out: Out = None,
    resume: ResumeRuns = False,
    overwrite: Overwrite = False,
    timeout: RunTimeout = None,
    plugin: Plugin = None,
    variants: Variants = None,
    report: Report = True,
    progress: Progress = True,
) -> None:
    """Train small Transformers with each variant on synthetic tasks (ListOps, MQAR, local max):
    accuracy over seeds, training time, time to a target accuracy, tokens/s, peak memory."""
    options = dict(locals())
    from attn_bench.task.command import train_study
    from attn_bench.task.report import write_task_report
    from attn_bench.task.run import load_task_presets

    _call(train_study, kind="task", default="task-quick", presets=lambda v: load_task_presets(variants=v),
          write_report=write_task_report, **options)  # fmt: skip


@app.command()
def long(
    preset: Annotated[
        str | None,
        typer.Option(help="long_presets.toml name: long-quick (CPU) or long-gpu (CUDA) [default: long-quick]"),
    ] = None,
    out: Out = None,
    resume: ResumeRuns = False,
    overwrite: Overwrite = False,
    timeout: RunTimeout = None,
    plugin: Plugin = None,
    variants: Variants = None,
    report: Report = True,
    progress: Progress = True,
) -> None:
    """Documents longer than the model: truncate, segment + mean-pool, hierarchical, and attention
    over the whole input with each variant (--variants), at N = 1-16 L: accuracy, training and
    inference time, memory."""
    options = dict(locals())
    from attn_bench.long.report import write_long_report
    from attn_bench.long.run import JOB, LongResult, load_long_presets
    from attn_bench.task.command import train_study

    _call(train_study, kind="long", default="long-quick", presets=lambda v: load_long_presets(variants=v),
          write_report=write_long_report, job=JOB, result_cls=LongResult, **options)  # fmt: skip


@app.command()
def swap(
    preset: Annotated[
        str | None,
        typer.Option(help="swap_presets.toml name: swap-quick (CPU) or swap-gpu (CUDA) [default: swap-quick]"),
    ] = None,
    out: Out = None,
    resume: ResumeRuns = False,
    overwrite: Overwrite = False,
    timeout: RunTimeout = None,
    plugin: Plugin = None,
    variants: Variants = None,
    report: Report = True,
    progress: Progress = True,
) -> None:
    """Swap the attention of a trained byte-level LM (the Python standard library's sources) for
    each variant (--variants), keeping its weights: the loss right after the swap, the fine-tuning
    steps that win it back, and the same variant trained from scratch; also through Transformers."""
    options = dict(locals())
    from attn_bench.swap.command import swap_command

    _call(swap_command, **options)


@_registry_command
def model(
    preset: Annotated[
        str | None,
        typer.Option(help="model_presets.toml name: model-quick (CPU), model-gpu (CUDA) [default: model-quick]"),
    ] = None,
    out: Out = None,
    resume: Annotated[bool, typer.Option(help="skip the rows already in DIR/results.csv")] = False,
    overwrite: Overwrite = False,
    timeout: Annotated[float | None, typer.Option(help="per-row timeout in seconds")] = None,
    budget_s: Annotated[
        float | None, typer.Option(help="seconds for the whole run; rows not started in time are 'skipped'")
    ] = None,
    archs: Annotated[str | None, typer.Option(help="comma list: llama, bert")] = None,
    impls: Annotated[
        str | None, typer.Option(help="comma list: skip, sdpa, av_<variant> of any registered variant")
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
    gate_len: Annotated[int | None, typer.Option(help="tokens of the logits' numerics gate")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads of the worker [default: the preset's]")] = None,
    plugin: Plugin = None,
    report: Report = True,
    progress: Progress = True,
    **variant_options: int | None,
) -> None:
    """Whole Hugging Face models (a Llama-style decoder, a BERT encoder) with random weights, with
    each attention implementation: fwd and fwd+bwd time, tokens/s, peak memory, the share of time
    in attention (against the model with attention skipped), and the logits' numerics gate."""
    options = dict(locals())
    from attn_bench.model.command import model_command

    _call(model_command, **options)


@app.command()
def verify(
    backends: Annotated[str | None, typer.Option(help="comma list [default: every registry backend + sdpa]")] = None,
    dtypes: Annotated[str, typer.Option(help="comma list of dtypes")] = "float32,float16,bfloat16,float64",
    variants: Annotated[str | None, typer.Option(help="comma list of variants [default: all]")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    quick: Annotated[bool, typer.Option(help="one shape instead of three")] = False,
    grads: Annotated[bool, typer.Option(help="check gradients too")] = True,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="a table of every check, not only those that failed")
    ] = False,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="also write every check to this CSV, a row as it finishes")
    ] = None,
    resume: Annotated[bool, typer.Option(help="with --csv: skip the checks already in that CSV")] = False,
    plugin: Plugin = None,
) -> None:
    """The numerics gate: every variant x backend against the float64 ground truth; exit 1 on failure."""
    options = dict(locals())
    from attn_bench.verify.run import verify_command

    _call(verify_command, **options)


@app.command("list")
def list_cmd(
    device: Annotated[str, typer.Option(help="device to check availability on")] = "cpu",
    plugin: Plugin = None,
) -> None:
    """Variants, backends (available here or why not), baselines and peers, and presets."""
    from attn_bench.sweep.listing import list_command

    _call(list_command, device=device, plugin=plugin)


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
    plugin: Plugin = None,
) -> None:
    """Time each kernel's candidate configs on this GPU and write the card's tuning table (needs CUDA)."""
    from attn_bench.device.tune_command import main as tune_main

    raise typer.Exit(
        tune_main(
            budget_s, out, kernels=kernels, dtypes=dtypes, n=n, head_dims=head_dims, install=install, retune=retune,
            plugins=plugin or [], echo=lambda line: console.print(escape(line), soft_wrap=True),
        )
    )  # fmt: skip


@app.command("device-check")
def device_check_cmd(
    out: Annotated[Path, typer.Option(help="folder for SUMMARY.md, logs, packed run, tuning table (at most 7 files)")],
    budget_s: Annotated[float, typer.Option(help="seconds for all steps together")] = 500.0,
    work: Annotated[Path | None, typer.Option(help="where the run directory is built [default: a temp folder]")] = None,
    plugin: Plugin = None,
    variants: Annotated[str | None, typer.Option(help="comma list: the variants of verify, cp and the sweep")] = None,
) -> None:
    """The GPU check in one command: environment and ceilings, GPU tests, verify, gpu-quick sweep, report.

    Each step runs in its own time box; failures are recorded and the next step still runs.
    Without CUDA it runs dry (GPU steps recorded as skipped) and still writes its files."""
    from attn_bench.device.check import device_check_command

    _call(device_check_command, out=out, budget_s=budget_s, work=work, plugin=plugin, variants=variants)


@app.command("kernels")
def kernels_cmd(
    arch: Annotated[str, typer.Option(help="target GPU: sm_80, sm_90 or sm_100")] = "sm_90",
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32")] = "bfloat16",
    head_dim: Annotated[int, typer.Option(help="head dim, 1-256 (FAVOR+ up to 128)")] = 128,
    causal: Annotated[bool, typer.Option(help="compile the causal specialisation")] = False,
    candidates: Annotated[bool, typer.Option(help="also compile the configs `attn-bench tune` times")] = False,
    kernels: Annotated[
        str | None,
        typer.Option("--kernels", "--kernel", help="comma list: flash, favor, decode or kernel names [default: all]"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="folder for kernels.csv and README.md [default: runs/kernels-ARCH-DTYPE-dHD]")
    ] = None,
) -> None:
    """Compile every Triton kernel for a target GPU here (no GPU needed): registers, spills, shared
    memory and the main loop's SASS (MMA kind and count, loads, instructions per key, barriers)."""
    options = dict(locals())
    from attn_bench.kernels.command import kernels_command

    _call(kernels_command, **options)


@app.command()
def targets(
    quick: Annotated[bool, typer.Option(help="shorter timing (less stable ratios)")] = False,
    flex: Annotated[bool, typer.Option(help="include the compiled FlexAttention comparison")] = True,
) -> None:
    """The CPU performance targets (ratios against baselines measured in the same run)."""
    from attn_bench.sweep.targets import main as targets_main

    if not targets_main(quick=quick, flex=flex):
        raise typer.Exit(1)


@_registry_command
def cp(
    ranks: Annotated[str, typer.Option(help="comma list of gloo rank counts")] = "1,2,4",
    n: Annotated[
        str, typer.Option("--n", "-n", help="comma list of N (strong: total; weak: per rank at 1 rank)")
    ] = "4096",
    variants: Annotated[
        str | None, typer.Option(help="comma list of registered variants (a plug-in's too) [default: all]")
    ] = None,
    layouts: Annotated[str, typer.Option(help="comma list: contiguous, zigzag")] = "contiguous,zigzag",
    causal: Annotated[str, typer.Option(help="comma list of true/false")] = "true,false",
    batch: Annotated[int, typer.Option(help="sequences per batch")] = 1,
    heads: Annotated[int, typer.Option(help="query heads")] = 4,
    kv_heads: Annotated[int, typer.Option(help="key/value heads")] = 4,
    head_dim: Annotated[int, typer.Option(help="head dim")] = 64,
    dtype: Annotated[str, typer.Option(help="float32 or float64 (CUDA also bfloat16, float16)")] = "float32",
    device: Annotated[str, typer.Option(help="cpu (gloo ranks) or cuda (NCCL, one GPU per rank)")] = "cpu",
    repeats: Annotated[int, typer.Option(help="timed calls per row and pass")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads per rank")] = 1,
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for one row before giving up on a rank count")
    ] = 600.0,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("reports/cp-quick"),
    plugin: Plugin = None,
    **variant_options: int | None,
) -> None:
    """Context-parallel attention on gloo ranks (CPU): fwd and fwd+bwd time per variant and layout,
    strong and weak scaling, and bytes sent (measured by the collectives, against the analytic count).
    A variant without its own strategy runs the exact all-gather fallback."""
    options = dict(locals())
    from attn_bench.cp.command import cp_command

    _call(cp_command, **options)


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
