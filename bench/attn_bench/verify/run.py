"""``attn-bench verify`` as a function: every case through the numerics gate, a table of the results,
and (``--csv``) one CSV row per check as it finishes, so a killed run keeps them and ``--resume``
skips them."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from attn_bench.core.config import validate_names
from attn_bench.core.results import RunSetupError
from attn_bench.core.setup import JobExit, load_plugins, split, status_summary

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


def _run_cases(cases: list, device: str, grads: bool, sink: VerifyCsv | None) -> list:
    from attn_bench.core.worker import context_lost
    from attn_bench.verify.cases import run_case

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
            raise JobExit(
                f"{name} {shape} {case.dtype} {case.backend}: {res.message.splitlines()[0]}\n"
                "The CUDA context is lost; continue in a fresh process with --csv FILE --resume",
                3,
            )
    return done


def _table(results: list, device: str, width: int | None) -> Table:
    """The checks as a table: one line each (names and shapes are not wrapped), the note cut to ``width``."""
    table = Table(title=f"attn-bench verify ({device}): max error against the float64 reference")
    for col in ("variant", "shape", "dtype", "backend", "ran", "status", "max_err", "bound", "grad_err"):
        table.add_column(col, no_wrap=True)
    table.add_column("note", overflow="fold")
    for res in results:
        c = res.check
        name, shape = res.case.label()
        style = {"ok": "green", "wrong": "red", "error": "red", "unsupported": "dim"}[res.status]
        table.add_row(
            name, shape, res.case.dtype, res.case.backend, res.backend_used, f"[{style}]{res.status}[/]",
            _num(c.max_err if c else None), _num(c.bound if c else None), _num(c.grad_err if c else None),
            escape(res.message[:width] if width else res.message),
        )  # fmt: skip
    return table


def unsupported_lines(results: list, width: int = 110) -> list[str]:
    """One line per backend and reason of the unsupported checks, with their count."""
    groups: dict[tuple[str, str], int] = {}
    for res in results:
        if res.status == "unsupported":
            key = (res.case.backend, res.message.splitlines()[0] if res.message else "")
            groups[key] = groups.get(key, 0) + 1
    out = []
    for (backend, reason), n in groups.items():
        cut = reason if len(reason) <= width else reason[: width - 3] + "..."
        out.append(f"unsupported here: {backend}, {n} check(s): {cut}")
    return out


def verify_command(
    *,
    backends: str | None = None,
    dtypes: str = "float32,float16,bfloat16,float64",
    variants: str | None = None,
    device: str = "cpu",
    quick: bool = False,
    grads: bool = True,
    verbose: bool = False,
    csv_out: Path | None = None,
    resume: bool = False,
    plugin: list[str] | None = None,
    echo: Any = print,
) -> None:
    """Check every variant x backend (comma lists) against the float64 ground truth; JobExit(1) on a
    failure. Prints the checks that failed, one line per backend and reason of those that cannot run
    here, and the summary; ``verbose``: a table of every check."""
    import attention_variants as av
    from attn_bench.verify.cases import verify_cases

    load_plugins(plugin)
    backend_list = split(backends) or [*av.list_backends(), "sdpa"]
    dtype_list = split(dtypes) or []
    try:
        validate_names(split(variants) or [], backend_list, [], dtype_list)
    except ValueError as exc:
        raise RunSetupError(None, str(exc)) from None
    cases = verify_cases(backend_list, dtype_list, quick=quick, variants=split(variants))
    t0 = time.perf_counter()
    if resume and csv_out is None:
        raise RunSetupError("--resume", "needs --csv (the file of the checks already done)")
    sink = VerifyCsv(csv_out, append=resume) if csv_out is not None else None
    if sink is not None and resume:
        cases = [c for c in cases if sink.key(c) not in sink.done]
    done = _run_cases(cases, device, grads, sink)
    order = {name: i for i, name in enumerate(av.list_variants())}
    done.sort(key=lambda r: (order.get(r.case.variant, 99), str(r.case.options), r.case.backend, r.case.dtype))
    failed = [r for r in done if r.status in ("wrong", "error")]
    if verbose:
        echo(_table(done, device, width=None))
    else:
        if failed:
            echo(_table(failed, device, width=None))
        for line in unsupported_lines(done):
            echo(f"[dim]{escape(line)}[/]")
    more = "" if verbose else " (-v: every check)"
    echo(f"{len(cases)} checks in {time.perf_counter() - t0:.1f} s: {status_summary(r.status for r in done)}{more}")
    if failed:
        raise JobExit(f"{len(failed)} check(s) failed", 1)
