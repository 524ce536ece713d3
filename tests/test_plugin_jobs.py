"""The example plug-in of docs/add-your-attention.md (``docs/examples/linear_attention.py``: linear
attention with elu+1 features, not a softmax) through every job on tiny problems, each job's attention
checked against float64 where the job computes it; and a broken plug-in refused by every job (exit 2,
nothing written)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attn_bench.cli import app

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "linear_attention.py"
runner = CliRunner()
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only path of the GPU commands")


@pytest.fixture(scope="module")
def registry():
    """The plug-in registered in this process for this module; the registry is ours again after it."""
    import attention_variants.base as base
    import attn_bench.core.plugins as plugins
    from attn_bench.core.plugins import load_plugin

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "_VARIANTS", dict(base._VARIANTS))
        mp.setattr(base, "_EXTRA_BACKENDS", list(base._EXTRA_BACKENDS))
        mp.setattr(plugins, "_LOADED", dict(plugins._LOADED))
        load_plugin(str(EXAMPLE))
        yield


def linear_attention_loop(q, k, v, causal: bool, kpm=None) -> torch.Tensor:
    """Linear attention written out query by query in float64: ``phi(x) = elu(x / D^(1/4)) + 1``
    (elu by its definition), the sums over the keys the query sees, GQA by head index."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]

    def phi(x):
        x = x * d**-0.25
        return torch.where(x > 0, x, torch.exp(x) - 1) + 1

    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(nq):
                seen = [j for j in range(nk) if (not causal or j <= i + nk - nq) and (kpm is None or kpm[bi, j])]
                if not seen:
                    continue
                w = torch.stack([phi(q[bi, hi, i]) @ phi(k[bi, kh, j]) for j in seen])
                out[bi, hi, i] = (w[:, None] * v[bi, kh, seen]).sum(0) / w.sum()
    return out


def test_example_is_one_short_file_shown_whole_on_its_page() -> None:
    assert len(EXAMPLE.read_text().splitlines()) < 100
    page = (ROOT / "docs" / "add-your-attention.md").read_text()
    blocks = [b for b in page.split("```python\n")[1:] if '@av.register_variant("linear_elu")' in b]
    assert len(blocks) == 1 and blocks[0].split("```")[0] == EXAMPLE.read_text()


@pytest.mark.parametrize(("nq", "nk"), [(9, 9), (5, 11), (11, 5)])
def test_example_matches_an_independent_float64_computation(registry, nq: int, nk: int) -> None:
    import attention_variants as av

    var = av.get_variant("linear_elu")
    g = torch.Generator().manual_seed(nq * nk)
    q, k, v = (
        torch.randn(2, 4, nq, 8, generator=g),
        torch.randn(2, 2, nk, 8, generator=g),
        torch.randn(2, 2, nk, 6, generator=g),
    )
    kpm = torch.rand(2, nk, generator=g) > 0.3
    for causal in (False, True):
        for mask in (None, kpm):
            want = linear_attention_loop(q, k, v, causal, mask)
            for backend in ("torch", "reference"):
                got = var(q, k, v, causal=causal, backend=backend, key_padding_mask=mask)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if nq == nk:  # decoding: a prompt, then one token at a time, equals the causal loop
        q64, k64, v64 = (x.double() for x in (q, k, v))
        out, state = var.prefill(q64[:, :, :3], k64[:, :, :3], v64[:, :, :3])
        outs = [out] + [var.step(*(x[:, :, i : i + 1] for x in (q64, k64, v64)), state)[0] for i in range(3, nq)]
        torch.testing.assert_close(torch.cat(outs, 2), linear_attention_loop(q, k, v, True), rtol=1e-12, atol=1e-12)
        assert state.nbytes == 2 * 2 * 8 * 7 * 8  # B Hk D (Dv + 1) float64: independent of the length


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(*args: str) -> None:
    res = runner.invoke(app, [*args, "--plugin", str(EXAMPLE)])
    assert res.exit_code == 0, res.output[-3000:] + repr(res.exception)


@pytest.fixture(scope="module")
def runs(registry, tmp_path_factory) -> Path:
    """Every job once with the plug-in, into one folder per job."""
    out = tmp_path_factory.mktemp("jobs")
    quiet = ("--no-progress",)
    _run("task", "--preset", "task-tiny", "--variants", "linear_elu", "--out", str(out / "task"), *quiet)
    _run("long", "--preset", "long-tiny", "--variants", "linear_elu", "--out", str(out / "long"), *quiet)
    _run("swap", "--preset", "swap-tiny", "--variants", "linear_elu", "--out", str(out / "swap"), *quiet)
    model = ("--impls", "av_linear_elu", "--seq-lens", "64", "--out", str(out / "model"))
    _run("model", "--preset", "model-tiny", *model, *quiet)
    shape = ("--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--batch", "1", "--dtypes", "float32")
    sweep = ("--preset", "decode-quick", "--variants", "linear_elu", "--backends", "torch", "--seq-lens", "40")
    _run("sweep", *sweep, "--passes", "fwd,fwd_bwd,decode", "--causal", *shape, "--no-accuracy",
         "--min-run-time", "0.005", "--out", str(out / "sweep"), *quiet)  # fmt: skip
    cp = ("--ranks", "2", "--n", "16", "--variants", "linear_elu", "--layouts", "zigzag", "--dtype", "float64")
    _run("cp", *cp, "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--repeats", "1", "--out", str(out / "cp"))
    return out


def test_task_trains_it_causal_and_not(runs: Path) -> None:
    rows = _rows(runs / "task" / "results.csv")
    assert {(r["task"], r["variant"], r["status"]) for r in rows} == {
        ("mqar", "linear_elu", "ok"),
        ("listops", "linear_elu", "ok"),
    }
    assert all(0 <= float(r["final_acc"]) <= 1 and math.isfinite(float(r["final_loss"])) for r in rows)
    assert "linear_elu" in (runs / "task" / "README.md").read_text()


def test_long_attends_over_the_whole_input_with_it(runs: Path) -> None:
    rows = _rows(runs / "long" / "results.csv")
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["variant"] for r in rows if r["strategy"] == "whole"} == {"linear_elu"}
    assert "whole linear_elu" in (runs / "long" / "README.md").read_text()


def test_swap_swaps_it_in_through_the_task_model_and_transformers(runs: Path) -> None:
    rows = _rows(runs / "swap" / "results.csv")
    assert all(r["status"] == "ok" for r in rows), rows
    swapped = {(r["model"], r["mode"]) for r in rows if r["variant"] == "linear_elu"}
    assert swapped == {("task", "swap"), ("task", "scratch"), ("hf", "swap")}
    assert all(math.isfinite(float(r["start_loss"])) for r in rows)


def test_model_runs_av_linear_elu_through_its_float64_logits_gate(runs: Path) -> None:
    (row,) = _rows(runs / "model" / "results.csv")
    assert row["impl"] == "av_linear_elu" and row["status"] == "ok", row
    assert float(row["max_err"]) <= float(row["err_bound"]) < float(row["skip_err"])


def test_sweep_and_decode_rows_are_gated_against_float64(runs: Path) -> None:
    rows = _rows(runs / "sweep" / "results.csv")
    assert {r["pass"] for r in rows} == {"fwd", "fwd_bwd", "decode"}
    assert all(r["status"] == "ok" and float(r["max_err"]) <= float(r["err_bound"]) for r in rows), rows
    decode = next(r for r in rows if r["pass"] == "decode")
    assert int(decode["peak_mem_bytes"]) == 1 * 1 * 8 * 9 * 4  # its state: B Hk D (Dv + 1) float32


def test_cp_runs_the_all_gather_fallback_exactly(runs: Path) -> None:
    rows = _rows(runs / "cp" / "results.csv")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert {r["strategy"] for r in rows} == {"all-gather"}
    assert all(float(r["max_err"]) <= float(r["err_bound"]) < 1e-8 for r in rows)  # float64 against float64
    assert all(float(r["bytes_ratio"]) == pytest.approx(1.0) for r in rows)
    assert "all-gather" in (runs / "cp" / "README.md").read_text()


@NO_CUDA
def test_device_check_and_tune_take_it(registry, tmp_path: Path) -> None:
    out = tmp_path / "dc"
    _run("device-check", "--out", str(out), "--budget-s", "30", "--variants", "linear_elu")
    record = json.loads((out / "device-check.json").read_text())
    assert record["step_args"] == ["--plugin", str(EXAMPLE), "--variants", "linear_elu"]
    res = runner.invoke(app, ["tune", "--out", str(tmp_path / "tune"), "--plugin", str(EXAMPLE)])
    assert res.exit_code == 2 and "needs a CUDA device" in res.output  # loaded, then nothing to tune here


CAUSAL_ONLY = """
import attention_variants as av


@av.register_variant("causal_only")
class CausalOnly(av.AttentionVariant):
    softmax = True
    causal_modes = (True,)  # it declares it computes causal attention only

    def mask_mod(self, nq, nk, causal, device="cpu"):
        return av.masks.mask_mod(nq, nk, causal=True)
"""


def test_a_row_the_variant_cannot_do_is_unsupported_with_the_reason(own_registry, tmp_path: Path) -> None:
    plugin = tmp_path / "causal_only.py"
    plugin.write_text(CAUSAL_ONLY)
    out = tmp_path / "task"
    res = runner.invoke(app, ["task", "--preset", "task-tiny", "--variants", "causal_only", "--plugin", str(plugin),
                              "--out", str(out), "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = {r["task"]: r for r in _rows(out / "results.csv")}
    assert rows["mqar"]["status"] == "ok"  # a causal decoder
    assert rows["listops"]["status"] == "unsupported"  # an encoder
    assert "does not compute causal=False" in rows["listops"]["error"]


# -- a broken plug-in, in every job ---------------------------------------------------------------

WRONG_DTYPE = """
import attention_variants as av


@av.register_variant("broken")
class Broken(av.AttentionVariant):
    def dense(self, q, k, v, causal, scale, upcast=True, key_padding_mask=None):
        return (q @ k.transpose(-1, -2)).softmax(-1).double() @ v.double()  # right numbers, wrong dtype
"""
NO_REFERENCE = """
import attention_variants as av


@av.register_variant("broken")
class Broken(av.AttentionVariant):
    '''Neither a softmax under a mask nor a dense(): it computes nothing.'''
"""
BROKEN = {"wrong_dtype": (WRONG_DTYPE, "dtype"), "no_reference": (NO_REFERENCE, "must define dense()")}
JOBS = {
    "task": ["task", "--preset", "task-tiny", "--variants", "broken"],
    "long": ["long", "--preset", "long-tiny", "--variants", "broken"],
    "swap": ["swap", "--preset", "swap-tiny", "--variants", "broken"],
    "model": ["model", "--preset", "model-tiny", "--impls", "av_broken"],
    "sweep": ["sweep", "--variants", "broken", "--backends", "auto", "--seq-lens", "32"],
    "decode": ["decode", "--variants", "broken", "--backends", "auto", "--seq-lens", "32"],
    "cp": ["cp", "--ranks", "2", "--n", "16", "--variants", "broken"],
    "device-check": ["device-check", "--variants", "broken"],
}


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    import attention_variants.base as base
    import attn_bench.core.plugins as plugins

    monkeypatch.setattr(base, "_VARIANTS", dict(base._VARIANTS))
    monkeypatch.setattr(base, "_EXTRA_BACKENDS", list(base._EXTRA_BACKENDS))
    monkeypatch.setattr(plugins, "_LOADED", dict(plugins._LOADED))


@pytest.mark.parametrize("job", list(JOBS))
@pytest.mark.parametrize("kind", [*BROKEN, "import_error"])
def test_a_broken_plugin_is_refused_before_anything_is_written(
    own_registry, tmp_path: Path, job: str, kind: str
) -> None:
    plugin = tmp_path / f"{kind}.py"
    plugin.write_text(BROKEN[kind][0] if kind in BROKEN else "import no_such_module_xyz\n")
    out = tmp_path / "out"
    res = runner.invoke(app, [*JOBS[job], "--plugin", str(plugin), "--out", str(out)])
    text = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2, res.output
    assert "--plugin" in text and "Traceback" not in res.output, res.output
    assert (BROKEN[kind][1] if kind in BROKEN else "No module named 'no_such_module_xyz'") in text, text
    assert not out.exists()
