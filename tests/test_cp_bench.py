"""The context-parallel benchmark's targets and options, and the analytic traffic per rank (no processes)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
import torch

from attention_variants.distributed import analytic_bytes

B, H, HK, D, N = 1, 4, 2, 16, 256


def _busiest(variant: str, world: int, layout: str, causal: bool, **opts: Any) -> float:
    """Bytes (forward + backward) of the rank that sends most, at ``N`` tokens per rank."""
    shapes = ((B, H, N, D), (B, HK, N, D), (B, HK, N, D))
    return max(
        sum(analytic_bytes(variant, *shapes, world=world, rank=r, layout=layout, causal=causal, **opts).values())
        for r in range(world)
    )


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("variant", "opts"), [("sliding_window", {"window": 64}), ("performer", {"num_features": 32})])
def test_window_and_performer_traffic_is_flat_in_ranks(variant: str, opts: dict, layout: str, causal: bool) -> None:
    # From P = 3 on (interior ranks exist) the busiest rank's bytes grow at most by an all-reduce's
    # 2 (P - 1) / P, which tends to 2: at P = 16 at most 1.875 / 1.333 of P = 3.
    at3 = _busiest(variant, 3, layout, causal, **opts)
    for world in (4, 8, 16):
        limit = (2 * (world - 1) / world) / (2 * 2 / 3)
        assert _busiest(variant, world, layout, causal, **opts) <= at3 * limit * (1 + 1e-12), world
    # whereas the ring's grows as P - 1
    assert _busiest("full", 16, layout, causal) > 5 * _busiest("full", 3, layout, causal)


def test_causal_performer_sends_one_state_per_hand_over() -> None:
    # contiguous: ranks 0..P-2 hand the prefix on once, the last rank never; zigzag: the end ranks
    # once, the middle ranks twice (going out and coming back).
    m, dv = 32, D
    state = B * HK * m * (dv + 1) * 4
    shapes = ((B, H, N, D), (B, HK, N, D), (B, HK, N, dv))
    for layout, want in (("contiguous", [1, 1, 1, 0]), ("zigzag", [1, 2, 2, 1])):
        for r, sends in enumerate(want):
            got = analytic_bytes(
                "performer", *shapes, world=4, rank=r, layout=layout, causal=True, num_features=m, kernel="relu"
            )
            assert got["forward"] == sends * state, (layout, r)
    backward = [
        analytic_bytes(
            "performer", *shapes, world=4, rank=r, layout="contiguous", causal=True, num_features=m, kernel="relu"
        )["backward"]
        for r in range(4)
    ]
    assert backward == [0, state, state, state]  # the gradient walks back: rank 0 sends nothing


def _row(variant: str, world: int, n_per_rank: int, sent: float, analytic: float, **kw: Any) -> dict[str, Any]:
    return {
        "variant": variant,
        "layout": "contiguous",
        "causal": False,
        "scaling": "weak",
        "world": world,
        "n_total": n_per_rank * world,
        "n_per_rank": n_per_rank,
        "window": 16,
        "fwd_s": 1.0,
        "fwd_bwd_s": kw.get("t", 1.0),
        "fwd_bytes_max": sent,
        "bwd_bytes_max": 0.0,
        "fwd_bytes_analytic_max": analytic,
        "bwd_bytes_analytic_max": 0.0,
        "bytes_ratio": sent / analytic if analytic else float("nan"),
        "status": "ok",
    }


def test_targets_catch_traffic_off_the_count_and_growing_with_ranks() -> None:
    from attn_bench.cp.report import targets

    good = pd.DataFrame(
        [_row("performer", p, 64, 100.0 * (2 * (p - 1) / p), 100.0 * (2 * (p - 1) / p)) for p in (3, 4)]
        + [_row("sliding_window", p, 64, 50.0, 50.0) for p in (3, 4)]
    )
    got = targets(good, "cpu")
    assert set(got["verdict"]) == {"pass"}, got
    bad = pd.DataFrame(
        [_row("sliding_window", 3, 64, 50.0, 50.0), _row("sliding_window", 4, 64, 75.0, 70.0)]  # grows, off by 7%
    )
    got = targets(bad, "cpu").set_index("target")
    assert got.loc["bytes", "verdict"] == "FAIL"
    assert got.loc["flat", "verdict"] == "FAIL"


def test_ring_efficiency_judged_on_gpus_only() -> None:
    from attn_bench.cp.report import targets

    rows = [_row("full", 1, 16384, 0.0, 0.0, t=1.0), _row("full", 4, 16384, 300.0, 300.0, t=1.5)]
    on_gpu = targets(pd.DataFrame(rows), "cuda").set_index("target")
    assert on_gpu.loc["ring", "verdict"] == "FAIL"  # efficiency 1 / 1.5 = 0.67 < 0.8
    assert on_gpu.loc["ring", "value"].endswith("0.67")
    on_cpu = targets(pd.DataFrame(rows), "cpu").set_index("target")
    assert on_cpu.loc["ring", "verdict"].startswith("-")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "bfloat16"], "--dtype"),
        (["--device", "tpu"], "--device"),
        *([(["--device", "cuda"], "GPUs")] if not torch.cuda.is_available() else []),
    ],
)
def test_cp_bench_rejects_bad_device_options(args: list[str], message: str, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from attn_bench.cli import app

    res = CliRunner().invoke(app, ["cp", *args, "--out", str(tmp_path / "cp")])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "cp").exists()
