"""Plug-ins: a variant defined in a file outside the package (the example in docs/harness.md) is listed,
verified, swept, reported and resumed through ``--plugin``, with nothing in bench/ naming it."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _docs_plugin() -> str:
    """The plug-in example of docs/harness.md (the python block that registers ``chunked``)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "harness.md").read_text(), flags=re.S)
    found = [b for b in blocks if '@av.register_variant("chunked")' in b]
    assert len(found) == 1, "docs/harness.md must hold the chunked-attention plug-in example once"
    return found[0]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "chunked.py"
    path.write_text(_docs_plugin())
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "attn_bench.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variants registered in this test are forgotten after it (the registry is process-wide)."""
    import attention_variants.base as base
    import attn_bench.core.plugins as plugins

    monkeypatch.setattr(base, "_VARIANTS", dict(base._VARIANTS))
    monkeypatch.setattr(base, "_EXTRA_BACKENDS", list(base._EXTRA_BACKENDS))
    monkeypatch.setattr(plugins, "_LOADED", dict(plugins._LOADED))


def test_plugin_variant_matches_an_independent_computation(plugin: Path, own_registry: None) -> None:
    """The example's torch backend against a per-chunk loop in float64 (not the checker, not the mask)."""
    from attn_bench.core.plugins import load_plugin

    load_plugin(str(plugin))
    import attention_variants as av

    variant = av.get_variant("chunked", chunk=8)
    assert "chunked" in av.list_variants()
    q, k, v = (torch.randn(1, 4, 30, 16, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    for causal in (False, True):
        out = variant(q, k, v, causal=causal, backend="torch")
        for start in range(0, 30, 8):
            end = min(30, start + 8)
            kk, vv = (x[:, [0, 0, 1, 1], start:end] for x in (k, v))
            s = q[:, :, start:end] @ kk.transpose(-1, -2) / 4.0
            if causal:
                s = s.masked_fill(torch.ones(end - start, end - start).triu(1).bool(), float("-inf"))
            torch.testing.assert_close(out[:, :, start:end], s.softmax(-1) @ vv)


def test_plugin_listed_verified_swept_reported_and_resumed(plugin: Path, tmp_path: Path) -> None:
    listed = _cli("list", "--plugin", str(plugin), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "chunked" in listed.stdout

    verified = _cli(
        "verify", "--plugin", str(plugin), "--variants", "chunked", "--quick", "--dtypes", "float32,float64",
        "--backends", "torch,reference,sdpa,flex", cwd=tmp_path,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "failed" not in verified.stdout

    out = tmp_path / "run"
    args = ["--variants", "chunked", "--backends", "torch,reference,sdpa", "--seq-lens", "128,256", "--chunk", "32"]
    args += ["--no-causal"]
    swept = _cli(
        "sweep", "--plugin", str(plugin), *args, "--passes", "fwd,fwd_bwd", "--no-accuracy", "--no-progress",
        "--min-run-time", "0.01", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stdout + swept.stderr
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert {r["variant"] for r in rows} == {"chunked"} and {r["chunk"] for r in rows} == {"32"}
    assert all(r["status"] == "ok" for r in rows), [(r["backend"], r["status"], r["error"]) for r in rows]
    assert all(float(r["max_err"]) <= float(r["err_bound"]) for r in rows)
    assert "chunked c=32 / torch" in (out / "README.md").read_text()

    # The run's metadata holds the plug-in and the options: --resume alone continues it.
    resumed = _cli("sweep", "--out", str(out), "--resume", "--no-progress", "--no-report", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "12 ok" in resumed.stdout


def test_the_registry_is_ours_again() -> None:
    import attention_variants as av

    assert "chunked" not in av.list_variants()
