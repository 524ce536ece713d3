"""``attn-bench model``: the CLI end to end on a tiny model, resume, bad options, the report, the
logits' gate catching a wrong output, and the pieces (attention skipped, the gate's ground truth,
crossover N, rows not run after a failure) against independent computations."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from attn_bench.model.config import ModelConfig, ModelResult
from attn_bench.model.hf import skip_attention, truth_attention
from attn_bench.model.run import _blocked

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "model-tiny", "--seq-lens", "64", "--no-progress"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The command in a subprocess, as a user runs it."""
    cmd = [sys.executable, "-m", "attn_bench.cli", "model", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _invoke(*args: str):
    """The command in this process (its worker is still a subprocess): quicker than :func:`_cli`."""
    from typer.testing import CliRunner

    from attn_bench.cli import app

    return CliRunner().invoke(app, ["model", *args])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "run"
    res = _cli(*TINY, "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def test_tiny_run_end_to_end(tiny_run: Path) -> None:
    rows = _rows(tiny_run / "results.csv")
    impls = [r["impl"] for r in rows]
    assert impls == ["skip", "sdpa", "av_full", "av_sliding_window", "av_performer"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["seq_len"] == "64" and r["arch"] == "llama" and r["pass"] == "fwd"
        n, t = int(r["seq_len"]) * int(r["batch"]), float(r["time_ms"])
        assert float(r["tokens_per_s"]) == pytest.approx(n / (t * 1e-3), rel=1e-6)
        assert float(r["peak_mem_bytes"]) > 0 and float(r["params"]) > 0
        if r["impl"] != "skip":  # gated: within the bound, and the bound below attention's effect
            assert float(r["max_err"]) <= float(r["err_bound"]) < float(r["skip_err"])
    byimpl = {r["impl"]: r for r in rows}
    assert float(byimpl["av_full"]["sdpa_diff"]) <= float(byimpl["av_full"]["err_bound"])
    assert float(byimpl["sdpa"]["sdpa_diff"]) == 0.0
    assert float(byimpl["av_sliding_window"]["sdpa_diff"]) > float(byimpl["av_sliding_window"]["err_bound"])
    for name in ("README.md", "metadata.json", "time_vs_n.png", "tokens_per_s_vs_n.png", "attn_share.png"):
        assert (tiny_run / name).stat().st_size > 0, name
    page = (tiny_run / "README.md").read_text()
    assert "From which N does each variant pay off" in page and "| llama | fwd | av_performer | sdpa |" in page


def test_resume_runs_only_the_missing_rows_and_the_gate_catches_a_wrong_output(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    rows = _rows(out / "results.csv")
    with open(out / "results.csv", "w", newline="") as f:  # drop the Performer's row
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows[:-1])
    monkeypatch.setenv("ATTN_BENCH_FAULT", "wrong:64")  # the worker adds 1e-2 to the logits it gates
    res = _invoke("--out", str(out), "--resume", "--no-progress", "--no-report")
    assert res.exit_code == 0, res.output
    again = _rows(out / "results.csv")
    assert again[:-1] == rows[:-1]  # finished rows kept as they were, not measured again
    last = again[-1]
    assert last["impl"] == "av_performer" and last["status"] == "wrong" and last["time_ms"] == ""
    assert float(last["max_err"]) > float(last["err_bound"]) > 0
    # resuming with other options is refused
    res = _invoke("--out", str(out), "--resume", "--impls", "sdpa", "--no-progress")
    assert res.exit_code == 2 and "--resume with no options" in " ".join(res.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--impls", "sdpa,nope"], "--impls"),
        (["--seq-lens", "64,abc"], "--seq-lens"),
        (["--dtype", "int8"], "--dtype"),
        (["--layers", "0"], "--layers"),
        (["--device", "tpu"], "--device"),
        (["--preset", "nope"], "--preset"),
    ],
)
def test_bad_option_exits_2_naming_it(args: list[str], needle: str, tmp_path: Path) -> None:
    res = _invoke(*args, "--out", str(tmp_path / "x"), "--no-progress")
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not (tmp_path / "x").exists()  # refused before anything was written


class _Layer:
    def __init__(self, is_causal: bool) -> None:
        self.is_causal = is_causal


def test_skip_attention_is_q_plus_k_plus_v_per_head() -> None:
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, weights = skip_attention(_Layer(True), q, k, v, None)
    assert weights is None and out.shape == (2, 5, 4, 8)
    for h in range(4):
        torch.testing.assert_close(out[:, :, h], (q[:, h] + k[:, h // 2] + v[:, h // 2]))


@pytest.mark.parametrize("causal", [True, False])
def test_truth_attention_matches_sdpa_in_float64(causal: bool) -> None:
    import attention_variants as av
    from attn_bench.model import hf as model_hf

    q, k, v = (torch.randn(1, 4, 33, 16, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    model_hf._TRUTH["variant"] = av.FullAttention()
    out, _ = truth_attention(_Layer(causal), q, k, v, None, scaling=0.3)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal, scale=0.3
    )
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-12, atol=1e-12)
    # the sliding window: keys j with i - 3 <= j <= i (causal) or |i - j| <= 3, written out here
    model_hf._TRUTH["variant"] = av.SlidingWindowAttention(window=3)
    out, _ = truth_attention(_Layer(causal), q, k, v, None, scaling=0.3)
    i, j = torch.arange(33)[:, None], torch.arange(33)[None, :]
    mask = (j <= i) & (j >= i - 3) if causal else (j - i).abs() <= 3
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
    )
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_crossover() -> None:
    import pandas as pd

    from attn_bench.model.report import crossover, largest_common_speedup

    def row(impl: str, n: int, t: float | None, status: str = "ok") -> dict:
        return {"arch": "llama", "pass": "fwd", "impl": impl, "seq_len": n, "time_ms": t, "status": status}

    rows = [row("sdpa", 512, 1.0), row("w", 512, 2.0), row("sdpa", 1024, 3.0), row("w", 1024, 2.5)]
    rows += [row("sdpa", 2048, 9.0), row("w", 2048, 5.0), row("sdpa", 4096, None, "oom"), row("w", 4096, 9.0)]
    df = pd.DataFrame(rows)
    n, how = crossover(df, "llama", "fwd", "w", "sdpa")
    assert n == "1024" and "sdpa out of memory from N=4096" in how
    assert largest_common_speedup(df, "llama", "fwd", "w", "sdpa") == "1.80x at N=2048"
    df.loc[(df["impl"] == "w") & (df["seq_len"] == 2048), "time_ms"] = 10.0  # slower again at 2048
    assert crossover(df, "llama", "fwd", "w", "sdpa")[0] == "4096"
    assert crossover(df, "llama", "fwd", "sdpa", "w")[0] == ""  # out of memory at 4096 where w ran


def test_rows_after_a_failure_are_not_run() -> None:
    cfg = ModelConfig(arch="llama", impl="sdpa", seq_len=4096, kv_heads=2)
    line = cfg.line_key()
    assert _blocked(cfg, {}) is None
    res = _blocked(cfg, {line: (2048, "oom")})
    assert isinstance(res, ModelResult) and res.status == "oom" and "N=2048" in res.error
    assert _blocked(cfg, {line: (2048, "timeout")}).status == "skipped"
    assert _blocked(cfg, {line: (8192, "oom")}) is None  # a failure at a larger N does not block
    other = ModelConfig(arch="llama", impl="av_full", seq_len=4096, kv_heads=2)
    assert _blocked(other, {line: (2048, "oom")}) is None


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="kv_heads"):
        ModelConfig(arch="llama", impl="sdpa", seq_len=64, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="impl"):
        ModelConfig(arch="llama", impl="flash", seq_len=64)
    with pytest.raises(ValueError, match="bert has no grouped-query"):
        ModelConfig(arch="bert", impl="sdpa", seq_len=64, heads=4, kv_heads=2)


def test_presets_expand_in_order_of_n() -> None:
    from attn_bench.model.config import expand_model_groups, load_model_presets

    presets = load_model_presets()
    assert {"model-quick", "model-gpu"} <= set(presets)
    configs = expand_model_groups(presets["model-quick"].groups)
    keys = [(c.seq_len, c.pass_ != "fwd") for c in configs]
    assert keys == sorted(keys)  # a time budget cuts the longest N
    assert all(c.kv_heads == c.heads for c in configs if c.arch == "bert")
    assert {c.impl for c in configs} == {"skip", "sdpa", "av_full", "av_sliding_window", "av_performer"}
    sw = [c for c in configs if c.impl == "av_sliding_window"]
    assert sw and all(dict(c.options) == {"window": 128} for c in sw)
    gpu = expand_model_groups(presets["model-gpu"].groups, {"seq_lens": [1024]})
    assert {c.seq_len for c in gpu} == {1024} and {c.dtype for c in gpu} == {"bfloat16"}


def test_archs_option_selects_groups() -> None:
    from attn_bench.model.config import expand_model_groups, load_model_presets

    groups = load_model_presets()["model-gpu"].groups
    llama = expand_model_groups(groups, {"archs": ["llama"], "seq_lens": [4096]})
    # Only the preset's Llama: not a second Llama at the encoder group's sizes.
    assert {c.arch for c in llama} == {"llama"} and len({c.intermediate for c in llama}) == 1
    assert len({(c.impl, c.pass_) for c in llama}) == len(llama)
    bert = expand_model_groups(groups, {"archs": ["bert"], "seq_lens": [1024]})
    assert {c.arch for c in bert} == {"bert"}
    # An arch no group has replaces every group's.
    only_llama = ({"archs": ["llama"], "seq_lens": [512]},)
    assert {c.arch for c in expand_model_groups(only_llama, {"archs": ["bert"]})} == {"bert"}


def test_report_tells_two_models_of_one_arch_apart(tmp_path: Path) -> None:
    from attn_bench.model.config import ModelResult, expand_model_groups, write_model_results
    from attn_bench.model.report import crossover, load_model_frame

    groups = ({"archs": ["llama"], "impls": ["sdpa", "av_full"], "seq_lens": [512, 1024], "passes": ["fwd"]},)
    configs = expand_model_groups(groups) + expand_model_groups(groups, {"intermediate": 1024})
    rows = [ModelResult(c, "ok", time_ms=float(c.seq_len + (c.impl == "sdpa"))) for c in configs]
    write_model_results(tmp_path / "results.csv", rows)
    df = load_model_frame(tmp_path)
    labels = set(df["arch"])
    assert len(labels) == 2 and all(label.startswith("llama (") for label in labels)
    for label in labels:
        assert crossover(df, label, "fwd", "av_full", "sdpa")[0] == "512"
