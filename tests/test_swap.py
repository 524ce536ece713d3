"""``attn-bench swap``: the standard-library corpus and its split, the swap keeping every weight
(for the suite's model and through Transformers), steps-to-recover, the presets, bad options and
a tiny run end to end."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_bench.swap import run as swap_run
from attn_bench.swap.corpus import is_heldout, lm_data, load_corpus
from attn_bench.swap.models import hf_config, hf_lm, hf_reload, swap_attention, task_lm
from attn_bench.swap.run import SwapConfig, expand_swap_group, load_swap_presets, run_swap, steps_to_within


def _tree(tmp_path: Path) -> Path:
    files = {f"pkg/mod{i}.py": f"def f{i}():\n    return {i}\n" * (40 + i) for i in range(40)}
    files |= {"top.py": "x = 1\n" * 200, "test/test_x.py": "SKIPPED\n", "pkg/tests/t.py": "SKIPPED\n"}
    files |= {"site-packages/lib.py": "SKIPPED\n", "notes.txt": "SKIPPED\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_corpus_is_split_by_file_and_hashed(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    c = load_corpus(str(root))
    kept = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if b"SKIPPED" not in p.read_bytes())
    assert sorted(c.train_files + c.heldout_files) == kept
    assert not set(c.train_files) & set(c.heldout_files) and c.heldout_files
    assert all(hashlib.sha256(f.encode()).digest()[0] < 26 for f in c.heldout_files)
    assert c.train == b"".join((root / f).read_bytes() for f in c.train_files)
    assert c.heldout == b"".join((root / f).read_bytes() for f in c.heldout_files)
    digest = hashlib.sha256()
    for f in kept:
        digest.update(f.encode() + b"\0" + (root / f).read_bytes() + b"\0")
    assert c.sha256 == digest.hexdigest()
    (root / "pkg/mod3.py").write_text("changed\n")
    load_corpus.cache_clear()
    assert load_corpus(str(root)).sha256 != c.sha256


def test_the_stdlib_corpus_holds_out_about_a_tenth_of_its_files() -> None:
    c = load_corpus()
    files = len(c.train_files) + len(c.heldout_files)
    assert files > 200 and 0.05 < len(c.heldout_files) / files < 0.17
    assert all(is_heldout(f) for f in c.heldout_files) and not any(is_heldout(f) for f in c.train_files)
    assert not any(f.startswith(("test/", "site-packages/")) for f in c.train_files + c.heldout_files)


def test_windows_are_next_byte_prediction_over_their_split(tmp_path: Path) -> None:
    c = load_corpus(str(_tree(tmp_path)))
    tr, te = lm_data(c, 16, 50, 6, seed=1)
    assert tr.inputs.shape == (50, 16) and te.inputs.shape == (6, 16) and tr.causal
    assert torch.equal(tr.inputs[:, 1:], tr.labels[:, :-1])
    for data, text in ((tr, c.train), (te, c.heldout)):
        for row, lab in zip(data.inputs.tolist(), data.labels.tolist(), strict=True):
            assert bytes([*row, lab[-1]]) in text
    tr2, te2 = lm_data(c, 16, 50, 6, seed=2)
    assert torch.equal(te.inputs, te2.inputs) and not torch.equal(tr.inputs, tr2.inputs)
    with pytest.raises(ValueError, match="seq_len"):
        lm_data(c, 0, 50, 6, seed=1)


def _sharp(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Scale the query and key projections so that attention is far from uniform."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names) and n.endswith("weight"):
                p.mul_(8)


def test_swap_keeps_every_weight_and_changes_the_attention() -> None:
    torch.manual_seed(0)
    model = task_lm("full", {}, 64, 32, 2, 2, 0).double()
    _sharp(model, ("q_proj", "k_proj"))
    ids = torch.randint(256, (2, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_full = model(ids)
    swap_attention(model, "full", {})
    assert torch.equal(model(ids), out_full)  # the identity swap
    swap_attention(model, "sliding_window", {"window": 4})
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(b.attn.attn.name == "sliding_window" for b in model.blocks)
    # position 3 sees keys 0..3 under both; position 63 loses keys 0..58
    out_win = model(ids)
    torch.testing.assert_close(out_win[:, :4], out_full[:, :4])
    assert (out_win[:, -1] - out_full[:, -1]).abs().max() > 1e-3


def test_hf_reload_keeps_the_weights_and_av_full_agrees_with_sdpa() -> None:
    torch.manual_seed(0)
    model = hf_lm(hf_config(32, 32, 4, 2), "sdpa").eval()
    _sharp(model, ("q_proj", "k_proj"))
    ids = torch.randint(256, (3, 32))
    ref = model(ids).detach()
    full = hf_reload(model, "full", {}).eval()
    torch.testing.assert_close(full(ids), ref, atol=2e-5, rtol=2e-5)
    assert full.lm.config._attn_implementation == "av_full"
    wide = hf_reload(model, "sliding_window", {"window": 31}).eval()  # 31 keys back: all of them
    torch.testing.assert_close(wide(ids), ref, atol=2e-5, rtol=2e-5)
    perf = hf_reload(model, "performer", {"num_features": 16, "seed": 0}).eval()
    sd, sp = model.state_dict(), perf.state_dict()
    assert sd.keys() == sp.keys() and all(torch.equal(sd[k], sp[k]) for k in sd)
    assert (perf(ids) - ref).abs().max() > 1e-3


def test_steps_to_within_on_a_hand_made_curve() -> None:
    curve = [(0, 3.0), (25, 2.4), (50, 2.11), (75, 2.1), (100, 1.9)]
    assert steps_to_within(curve, 2.0) == 75  # 2.1 = 1.05 x 2.0 counts, 2.11 does not
    assert steps_to_within(curve, 2.0, frac=0.2) == 25
    assert steps_to_within(curve, 1.0) is None
    assert steps_to_within([(0, 1.0)], 1.0) == 0


def _tiny() -> list[SwapConfig]:
    return list(load_swap_presets()["swap-tiny"].configs)


def test_presets_pair_every_swap_row_with_its_pretraining() -> None:
    presets = load_swap_presets()
    assert {"swap-quick", "swap-gpu", "swap-tiny"} <= set(presets)
    quick = presets["swap-quick"].configs
    assert len(quick) == 3 * (6 + 4) and {c.device for c in quick} == {"cpu"}
    assert {c.device for c in presets["swap-gpu"].configs} == {"cuda"}
    pretrain = {c for c in quick if c.mode == "pretrain"}
    assert len(pretrain) == 6 and all(c.pretraining() in pretrain for c in quick)
    win = [c for c in quick if c.variant == "sliding_window"]
    assert {dict(c.options)["window"] for c in win} == {16}
    assert all(c.steps == c.pretrain_steps for c in quick if c.mode == "scratch")
    with pytest.raises(ValueError, match="unknown swap preset key"):
        expand_swap_group({"windw": 3}, {})
    with pytest.raises(ValueError, match="mode must be"):
        swap_run.check_config(dataclasses.replace(_tiny()[1], mode="transfer"))
    with pytest.raises(ValueError, match="no scratch mode"):
        swap_run.check_config(dataclasses.replace(_tiny()[-1], mode="scratch"))


def test_a_row_after_a_worker_restart_equals_one_from_the_cache() -> None:
    cfg = next(c for c in _tiny() if c.mode == "swap" and c.variant == "performer" and c.model == "task")
    swap_run._PRETRAINED.clear()
    fresh = run_swap(cfg)
    cached = run_swap(cfg)
    assert fresh.start_loss == cached.start_loss and fresh.ref_loss == cached.ref_loss
    assert fresh.eval_loss_curve == cached.eval_loss_curve


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--resume", "--overwrite"], "pass one"),
        (["--timeout", "-1"], "--timeout"),
    ],
)
def test_bad_options_exit_2_naming_them(tmp_path: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["swap", "--out", str(tmp_path / "r"), "--no-progress", *args])
    assert res.exit_code == 2 and message in res.output


def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["swap", "--preset", "swap-tiny", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert len(rows) == len(_tiny()) and {r["status"] for r in rows} == {"ok"}
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["kind"] == "swap" and meta["corpus"]["sha256"] == load_corpus().sha256
    assert {r["corpus_sha256"] for r in rows} == {meta["corpus"]["sha256"]}
    for model in ("task", "hf"):
        mine = [r for r in rows if r["model"] == model]
        pre = next(r for r in mine if r["mode"] == "pretrain")
        same = next(r for r in mine if r["mode"] == "swap" and r["variant"] == "full")
        # the loss before the (identity) swap is the trained model's
        assert math.isclose(float(same["start_loss"]), float(pre["ref_loss"]), rel_tol=1e-6)
        assert float(same["steps_to_recover"]) == 0
        assert json.loads(pre["eval_loss_curve"])[-1][1] == pytest.approx(float(pre["ref_loss"]))
    # a scratch row starts from an untrained model: about ln(256) nats per byte
    scratch = [float(r["start_loss"]) for r in rows if r["mode"] == "scratch"]
    assert scratch and all(abs(s - math.log(256)) < 0.5 for s in scratch)
    page = (out / "README.md").read_text()
    assert "| task | swap | performer |" in page and (out / "loss_curves.png").stat().st_size > 1000
    res = CliRunner().invoke(app, ["swap", "--preset", "swap-tiny", "--out", str(out), "--no-progress"])
    assert res.exit_code == 2 and "--resume" in res.output


def test_trained_loss_is_next_byte_cross_entropy() -> None:
    """The held-out loss train() reports equals cross-entropy computed here from the logits."""
    from attn_bench.task.train import evaluate_metrics

    c = load_corpus()
    _, te = lm_data(c, 32, 4, 5, seed=0)
    torch.manual_seed(0)
    model = task_lm("full", {}, 32, 16, 2, 1, 0)
    acc, loss = evaluate_metrics(model, te, 2, torch.device("cpu"))
    logits = model(te.inputs).double()
    want = F.cross_entropy(logits.flatten(0, 1), te.labels.flatten())
    assert loss == pytest.approx(float(want), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(-1) == te.labels).double().mean()))
