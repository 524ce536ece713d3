"""``attn-bench long``: the long-document task (its label provably depends on tokens beyond the
model's length L), the segmentation and pooling of the strategies against computations written
apart, the presets, bad options and a tiny run end to end."""

from __future__ import annotations

import csv
import math
from itertools import product
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.long.models import STRATEGIES, LongClassifier, chunk, unchunk
from attn_bench.long.run import load_long_presets
from attn_bench.task import tasks
from attn_bench.task.tasks import IGNORE, LONG_MARK, LONG_NO, LONG_YES

L = 32


def _answers(row: list[int]) -> list[int]:
    """Marked answers of one document, read token by token: +1 yes, -1 no."""
    return [(1 if row[i + 1] == LONG_YES else -1) for i in range(len(row) - 1) if row[i] == LONG_MARK]


def test_labels_are_the_majority_of_the_marked_answers() -> None:
    data = tasks.long_majority(300, 256, seed=4, evidence=7)
    assert data.inputs.shape == (300, 256) and not data.causal and data.num_classes == 2
    assert (data.labels[:, 1:] == IGNORE).all()
    for row, label in zip(data.inputs.tolist(), data.labels[:, 0].tolist(), strict=True):
        ans = _answers(row)
        assert len(ans) == 7
        assert label == int(sum(ans) > 0)
    assert 0.35 < data.labels[:, 0].float().mean() < 0.65


def test_generator_is_deterministic_per_seed() -> None:
    a, b = tasks.long_majority(50, 128, seed=1), tasks.long_majority(50, 128, seed=1)
    c = tasks.long_majority(50, 128, seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_evidence_is_spread_over_the_whole_document() -> None:
    n = 16 * L
    data = tasks.long_majority(2000, n, seed=0, evidence=7)
    pos = (data.inputs == LONG_MARK).nonzero()[:, 1].float()
    # uniform over [0, n): each sixteenth of the document holds about 1/16 of the marks
    counts = torch.histc(pos, bins=16, min=0, max=n)
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    beyond = (pos >= L).float().mean()
    assert beyond > 0.9  # 15/16 expected


def test_the_label_depends_on_tokens_beyond_L() -> None:
    """Rewriting only the marked answers after position L flips the label of many documents,
    and the best classifier of the first L tokens (the Bayes bound) is far from perfect."""
    n = 8 * L
    data = tasks.long_majority(500, n, seed=3, evidence=7)
    flipped = data.inputs.clone()
    after = torch.zeros_like(flipped, dtype=torch.bool)
    after[:, 1:] = flipped[:, :-1] == LONG_MARK
    after[:, : L + 1] = False
    yes, no = after & (flipped == LONG_YES), after & (flipped == LONG_NO)
    flipped[yes], flipped[no] = LONG_NO, LONG_YES
    new_labels = torch.tensor([int(sum(_answers(r)) > 0) for r in flipped.tolist()])
    assert torch.equal(flipped[:, :L], data.inputs[:, :L])
    changed = (new_labels != data.labels[:, 0]).float().mean()
    assert changed > 0.5
    bound = tasks.prefix_bayes_accuracy(data.inputs, L, 7)
    assert 0.5 <= bound < 0.75
    assert tasks.prefix_bayes_accuracy(data.inputs, n, 7) == pytest.approx(1.0)


def test_prefix_bound_against_a_monte_carlo_estimate() -> None:
    """The closed form against sampling the hidden answers of each document."""
    data = tasks.long_majority(40, 4 * L, seed=9, evidence=5)
    g = torch.Generator().manual_seed(0)
    hits = 0.0
    for row in data.inputs.tolist():
        seen = _answers(row[:L])
        hidden = 5 - len(seen)
        draws = 2 * torch.randint(2, (4000, hidden), generator=g) - 1 if hidden else torch.zeros(4000, 0)
        p_yes = float(((sum(seen) + draws.sum(-1)) > 0).float().mean())
        hits += max(p_yes, 1 - p_yes)
    assert tasks.prefix_bayes_accuracy(data.inputs, L, 5) == pytest.approx(hits / 40, abs=0.02)


def test_chunk_pads_the_last_chunk_and_unchunk_inverts_it() -> None:
    ids = torch.arange(1, 2 * 70 + 1).view(2, 70)
    c = chunk(ids, 32)
    assert c.shape == (2, 3, 32)
    assert torch.equal(c[1, 1], ids[1, 32:64]) and (c[:, 2, 6:] == 0).all()
    assert torch.equal(c[0, 2, :6], ids[0, 64:])
    assert torch.equal(unchunk(c, 70), ids)


WHOLE_OPTIONS = {"sliding_window": {"window": 4}, "performer": {"num_features": 16}}


def _model(strategy: str, n: int, variant: str | None = None) -> LongClassifier:
    torch.manual_seed(0)
    opts = WHOLE_OPTIONS.get(variant or "", {})
    return (
        LongClassifier(strategy, 24, 2, 16, n, variant=variant, options=opts, d_model=16, heads=2, layers=1)
        .double()
        .eval()
    )


def test_segment_pool_equals_chunks_encoded_one_by_one() -> None:
    model = _model("segment_pool", 56)
    ids = tasks.long_majority(3, 56, seed=0, evidence=3, filler=8).inputs
    with torch.no_grad():
        got = model(ids)
        vecs = []
        for start in range(0, 56, 16):
            piece = ids[:, start : start + 16]  # the last one is 8 tokens long, no padding
            h = model.encoder.features(piece)
            vecs.append(h.mean(1))
        want = model.encoder.head(torch.stack(vecs, 1).mean(1, keepdim=True))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_truncate_sees_only_the_first_L_tokens() -> None:
    model = _model("truncate", 64)
    ids = tasks.long_majority(4, 64, seed=0, evidence=3, filler=8).inputs
    other = ids.clone()
    other[:, 16:] = torch.randint(4, 24, other[:, 16:].shape)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(other), rtol=0, atol=0)
        other[:, 3] = (other[:, 3] - 3) % 20 + 4
        assert not torch.allclose(model(ids), model(other))


@pytest.mark.parametrize(
    ("strategy", "variant"), [("hierarchical", None), ("whole", "sliding_window"), ("whole", "performer")]
)
def test_whole_document_strategies_see_tokens_beyond_L(strategy: str, variant: str | None) -> None:
    model = _model(strategy, 64, variant)
    ids = tasks.long_majority(4, 64, seed=0, evidence=3, filler=8).inputs
    other = ids.clone()
    other[:, 40:] = torch.randint(4, 24, other[:, 40:].shape)
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (4, 1, 2)
        assert not torch.allclose(out, model(other))


def test_presets_parse_and_cover_every_strategy_n_and_seed() -> None:
    presets = load_long_presets()
    assert {"long-quick", "long-gpu", "long-tiny"} <= set(presets)
    quick = presets["long-quick"].configs
    keys = {(c.strategy, c.variant, c.seq_len, c.seed) for c in quick}
    lens = sorted({c.seq_len for c in quick})
    seg = quick[0].segment_len
    assert [n // seg for n in lens] == [1, 2, 4, 8, 16]
    lines = [(s, "full") for s in STRATEGIES if s != "whole"] + [("whole", "sliding_window"), ("whole", "performer")]
    assert keys == {(s, v, n, seed) for (s, v), n, seed in product(lines, lens, (0, 1, 2))}
    # --variants replaces the whole-input variants only
    swapped = load_long_presets(variants=["full"])["long-quick"].configs
    assert {(c.strategy, c.variant) for c in swapped} == {(s, "full") for s in STRATEGIES}
    assert all(c.device == "cuda" for c in presets["long-gpu"].configs)


def test_bad_preset_contents_are_refused() -> None:
    with pytest.raises(ValueError, match="strategy"):
        load_long_presets('[presets.x]\n[[presets.x.groups]]\nstrategies = ["nope"]\nseq_lens = [32]\n')
    with pytest.raises(ValueError, match="segment_len"):
        load_long_presets("[presets.x.defaults]\nsegment_len = 0\n[[presets.x.groups]]\nseq_lens = [32]\n")
    with pytest.raises(ValueError, match="evidence"):
        tasks.long_majority(2, 32, seed=0, evidence=4)


def test_cli_refuses_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["long", "--preset", "nope", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "unknown preset" in res.output
    res = runner.invoke(app, ["long", "--timeout", "-1", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "--timeout" in res.output
    res = runner.invoke(app, ["long", "--resume", "--overwrite", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2


def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["long", "--preset", "long-tiny", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (len(STRATEGIES) + 1) and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert 0 <= float(r["final_acc"]) <= 1 and float(r["infer_ms_per_doc"]) > 0
        assert 0.5 <= float(r["prefix_bound"]) <= 1 and math.isfinite(float(r["train_s"]))
    page = (out / "README.md").read_text()
    assert "segment_pool" in page and "hierarchical" in page
    assert any(p.suffix == ".png" for p in out.iterdir())
