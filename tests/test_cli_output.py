"""Output a person can read: verify prints what failed and a summary (everything with -v), the
sweep's progress line fits 80 columns with an ETA from rows of the same N and pass, and
`attn-bench --help` answers without importing torch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attn_bench.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# flash_attn (a peer) runs on CUDA only: its checks are unsupported here.
VERIFY = ["verify", "--quick", "--dtypes", "float32", "--variants", "full", "--backends", "torch,sdpa,flash_attn"]


def test_verify_prints_the_summary_and_what_did_not_pass() -> None:
    res = runner.invoke(app, VERIFY)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    # 6 checks: 4 ok (torch, sdpa; causal or not), 2 unsupported (flash_attn): one line for those, one summary.
    assert len(lines) == 2, res.output
    assert lines[0].startswith("unsupported here: flash_attn, 2 check(s): flash_attn runs on CUDA only")
    assert lines[1].startswith("6 checks in") and "4 ok, 2 unsupported" in lines[1]

    res = runner.invoke(app, [*VERIFY, "-v"])
    assert res.exit_code == 0, res.output
    # Every check is a row of the table, its shape on one line.
    assert res.output.count("B2-H4-Hk2-N113-D64-causal ") == 3 and res.output.count("B2-H4-Hk2-N113-D64 ") == 3


def test_verify_prints_a_failing_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import attn_bench.baselines.torch_builtin as baselines

    real = baselines.sdpa_fn

    def broken(variant, q, k, causal):
        fn, dense = real(variant, q, k, causal)
        return (lambda a, b, c: fn(a, b, c) * 1.01), dense

    monkeypatch.setattr(baselines, "sdpa_fn", broken)
    res = runner.invoke(app, VERIFY)
    assert res.exit_code == 1
    rows = [ln for ln in res.output.splitlines() if "wrong" in ln and "sdpa" in ln]
    assert len(rows) == 2 and not any(" ok " in ln for ln in res.output.splitlines())  # ok rows not printed
    assert "2 check(s) failed" in res.output


def test_progress_line_fits_80_columns_with_count_and_eta() -> None:
    import io

    from rich.console import Console

    from attn_bench.core.config import BenchConfig
    from attn_bench.sweep.run import _Progress

    todo = [BenchConfig("sliding_window", "local_attention", n, options=(("window", 128),)) for n in range(1, 109)]
    screen = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    with _Progress(todo, enabled=True, console=screen) as bar:
        for cfg in todo[:27]:
            bar.start(cfg.label())
            bar.advance(cfg, 1.0, "done")
        bar.start(todo[27].label() + " with a long label that cannot fit in eighty columns")
        shot = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
        shot.print(bar.progress.make_tasks_table(bar.progress.tasks))
    [line] = [ln for ln in shot.file.getvalue().splitlines() if ln.strip()]
    assert len(line) <= 80
    # 81 rows left, each at N it has not seen: scaled from the nearest N run (27, 1.0 s each).
    want = sum(n / 27 for n in range(28, 109))
    s = round(want)
    assert line.lstrip().startswith("27/108"), line
    assert f"ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" in line, line
    assert "sliding_window" in line and line.rstrip().endswith("…")


def test_eta_comes_from_rows_of_the_same_n_and_pass() -> None:
    import random

    from attn_bench.core.progress import eta_seconds

    rng = random.Random(5)
    cost = {(n, p): rng.uniform(0.01, 100.0) for n in (256, 1024, 4096) for p in ("fwd", "fwd_bwd")}
    # Small rows first, as in a sweep: a mean over all rows would say little about the large ones.
    done = [(n, p, cost[(n, p)] * rng.uniform(0.9, 1.1)) for (n, p) in cost for _ in range(3)]
    todo = [(4096, "fwd_bwd")] * 5 + [(256, "fwd")] * 2
    means = {k: np.mean([s for n, p, s in done if (n, p) == k]) for k in cost}
    assert math.isclose(eta_seconds(done, todo), 5 * means[(4096, "fwd_bwd")] + 2 * means[(256, "fwd")])
    # An N not seen yet: the nearest N of the same pass, scaled by the ratio of the lengths.
    assert math.isclose(eta_seconds(done, [(8192, "fwd")]), means[(4096, "fwd")] * 2)
    assert eta_seconds([], todo) is None


HELP_PROBE = """import sys
from attn_bench.cli import main
sys.argv = ["attn-bench", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["list", "--help"], ["task", "--help"], ["report", "--help"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr
    assert "torch imported: False" in res.stdout, res.stdout[-2000:]
    if args == ["--help"]:  # the commands whose options need the registry are still listed
        assert "sweep" in res.stdout and "decode" in res.stdout


def test_sweep_help_still_has_the_variants_options() -> None:
    res = runner.invoke(app, ["sweep", "--help"])
    assert res.exit_code == 0
    for option in ("--variants", "--seq-lens", "--window", "--num-features", "--resume"):
        assert option in res.output
