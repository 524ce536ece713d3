"""The decode pass of the harness (`attn-bench decode`): rows, gate, report section."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.core.config import BenchConfig, RunSettings, load_presets
from attn_bench.sweep.measure import run_config

runner = CliRunner()
SETTINGS = RunSettings(min_run_time=0.005, min_repeats=3)


def test_decode_presets_are_causal_decode_rows() -> None:
    from attn_bench.core.config import expand

    presets = load_presets()
    for name in ("decode-quick", "decode-gpu"):
        configs = expand(presets[name].groups)
        assert configs and all(c.pass_ == "decode" and c.causal for c in configs)


def test_sdpa_decode_row_is_gated_and_timed() -> None:
    res = run_config(
        BenchConfig("full", "sdpa", 96, heads=2, kv_heads=1, head_dim=16, causal=True, pass_="decode"), SETTINGS
    )
    assert res.status == "ok", res.error
    assert res.time_ms > 0 and res.tokens_per_s == pytest.approx(1 / (res.time_ms * 1e-3))
    assert res.max_err <= res.err_bound
    assert res.peak_mem_bytes == 2 * (1 * 1 * 97 * 16 * 4)  # the K and V it reads: 96 + 1 tokens


def test_decode_needs_causal_and_a_state_backend() -> None:
    res = run_config(BenchConfig("full", "sdpa", 32, heads=1, head_dim=16, causal=False, pass_="decode"), SETTINGS)
    assert res.status == "unsupported" and "causal" in res.error
    res = run_config(BenchConfig("full", "reference", 32, heads=1, head_dim=16, causal=True, pass_="decode"), SETTINGS)
    assert res.status == "unsupported" and "reference" in res.error


def test_decode_command_writes_the_decoding_section(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["decode", "--variants", "full,sliding_window", "--backends", "sdpa", "--seq-lens", "64,256"]
    args += ["--heads", "1", "--kv-heads", "1", "--head-dim", "16", "--batch", "1", "--out", str(out)]
    res = runner.invoke(app, [*args, "--no-progress", "--min-run-time", "0.005"])
    assert res.exit_code == 0, res.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["pass"] for r in rows} == {"decode"} and all(r["status"] == "ok" for r in rows)
    page = (out / "README.md").read_text()
    assert "## Decoding" in page and "ms / token" in page


def test_baseline_decode_rows_are_gated_against_what_they_compute() -> None:
    """The Performer's SDPA decode row computes exact attention: checked against that, not FAVOR+;
    the Performer's own row (its state) against FAVOR+'s reference."""
    for backend in ("sdpa", "torch"):
        cfg = BenchConfig("performer", backend, 128, heads=2, kv_heads=1, head_dim=16, causal=True, pass_="decode")
        res = run_config(BenchConfig(**{**cfg.__dict__, "options": (("num_features", 32),)}), SETTINGS)
        assert res.status == "ok", res.error
        assert res.max_err <= res.err_bound
        assert (res.approx_err is None) == (backend == "sdpa")  # only the approximation reports approx_err


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("variant", "options"), [("sliding_window", (("window", 8),)), ("performer", (("num_features", 32),))]
)
def test_triton_decode_row_is_gated_and_timed(variant: str, options: tuple) -> None:
    """The Triton step kernels (here under the interpreter) as a decode row, gated against float64."""
    cfg = BenchConfig(variant, "triton", 40, heads=4, kv_heads=2, head_dim=16, causal=True, pass_="decode")
    res = run_config(BenchConfig(**{**cfg.__dict__, "options": options}), SETTINGS)
    assert res.status == "ok", res.error
    assert res.backend_used == "triton" and res.max_err <= res.err_bound and res.time_ms > 0


def test_flash_attn_kvcache_row_without_cuda_says_why() -> None:
    res = run_config(
        BenchConfig("full", "flash_attn_kvcache", 32, heads=2, head_dim=16, causal=True, pass_="decode"), SETTINGS
    )
    assert res.status == "unsupported"
    assert "flash_attn" in res.error or "CUDA" in res.error or "float16" in res.error


def test_triton_decode_row_off_cuda_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    res = run_config(BenchConfig("full", "triton", 32, heads=2, head_dim=16, causal=True, pass_="decode"), SETTINGS)
    assert res.status == "unsupported" and "CUDA" in res.error
