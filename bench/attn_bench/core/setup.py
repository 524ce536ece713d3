"""The checks every job makes before it runs, shared by the API and the command line.

A job's entry point (``sweep_command``, ``model_command``, ``train_study`` ...) validates its
options here and raises :class:`~attn_bench.core.results.RunSetupError` naming the option at
fault (the CLI turns it into exit 2 with that option in the message) or :class:`JobExit` with a
message and an exit status (a run directory in use, an interrupted run, no row ok).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from attn_bench.core.results import RunSetupError, all_failed, holds_run, out_dir_problem

Echo = Callable[[str], None]


def program() -> str:
    """``attn-bench`` as the user can type it again in this shell, for the commands a job prints:
    the bare name when that name on ``PATH`` is this program (an activated virtual environment),
    else the path this program was started by (``.venv/bin/attn-bench`` after the README's set-up,
    without activating; relative paths work from the same directory)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name != "attn-bench":  # run from Python (tests, a notebook): the installed name
        return "attn-bench"
    found = shutil.which("attn-bench")
    if found and Path(found).resolve() == Path(argv0).resolve():
        return "attn-bench"
    return argv0


def command_line(*args: str) -> str:
    """A command that runs ``attn-bench ARGS`` as typed (see :func:`program`), quoted for a shell."""
    return shlex.join([program(), *args])


class JobExit(Exception):
    """Stop the command with ``code`` after printing ``message`` (in ``style``, a rich colour)."""

    def __init__(self, message: str, code: int, style: str = "red") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.style = style


def split(text: str | None, conv: Callable[[str], Any] = str) -> list | None:
    """A comma list (empty items dropped), each item converted; None stays None."""
    if text is None:
        return None
    return [conv(x.strip()) for x in text.split(",") if x.strip()]


def values(text: str | None, option: str, parse: Callable[[str], Any]) -> list | None:
    """A comma list of one option, each value parsed; a bad or missing value names ``option``."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise RunSetupError(option, "needs at least one value")
    try:
        return [parse(x) for x in items]
    except ValueError as exc:
        raise RunSetupError(option, str(exc)) from None


def positive(value: float | None, option: str) -> None:
    if value is not None and not (value > 0 and value < float("inf")):
        raise RunSetupError(option, f"must be a positive number of seconds or GB, got {value:g}")


def exclusive(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunSetupError(None, "--resume continues the run in --out, --overwrite replaces it: pass one")


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot hold a run (:func:`attn_bench.core.results.out_dir_problem`, the
    rule every job's run function applies again before it starts)."""
    problem = out_dir_problem(out)
    if problem is not None:
        raise RunSetupError("--out", problem)


def load_plugins(specs: list[str] | None) -> tuple[str, ...]:
    """Import each plug-in (``--plugin``); returns the specs as the worker processes import them
    (files as absolute paths)."""
    from attn_bench.core.plugins import PluginError, load_plugin

    out = []
    for spec in specs or []:
        try:
            out.append(load_plugin(spec))
        except PluginError as exc:
            raise RunSetupError("--plugin", str(exc)) from None
    return tuple(out)


def resumed_spec(out: Path | None, given: dict, key: str = "sweep", kind: str | None = None) -> dict:
    """The options of the run in ``out`` (``metadata.json``'s ``key`` entry): used as they are when
    the command gives none, refused with a message when it gives different ones. ``kind``: the
    job that wrote it (``metadata.json``'s ``kind``; None for a sweep); another job's run is refused,
    and so is an ``out`` that holds no run."""
    if out is None:
        raise RunSetupError("--resume", "needs --out (the run to continue)")
    if not holds_run(out):
        raise RunSetupError("--resume", f"{out} holds no run to continue (no results.csv or metadata.json)")
    meta_path = out / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except (OSError, ValueError):
        meta = {}
    if meta.get("kind") != kind:
        job = f"attn-bench {meta.get('kind') or 'sweep'}"
        raise RunSetupError("--out", f"{out} holds an {job} run, not this command's")
    stored = meta.get(key)
    if stored is None:  # a run from before the options were stored: take the command's
        return given
    asked = {k: v for k, v in given.items() if v not in (None, [], {})}
    differs = {k: v for k, v in asked.items() if stored.get(k) != v}
    if differs:
        raise RunSetupError(
            "--resume",
            f"{out} was started with {json.dumps(stored)}; these options differ: {json.dumps(differs)}. "
            "Pass --resume with no options (or the same ones), or start a new run",
        )
    return stored


def choose_preset(name: str, presets: dict[str, Any]) -> Any:
    if name not in presets:
        raise RunSetupError("--preset", f"unknown preset {name!r}; presets are {', '.join(presets)}")
    return presets[name]


def run_dir(out: Path | None, preset: str, results: Path | str, resume: bool, overwrite: bool, what: str) -> Path:
    """``out``, or a fresh ``runs/<preset>-<date>-<time>`` (so a run never collides with an earlier
    one or a committed report); refused when it holds results and neither ``--resume`` nor
    ``--overwrite`` was given. ``what``: the word for replacing a run in the message."""
    out = out or Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out(out)
    if (out / results).exists() and not (resume or overwrite):
        raise JobExit(f"{out / results} exists: pass --resume to continue it or --overwrite to {what}", 2)
    return out


def status_summary(statuses: Iterable[str]) -> str:
    """``"3 ok, 1 timeout"``: the count of each status, in alphabetical order."""
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def exit_if_all_failed(statuses: list[str]) -> None:
    """Exit 1 when no row ran ok and some failed (:func:`attn_bench.core.results.all_failed`)."""
    if all_failed(statuses):
        raise JobExit(f"No row ran ok ({len(statuses)} rows)", 1)
