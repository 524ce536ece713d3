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


STRATEGY = {"full": "ring", "sliding_window": "halo", "performer": "scan"}


def _row(variant: str, world: int, n_per_rank: int, sent: float, analytic: float, **kw: Any) -> dict[str, Any]:
    return {
        "variant": variant,
        "strategy": STRATEGY[variant],
        "layout": "contiguous",
        "causal": False,
        "scaling": "weak",
        "world": world,
        "n_total": n_per_rank * world,
        "n_per_rank": n_per_rank,
        "options": '{"window": 16}' if variant == "sliding_window" else "{}",
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


# -- what attn-bench cp refuses before it starts, and a run in which nothing ran ------------------

# A run as small as can be: should a refusal regress, the row runs in seconds instead of minutes.
SMALL = ["--ranks", "1", "--n", "8", "--variants", "full", "--layouts", "contiguous", "--causal", "false"]
SMALL += ["--heads", "1", "--kv-heads", "1", "--head-dim", "4", "--repeats", "1", "--timeout", "30"]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--n", "-256"], "--n"),
        (["--n", "0"], "--n"),
        (["--ranks", "0"], "--ranks"),
        (["--repeats", "-1"], "--repeats"),
        (["--repeats", "0"], "--repeats"),
        (["--threads", "-1"], "--threads"),
        (["--timeout", "-1"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--variants", "sliding_window", "--window", "-1"], "--window"),
        (["--window", "-1"], "--window"),
        (["--heads", "3", "--kv-heads", "2"], "--kv-heads"),
        (["--batch", "0"], "--batch"),
        (["--head-dim", "0"], "--head-dim"),
        (["--num-features", "0"], "--num-features"),
        (["--causal", "maybe"], "--causal"),
        (["--ranks", "3", "--n", "8"], "--n"),
    ],
)
def test_cp_refuses_options_no_row_could_run_with(args: list[str], option: str, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from attn_bench.cli import app

    out = tmp_path / "cp"
    res = CliRunner().invoke(app, ["cp", *SMALL, *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output, res.output
    assert not out.exists()


def test_cp_refuses_an_out_that_is_a_file(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from attn_bench.cli import app

    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    res = CliRunner().invoke(app, ["cp", *SMALL, "--out", str(afile)])
    assert res.exit_code == 2, res.output
    assert "--out" in res.output and "not a directory" in " ".join(res.output.replace("│", " ").split())
    assert afile.read_text() == "not a directory\n"


def test_the_cp_row_refuses_what_the_cli_refuses() -> None:
    from attn_bench.core.config import ConfigError
    from attn_bench.cp.run import CPConfig

    good = dict(variant="sliding_window", layout="zigzag", causal=True, world=2, n_total=16, scaling="weak")
    good.update(batch=1, heads=4, kv_heads=2, head_dim=8, dtype="float32", options='{"window": 3}')
    assert CPConfig(**good).strategy == "halo"  # fine
    for change, key in (
        ({"options": '{"window": -1}'}, "window"),
        ({"kv_heads": 3}, "kv_heads"),
        ({"n_total": 10}, "n_total"),  # zigzag on 2 ranks: a multiple of 4
        ({"n_total": 0}, "n_total"),
        ({"batch": 0}, "batch"),
        ({"world": 0}, "world"),
        ({"variant": "nope"}, "variant"),
        ({"dtype": "bfloat16"}, "dtype"),
    ):
        with pytest.raises(ConfigError) as err:
            CPConfig(**{**good, **change})
        assert err.value.key == key, (change, err.value)


def test_a_dead_rank_ends_its_pool_at_once_and_a_run_with_no_ok_row_exits_1(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csv
    import time

    from typer.testing import CliRunner

    from attn_bench.cli import app

    monkeypatch.setenv("ATTN_BENCH_FAULT", "crash")  # every rank's process exits at its first row
    out = tmp_path / "cp"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["cp", *SMALL, "--timeout", "60", "--out", str(out)])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 1, res.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"error"}, rows  # strong and weak
    assert all("exit code 139" in r["error"] for r in rows), rows
    assert seconds < 40, seconds  # not the 60 s of --timeout
