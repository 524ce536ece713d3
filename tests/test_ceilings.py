"""No published rate above the machine's measured ceiling: decoding FLOPs counted for what a step
does, and a row whose rate is impossible made an error with the reason."""

from __future__ import annotations

import pytest
import torch

import attention_variants as av
from attn_bench.core import ceilings
from attn_bench.core.config import BenchConfig, RunSettings
from attn_bench.sweep.measure import run_config

SETTINGS = RunSettings(min_run_time=0.005, min_repeats=3)
B, H, HK, D, DV, M = 2, 4, 2, 16, 8, 32


@pytest.mark.parametrize("context", [0, 7, 1000, 100000])
def test_decode_flops_of_each_state(context: int) -> None:
    """One new token after ``context`` tokens, counted by hand: a KV cache attends to all
    context + 1 keys, a window ring to at most left + 1 of them, the Performer's state to none
    (features of the new query and key, the state update and the readout)."""
    q, k, v = (B, H, 1, D), (B, HK, 1, D), (B, HK, 1, DV)
    seen = context + 1
    assert av.FullAttention().decode_flops(q, k, v, context) == 2 * B * H * seen * (D + DV)
    window = av.SlidingWindowAttention(5)
    assert window.decode_flops(q, k, v, context) == 2 * B * H * min(seen, 6) * (D + DV)
    performer = av.PerformerAttention(num_features=M)
    per_token = 2 * M * D + 2 * M * (DV + 1)  # features, then the state update or the readout
    assert performer.decode_flops(q, k, v, context) == B * (H + HK) * per_token


def test_performer_decode_row_rate_is_possible_at_long_context() -> None:
    """The row that published 3.4e4 GFLOP/s on a 2-core CPU: its rate is now below the ceiling,
    and its FLOPs do not grow with the context."""
    rows = {}
    for n in (64, 4096):
        cfg = BenchConfig("performer", "torch", n, heads=4, head_dim=16, causal=True, pass_="decode")
        rows[n] = run_config(BenchConfig(**{**cfg.__dict__, "options": (("num_features", 32),)}), SETTINGS)
        assert rows[n].status == "ok", rows[n].error
    assert rows[64].flops == rows[4096].flops
    ceiling = ceilings.flops_ceiling("cpu", torch.float32)
    assert rows[4096].tflops * 1e12 < ceiling


def test_a_planted_impossible_rate_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FLOP count 10^6 times too large (a planted bug) gives a rate no CPU reaches: the row is
    an error naming the ceiling, and publishes no time or rate."""
    real = av.FullAttention.flops
    monkeypatch.setattr(av.FullAttention, "flops", lambda self, *a, **kw: real(self, *a, **kw) * 10**6)
    res = run_config(BenchConfig("full", "torch", 256, heads=2, head_dim=32), SETTINGS)
    assert res.status == "error"
    assert "impossible rate" in res.error and "ceiling" in res.error
    assert res.time_ms is None and res.tflops is None and res.flops is not None


def test_a_ceiling_taken_while_busy_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ceiling cached far too low (as if measured on a busy machine) does not refuse a real
    rate: the ceiling is measured again before a row is refused."""
    real = ceilings.flops_ceiling("cpu", torch.float32)
    monkeypatch.setitem(ceilings._GEMM, ("cpu", "torch.float32"), real / 1000)
    # 10x the stale value, far below any real measurement (even one on a loaded machine).
    assert ceilings.rate_problem(real / 100 / 1e12, "cpu", torch.float32) is None
    assert ceilings._GEMM[("cpu", "torch.float32")] >= real / 100
    problem = ceilings.rate_problem(real * 100 / 1e12, "cpu", torch.float32)
    assert problem is not None and "impossible rate" in problem


def test_measure_records_gemm_and_copy() -> None:
    got = ceilings.measure("cpu", [torch.float32, torch.float64]).to_json()
    assert set(got["gemm_gflops"]) == {"float32", "float64"}
    assert all(x > 0 for x in got["gemm_gflops"].values()) and got["copy_gb_s"] > 0
    assert "matmul" in got["method"]
