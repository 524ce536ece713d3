"""Cards side by side (``attn-bench report DIR1 DIR2 ...``, or one run over mixed cards): rows
matched on everything but the device, each card's time and speed-up against its own SDPA. The runs
here are made up: their rows name fake cards (``device_name``), their metadata a machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.core.config import BenchConfig, BenchResult
from attn_bench.core.ray_executor import cluster_problem
from attn_bench.core.results import write_metadata, write_results

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
LINES = [("full", "torch"), ("full", "sdpa"), ("performer", "torch"), ("performer", "sdpa")]


def _cfg(variant: str, backend: str, n: int) -> BenchConfig:
    options = (("num_features", 16),) if variant == "performer" else ()
    return BenchConfig(variant, backend, n, device="cuda", dtype="bfloat16", heads=2, head_dim=64, options=options)


def _run(out: Path, card: str | dict[int, str], speed: float, lengths=(1024, 4096)) -> Path:
    """A run on ``card`` (or a card per N) where every time is the base time over ``speed``."""
    base = {"torch": 2.0, "sdpa": 1.0}
    rows = []
    for n in lengths:
        for variant, backend in LINES:
            cfg = _cfg(variant, backend, n)
            name = card if isinstance(card, str) else card[n]
            if variant == "performer" and backend == "sdpa":  # the copy of full / sdpa, as a sweep writes it
                note = "same computation as full/sdpa; measured once"
                rows.append(BenchResult(cfg, "ok", time_ms=n / 1024 / speed, device_name=name, note=note))
                continue
            t = base[backend] * n / 1024 / speed * (0.25 if variant == "performer" else 1.0)
            rows.append(BenchResult(cfg, "ok", time_ms=t, time_ms_p10=t, time_ms_p90=t, device_name=name, node="n1"))
    out.mkdir(parents=True)
    write_results(out / "results.csv", rows)
    write_metadata(out, {"preset": "made-up", "status": "complete", "gpu": "Some GPU", "cpu_model": "Some CPU"})
    return out


def _text(res) -> str:
    return " ".join(res.output.replace("│", " ").split())


def test_two_runs_on_different_cards_side_by_side(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "Fake A100", speed=1.0)
    b = _run(tmp_path / "b", "Fake H100", speed=2.0, lengths=(1024, 4096, 16384))  # N=16384 on H100 only
    out = tmp_path / "cards"
    res = runner.invoke(app, ["report", str(a), str(b), "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "6 rows measured on every card" in _text(res)  # 3 lines (the copy left out) x 2 lengths
    rows = pd.read_csv(out / "cards.csv")
    assert set(rows["card"]) == {"Fake A100", "Fake H100"}
    at = rows.set_index(["card", "variant", "backend", "seq_len"])
    # Each card's time, and its speed-up against its own SDPA (the Performer's: full's SDPA row).
    assert at.loc[("Fake A100", "full", "torch", 4096), "time_ms"] == pytest.approx(8.0)
    assert at.loc[("Fake H100", "full", "torch", 4096), "time_ms"] == pytest.approx(4.0)
    assert at.loc[("Fake A100", "full", "torch", 4096), "speedup"] == pytest.approx(0.5)
    assert at.loc[("Fake H100", "performer", "torch", 16384), "speedup"] == pytest.approx(2.0)
    page = (out / "README.md").read_text()
    assert "Cards: **Fake A100**, **Fake H100**" in page
    # The headline is at the largest N both cards measured, one column pair per card.
    assert "| setting | pass | line | N | Fake A100 ms | Fake A100 vs sdpa | Fake H100 ms | Fake H100 vs sdpa |" in page
    assert "| bfloat16 B=1 H=2 D=64 non-causal | fwd | full / torch | 4096 | 8 | 0.5 | 4 | 0.5 |" in page
    assert "| performer m=16 / torch | 4096 | 2 | 2 | 1 | 2 |" in page
    pngs = sorted(p.name for p in out.glob("cards_*.png"))
    assert len(pngs) == 2 and all(f"]({p})" in page for p in pngs)


def test_runs_with_no_row_in_common_exit_3(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "Fake A100", 1.0, lengths=(1024,))
    b = _run(tmp_path / "b", "Fake H100", 1.0, lengths=(2048,))
    res = runner.invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "cards")])
    assert res.exit_code == 3 and "No row was measured on every card" in _text(res)


def test_the_same_card_in_two_runs_stays_apart(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "Fake H100", 1.0)
    b = _run(tmp_path / "b", "Fake H100", 2.0)
    res = runner.invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "cards")])
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(tmp_path / "cards" / "cards.csv")["card"]) == {"Fake H100 (a)", "Fake H100 (b)"}


def test_compare_across_cards_points_to_the_side_by_side_report(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "Fake A100", 1.0)
    b = _run(tmp_path / "b", "Fake H100", 2.0)
    res = runner.invoke(app, ["report", str(a), "--compare", str(b)])
    assert res.exit_code == 3
    assert "No card in common" in _text(res) and f"report {a} {b}" in _text(res)


def test_one_run_over_mixed_cards_has_its_cards_section(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", {1024: "Fake A100", 4096: "Fake H100"}, 1.0)
    res = runner.invoke(app, ["report", str(a)])
    assert res.exit_code == 0, res.output
    page = (a / "README.md").read_text()
    assert "## Cards side by side" in page and "Cards: **Fake A100**, **Fake H100**" in page
    assert "0 matches were measured on every card" in page  # each row ran once, on one card
    assert list(a.glob("cards_*.png"))


def test_an_older_run_names_its_card_from_its_metadata(tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(ROOT / "reports" / "decode-quick", old)
    cpu = json.loads((old / "metadata.json").read_text())["cpu_model"]
    new = tmp_path / "new"
    shutil.copytree(old, new)
    df = pd.read_csv(new / "results.csv")
    df["device_name"] = "Fake CPU"
    df["time_ms"] = df["time_ms"] / 2
    df.to_csv(new / "results.csv", index=False)
    out = tmp_path / "cards"
    res = runner.invoke(app, ["report", str(old), str(new), "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(out / "cards.csv")
    assert set(rows["card"]) == {cpu, "Fake CPU"}
    assert rows.groupby("card").size().nunique() == 1  # the same rows on both


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--out", "X"], "--out"), (["SECOND", "--compare", "SECOND"], "--compare"), (["FIRST"], "DIRECTORY")],
)
def test_bad_report_options(tmp_path: Path, args: list[str], option: str) -> None:
    a = _run(tmp_path / "a", "Fake A100", 1.0)
    b = _run(tmp_path / "b", "Fake H100", 1.0)
    args = [str({"X": tmp_path / "x", "SECOND": b, "FIRST": a}.get(x, x)) for x in args]
    res = runner.invoke(app, ["report", str(a), *args])
    assert res.exit_code == 2 and option in res.output and "Traceback" not in res.output, res.output


def test_cluster_problems() -> None:
    cpu_nodes = [{"CPU": 4.0}, {"CPU": 8.0}]
    gpu_nodes = [
        {"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 1.0},
        {"CPU": 16.0, "GPU": 4.0, "accelerator_type:A100": 1.0},
    ]
    assert cluster_problem({"cuda"}, cpu_nodes, None, None)[0] == "--device"
    assert cluster_problem({"cuda"}, gpu_nodes, None, None) is None
    assert cluster_problem({"cuda"}, gpu_nodes, None, "H100") is None
    option, why = cluster_problem({"cuda"}, gpu_nodes, None, "B200")
    assert option == "--card" and "its cards: A100, H100" in why
    assert cluster_problem({"cpu"}, cpu_nodes, 8, None) is None
    assert cluster_problem({"cpu"}, cpu_nodes, 9, None) == (
        "--cpus-per-row",
        "9 cores per row, and the largest node has 8",
    )
    assert cluster_problem({"cpu"}, [{"GPU": 1.0}], None, None)[0] == "--device"
