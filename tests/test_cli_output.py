"""Output a person can read: verify prints what failed and a summary (everything with -v), the
sweep's progress line fits 80 columns with an ETA from rows of the same N and pass, and
`attn-bench --help` answers without importing torch."""

from __future__ import annotations

from pathlib import Path

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
