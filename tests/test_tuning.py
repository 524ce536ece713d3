"""Per-card tuning tables: the tuner's loop (driven by an injected runner and clock), the table
file, staleness, the lookup at launch and its fallbacks, the device check's use of the tuner,
the real runner's numerics check under the interpreter, and the sm_90 candidates' compilation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import attn_kernels
from attn_bench.cli import app
from attn_bench.device import check as dc
from attn_bench.device import tune as tn
from attn_bench.device import tune_keys as tk
from attn_bench.device.summary import summary_markdown
from attn_kernels import favor_chunk_configs, favor_configs, flash_configs, tuning
from attn_kernels.flash_configs import FlashConfig
from attn_kernels.launch import KernelConfig, LaunchShape
from tests.helpers import aot_release

CARD = "NVIDIA Test Card 80GB"
CAP = (9, 0)


@pytest.fixture(autouse=True)
def _fresh_lookup(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(tuning.TABLES_ENV, raising=False)
    monkeypatch.delenv(tuning.DIR_ENV, raising=False)
    tuning.set_enabled(None)
    tuning.reset()
    yield
    tuning.set_enabled(None)
    tuning.reset()


class FakeRunner:
    """Timings drawn at random per (key, config), some configs failing the check; counts calls."""

    def __init__(self, seed: int, fail: set[str] = frozenset(), clock: list[float] | None = None, step: float = 0.0):
        self.rng = random.Random(seed)
        self.times: dict[tuple[str, str], float] = {}
        self.fail = set(fail)
        self.calls: list[tuple[str, str, str]] = []
        self.clock, self.step = clock, step

    def _tick(self) -> None:
        if self.clock is not None:
            self.clock[0] += self.step

    def check(self, key, cfg):
        self._tick()
        self.calls.append(("check", key.table_key, cfg.name))
        return f"{cfg.name} wrong" if cfg.name in self.fail else None

    def time_ms(self, key, cfg):
        self._tick()
        self.calls.append(("time", key.table_key, cfg.name))
        return self.times.setdefault((key.table_key, cfg.name), self.rng.uniform(0.5, 2.0))


def _keys(**kw) -> list[tn.TuneKey]:
    args = dict(kernels=["flash_fwd"], head_dims=[128], ns=[4096], windows=[None])
    return tn.plan(**(args | kw))


def test_card_names_and_buckets() -> None:
    assert tuning.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.card_slug("  NVIDIA GeForce RTX 4090 ") == "nvidia-geforce-rtx-4090"
    for bad in ("", "  ", "---"):
        with pytest.raises(ValueError, match="card name"):
            tuning.card_slug(bad)
    for n in (1, 40, 64, 65, 1000, 1024, 1025, 70000, 1 << 20):
        b = tuning.n_bucket(n)
        assert b & (b - 1) == 0 and 64 <= b <= 65536
        assert b >= min(n, 65536) and (b // 2 < n or b == 64)
    s = LaunchShape(80, 2, True, n=3000, window=513)
    assert tuning.shape_key("flash_fwd", s) == "16bit/d128/causal/w1024/n4096"
    assert tuning.shape_key("favor_fwd", LaunchShape(64, 4, False, m_pad=256)) == "float32/d64/full/m256"
    with pytest.raises(ValueError, match="kernel"):
        tuning.shape_key("flash", s)


def test_plan_and_candidates() -> None:
    keys = tn.plan(dtypes=[torch.bfloat16, torch.float16], head_dims=[128, 64], ns=[4096, 16384])
    table_keys = [(k.kernel, k.table_key) for k in keys]
    assert len(set(table_keys)) == len(table_keys)
    assert keys[0].head_dim == 128 and keys[-1].head_dim == 64
    assert keys[0].kernel == "favor_impl"  # a short budget measures both FAVOR+ implementations first
    # float16 shares bfloat16's 16-bit entries, but for the chunked FAVOR+ kernels timed with a
    # backward: float16 takes the float32 feature path there (the float32 entries)
    fp32_path = [k for k in keys if k.family == "favor_chunk" and tn.PASS[k.kernel] != "fwd"]
    assert {k.dtype for k in keys if k not in fp32_path} == {torch.bfloat16}
    assert all(k.table_key.startswith("float32/") for k in fp32_path if k.dtype == torch.float16)
    assert all(k.kernel in tk.KERNELS for k in keys)
    # FAVOR+ entries do not depend on N: one key per (dtype, head dim, causal)
    assert sum(k.kernel == "favor_fwd" for k in keys) == 4
    assert sum(k.kernel == "favor_chunk_fwd" for k in keys) == 4
    for key in keys:
        cands = tn.candidates(key, CAP)
        shape = key.shape()
        assert len(set(cands)) == len(cands) >= 1
        if key.family == "flash":
            backward = key.kernel == "flash_bwd"
            assert cands[0] == flash_configs._select_gpu(shape, backward, CAP)  # the heuristic default first
            old = tn.candidates(key, (8, 0))
            assert set(old) <= set(cands)  # the sm_80 configs (the earlier defaults) stay candidates
            if key.head_dim == 128 and not backward and key.window is None:
                assert FlashConfig(128, 64, 8, 4) in cands and FlashConfig(128, 64, 8, 4) not in old
                assert cands[0].tma and FlashConfig(128, 32, 8, 2) in cands  # new default, old default
            if key.head_dim == 128 and backward and key.window is None:
                assert cands[0].bwd == "split" and FlashConfig(32, 32, 4, 2) in cands
                assert any(c.bwd == "atomic" for c in cands)
        elif key.family == "favor_impl":
            assert [c.name for c in cands] == ["chunk", "legacy"]  # the default first
        elif key.family == "favor_chunk":
            assert cands == favor_chunk_configs.candidates(key.kernel.removeprefix("favor_"), shape)
        else:
            assert cands == favor_configs.heuristic_configs(key.kernel.removeprefix("favor_"), shape)
        # the family's defaults force its own implementation, so the kernel timed is the one that runs
        forced = tn.heuristic_defaults(key, CAP)
        if key.family == "favor_chunk":
            assert forced["favor_impl"] == tuning.ImplChoice("chunk") and key.kernel in forced
        elif key.family == "favor":
            assert forced["favor_impl"] == tuning.ImplChoice("legacy") and key.kernel in forced
    with pytest.raises(ValueError, match="kernels"):
        tn.plan(kernels=["flash"])


def test_tune_picks_the_fastest_passing_config_and_writes_the_table(tmp_path: Path) -> None:
    keys = _keys(kernels=["flash_fwd", "flash_bwd"])
    cands = {k: tn.candidates(k, CAP) for k in keys}
    fail = {cands[keys[0]][2].name}
    runner = FakeRunner(seed=7, fail=fail)
    run = tn.tune(keys, runner, card=CARD, capability=CAP, budget_s=100, out_dirs=[tmp_path], echo=lambda s: None)
    assert run.tuned == keys and not run.not_reached and not run.stopped_by_budget
    path = tmp_path / "nvidia-test-card-80gb.json"
    assert run.paths == [path]
    data = json.loads(path.read_text())
    assert data["format"] == tuning.FORMAT and data["card"] == CARD
    table = tuning.Table.read(path)
    for key in keys:
        times = {c.name: runner.times.get((key.table_key, c.name)) for c in cands[key]}
        assert all((t is None) == (name in fail) for name, t in times.items())  # failed configs are not timed
        default = cands[key][0].name
        passing = {n: t for n, t in times.items() if t is not None}
        best = min(passing, key=passing.__getitem__)
        want = best if passing[best] < (1 - tn.MIN_GAIN) * passing[default] else default
        e = table.entry(key.kernel, key.table_key)
        assert e["name"] == want and e["default"] == default
        assert tuning.config_from_dict(e["config"], FlashConfig).name == want
        assert e["ratio"] == pytest.approx(passing[want] / passing[default], rel=1e-3)
        assert e["source_hash"] == tuning.source_hash("flash")
        assert e["timed"] == len(passing) and set(e["failed"]) == fail & set(times)
    assert tuning.table_status(CARD, [tmp_path]) == ("fresh", path)


def test_tune_stops_within_its_budget(tmp_path: Path) -> None:
    clock = [0.0]
    keys = _keys(ns=[1024, 4096, 16384])  # 6 keys x 5 candidates
    runner = FakeRunner(seed=1, clock=clock, step=1.0)
    lines: list[str] = []
    run = tn.tune(
        keys, runner, card=CARD, capability=CAP, budget_s=12, out_dirs=[tmp_path], clock=lambda: clock[0],
        echo=lines.append,
    )  # fmt: skip
    assert run.stopped_by_budget and run.not_reached
    assert clock[0] <= 12 + 2  # at most one candidate (a check and a timing) past the budget
    assert len(run.tuned) + len(run.not_reached) <= len(keys)
    assert any("budget" in line for line in lines)
    assert any(line.startswith("tune [1/6]") for line in lines)  # progress per key
    table = tuning.Table.read(tmp_path / "nvidia-test-card-80gb.json")
    written = {k for keyed in table.entries.values() for k in keyed}
    assert written == {k.table_key for k in run.tuned}
    assert not {k.table_key for k in run.not_reached} & written
    # a key cut short is used but marked, and the next run tunes it (and the ones not reached) again
    partial = [k for k in run.tuned if not table.entry(k.kernel, k.table_key)["complete"]]
    assert partial == run.tuned[-1:]
    assert tn.pending(keys, table) == partial + run.not_reached
    with pytest.raises(ValueError, match="budget_s"):
        tn.tune(keys, runner, card=CARD, capability=CAP, budget_s=0)


def test_no_entry_when_the_default_fails(tmp_path: Path) -> None:
    keys = _keys()
    default = tn.candidates(keys[0], CAP)[0].name
    run = tn.tune(
        keys, FakeRunner(3, fail={default}), card=CARD, capability=CAP, budget_s=100, out_dirs=[tmp_path],
        echo=lambda s: None,
    )  # fmt: skip
    assert not run.tuned and [k for k, _ in run.failed] == keys
    assert not run.paths and not (tmp_path / "nvidia-test-card-80gb.json").exists()


def test_a_lost_cuda_context_ends_the_run(tmp_path: Path) -> None:
    keys = _keys(ns=[1024, 4096])
    bad = tn.candidates(keys[1], CAP)[1]

    class Crashing(FakeRunner):
        def time_ms(self, key, cfg):
            if key == keys[1] and cfg == bad:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().time_ms(key, cfg)

    runner = Crashing(2)
    lines: list[str] = []
    run = tn.tune(keys, runner, card=CARD, capability=CAP, budget_s=100, out_dirs=[tmp_path], echo=lines.append)
    assert "illegal memory access" in run.context_lost and run.not_reached == keys[2:]
    assert not any(c[1] == keys[2].table_key for c in runner.calls)  # nothing more was run
    entry = tuning.Table.read(tmp_path / "nvidia-test-card-80gb.json").entry("flash_fwd", keys[1].table_key)
    assert entry["name"] != bad.name and bad.name in entry["failed"]
    assert any("context is lost" in line for line in lines)


def test_stale_entries_are_detected_and_retuned(tmp_path: Path) -> None:
    keys = _keys()
    tn.tune(keys, FakeRunner(5), card=CARD, capability=CAP, budget_s=100, out_dirs=[tmp_path], echo=lambda s: None)
    path = tmp_path / "nvidia-test-card-80gb.json"
    # a second run finds both keys fresh and measures nothing
    again = FakeRunner(6)
    run = tn.tune(keys, again, card=CARD, capability=CAP, budget_s=100, table=tuning.Table.read(path))
    assert not again.calls and run.fresh == keys
    # an entry made for other kernel sources is stale: reported, ignored at lookup, retuned
    data = json.loads(path.read_text())
    data["entries"]["flash_fwd"][keys[0].table_key]["source_hash"] = "0" * 16
    path.write_text(json.dumps(data))
    table = tuning.Table.read(path)
    assert tuning.table_status(CARD, [tmp_path]) == ("stale", path)
    assert table.stale() == [("flash_fwd", keys[0].table_key)]
    assert tn.pending(keys, table) == [keys[0]]
    assert tuning.table_config(table, "flash_fwd", keys[0].shape()) is None
    assert tuning.table_config(table, "flash_fwd", keys[1].shape()) is not None
    again = FakeRunner(8)
    run = tn.tune(keys, again, card=CARD, capability=CAP, budget_s=100, table=table, out_dirs=[tmp_path])
    assert run.tuned == [keys[0]] and {c[1] for c in again.calls} == {keys[0].table_key}
    assert tuning.table_status(CARD, [tmp_path])[0] == "fresh"
    path.write_text("{not json")
    assert tuning.table_status(CARD, [tmp_path])[0] == "unreadable"
    assert tuning.table_status("Another Card", [tmp_path]) == ("missing", None)


def _gpu_lookup(monkeypatch: pytest.MonkeyPatch, folder: Path, card: str = CARD) -> list[int]:
    """Make the lookup act as on a GPU named ``card`` with tables in ``folder``; returns a list
    that counts the table reads."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attn_kernels.refresh_environment()  # the kernels read the variable once per process
    monkeypatch.setenv(tuning.DIR_ENV, str(folder))
    monkeypatch.setattr(tuning, "_current_card", lambda: (0, card))
    reads = [0]
    real = tuning.Table.read

    def counting(path):
        reads[0] += 1
        return real(path)

    monkeypatch.setattr(tuning.Table, "read", staticmethod(counting))
    tuning.reset()
    return reads


def _table_with(tmp_path: Path, kernel: str, shape: LaunchShape, cfg: KernelConfig, family: str) -> Path:
    table = tuning.Table(CARD)
    entry = {"config": tuning.config_dict(cfg), "ratio": 0.8, "source_hash": tuning.source_hash(family)}
    table.put(kernel, tuning.shape_key(kernel, shape), entry)
    return table.write(tmp_path)


def test_lookup_uses_the_table_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = LaunchShape(128, 2, False, n=4000)
    default = flash_configs._select_gpu(shape, False)
    tuned = next(c for c in flash_configs.tune_candidates(shape, False, CAP) if c != default)
    path = _table_with(tmp_path, "flash_fwd", shape, tuned, "flash")
    reads = _gpu_lookup(monkeypatch, tmp_path)
    assert flash_configs.select_config(shape, backward=False) == tuned
    assert flash_configs.select_config(LaunchShape(128, 2, False, n=4096), backward=False) == tuned  # same bucket
    assert reads[0] == 1  # read once, then cached
    # a key without an entry, the backward, another card: the heuristic
    assert flash_configs.select_config(LaunchShape(128, 2, True, n=4000), backward=False) == default
    assert flash_configs.select_config(shape, backward=True) == flash_configs._select_gpu(shape, True)
    monkeypatch.setattr(tuning, "_current_card", lambda: (1, "Some Other Card"))
    assert flash_configs.select_config(shape, backward=False) == default
    monkeypatch.setattr(tuning, "_current_card", lambda: (0, CARD))
    # turned off for an A/B comparison, by the environment or in process
    monkeypatch.setenv(tuning.TABLES_ENV, "0")
    tuning.reset()
    assert flash_configs.select_config(shape, backward=False) == default
    monkeypatch.delenv(tuning.TABLES_ENV)
    tuning.set_enabled(False)
    assert flash_configs.select_config(shape, backward=False) == default
    tuning.set_enabled(True)
    assert flash_configs.select_config(shape, backward=False) == tuned
    # a stale entry: the heuristic
    data = json.loads(path.read_text())
    next(iter(data["entries"]["flash_fwd"].values()))["source_hash"] = "f" * 16
    path.write_text(json.dumps(data))
    tuning.reset()
    assert flash_configs.select_config(shape, backward=False) == default
    # a config that is no candidate for the shape (a hand-edited table): the heuristic
    _table_with(tmp_path, "flash_fwd", shape, KernelConfig(256, 256, 8, 1), "flash")
    tuning.reset()
    assert flash_configs.select_config(shape, backward=False) == default
    # under the interpreter the table is never read: today's fixed config
    _table_with(tmp_path, "flash_fwd", shape, tuned, "flash")
    tuning.reset()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attn_kernels.refresh_environment()
    assert flash_configs.select_config(shape, backward=False) == flash_configs.INTERPRETER_CONFIG


@pytest.mark.parametrize(
    "bad",
    ["a string", ["a", "list"], {"config": "not an object"}, 7, "deep"],
    ids=["string", "list", "config-string", "number", "deeply-nested"],
)
def test_a_malformed_entry_falls_back_to_the_heuristic(tmp_path: Path, monkeypatch, bad) -> None:
    """A hand-edited or corrupted table: lookup and table_status do not raise; the malformed
    entry's shape gets the heuristic with one warning, the table's good entries still serve, and
    the status says stale (so device-check tunes it again)."""
    shape, other = LaunchShape(128, 2, False, n=4000), LaunchShape(128, 2, True, n=4000)
    default = flash_configs._select_gpu(shape, False)
    tuned = next(
        c for c in flash_configs.tune_candidates(other, False, CAP) if c != flash_configs._select_gpu(other, False)
    )
    path = _table_with(tmp_path, "flash_fwd", other, tuned, "flash")
    data = json.loads(path.read_text())
    key = tuning.shape_key("flash_fwd", shape)
    if bad == "deep":
        path.write_text(
            path.read_text().replace('"entries":', '"deep": ' + "[" * 100000 + "]" * 100000 + ', "entries":')
        )
    else:
        data["entries"]["flash_fwd"][key] = bad
        path.write_text(json.dumps(data))
    _gpu_lookup(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match="tuning table") as caught:
        assert flash_configs.select_config(shape, backward=False) == default
        if bad != "deep":  # the rest of the table still serves
            assert flash_configs.select_config(other, backward=False) == tuned
        flash_configs.select_config(LaunchShape(128, 2, False, n=2000), backward=False)
    assert len([w for w in caught if "tuning table" in str(w.message)]) == 1
    status, _ = tuning.table_status(CARD, [tmp_path])
    assert status == ("unreadable" if bad == "deep" else "stale")


def test_lookup_without_cuda_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = LaunchShape(64, 2, False, m_pad=256)
    heuristic = favor_configs.heuristic_configs("fwd", shape)
    tuned = heuristic[-1]
    assert len(heuristic) > 1 and tuned != heuristic[0]
    _table_with(tmp_path, "favor_fwd", shape, tuned, "favor")
    monkeypatch.setenv(tuning.DIR_ENV, str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attn_kernels.refresh_environment()
    if not torch.cuda.is_available():
        assert tuning.lookup("favor_fwd", shape, favor_configs.FeatureConfig) is None
        assert favor_configs.kept_configs("fwd", shape) == favor_configs.heuristic_configs("fwd", shape)
    _gpu_lookup(monkeypatch, tmp_path)
    got = favor_configs.kept_configs("fwd", shape)
    assert got == [tuned] and isinstance(got[0], favor_configs.FeatureConfig)
    assert favor_configs.kept_configs("state", shape) == favor_configs.heuristic_configs("state", shape)
    # a config the heuristic list does not hold for this shape is refused
    _table_with(tmp_path, "favor_fwd", shape, favor_configs.FeatureConfig(128, 128, 4, 2), "favor")
    tuning.reset()
    assert favor_configs.kept_configs("fwd", shape) == heuristic


def test_favor_impl_and_chunk_configs_follow_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FAVOR+ switch: "chunk" by default, the table's choice on its card (written and read
    back as ``{"impl": name}``), the tuner's forced choice above both; the chunked kernels' configs
    likewise, a table config outside their candidates refused."""
    shape = LaunchShape(128, 2, True, m_pad=256)
    cuda = torch.device("cuda", 0)
    assert favor_chunk_configs.impl(shape, cuda) == "chunk"
    table = tuning.Table(CARD)
    legacy = tuning.ImplChoice("legacy")
    table.put(
        "favor_impl",
        tuning.shape_key("favor_impl", shape),
        {"config": tuning.config_dict(legacy), "source_hash": tuning.source_hash("favor_impl")},
    )
    cands = favor_chunk_configs.candidates("chunk_fwd", shape)
    tuned = cands[-1]
    assert tuned != cands[0]
    key = tuning.shape_key("favor_chunk_fwd", shape)
    table.put(
        "favor_chunk_fwd", key, {"config": tuning.config_dict(tuned), "source_hash": tuning.source_hash("favor_chunk")}
    )
    path = table.write(tmp_path)
    assert tuning.Table.read(path).entry("favor_impl", tuning.shape_key("favor_impl", shape))["config"] == {
        "impl": "legacy"
    }
    _gpu_lookup(monkeypatch, tmp_path)
    assert favor_chunk_configs.impl(shape, cuda) == "legacy"
    assert favor_chunk_configs.impl(shape, torch.device("cpu")) == "chunk"  # tables are for GPUs
    assert favor_chunk_configs.config("chunk_fwd", shape, cuda) == tuned
    assert favor_chunk_configs.config("chunk_dq", shape, cuda) == favor_chunk_configs.candidates("chunk_dq", shape)[0]
    with tuning.forced({"favor_impl": tuning.ImplChoice("chunk"), "favor_chunk_fwd": cands[0]}) as seen:
        assert favor_chunk_configs.impl(shape, cuda) == "chunk"
        assert favor_chunk_configs.config("chunk_fwd", shape, cuda) == cands[0]
    assert sorted(k for k, _ in seen) == ["favor_chunk_fwd", "favor_impl"]
    assert favor_chunk_configs.impl(shape, cuda) == "legacy"
    table.put(
        "favor_chunk_fwd",
        key,
        {"config": tuning.config_dict(KernelConfig(32, 16, 4, 1)), "source_hash": tuning.source_hash("favor_chunk")},
    )
    table.write(tmp_path)
    tuning.reset()
    assert favor_chunk_configs.config("chunk_fwd", shape, cuda) == cands[0]
    with pytest.raises(ValueError, match="impl"):
        tuning.config_from_dict({"impl": 3}, tuning.ImplChoice)


def test_tune_times_both_favor_implementations_and_the_summary_shows_them(tmp_path: Path) -> None:
    """The ``favor_impl`` key: both implementations checked and timed in one run, the faster kept,
    each one's time in the entry; the device check's record and SUMMARY.md list them."""
    from attn_bench.device.summary import summary_markdown
    from attn_bench.device.tune_keys import impl_choices

    keys = tn.plan(kernels=["favor_impl"], head_dims=[128], ns=[16384])
    assert [(k.kernel, k.causal) for k in keys] == [("favor_impl", False), ("favor_impl", True)]
    runner = FakeRunner(seed=3)
    run = tn.tune(keys, runner, card=CARD, capability=CAP, budget_s=100, out_dirs=[tmp_path], echo=lambda s: None)
    table = tuning.Table.read(run.paths[0])
    choices = impl_choices(table)
    assert set(choices) == {k.table_key for k in keys}
    for key in keys:
        entry = table.entry("favor_impl", key.table_key)
        times = {name: runner.times[(key.table_key, name)] for name in ("chunk", "legacy")}
        assert entry["timings"] == pytest.approx(times, rel=1e-5) and entry["default"] == "chunk"
        want = "legacy" if times["legacy"] < (1 - tn.MIN_GAIN) * times["chunk"] else "chunk"
        assert entry["config"] == {"impl": want} and choices[key.table_key]["chosen"] == want
    record = {"environment": {}, "steps": [], "budget_s": 500.0, "tuning": {"status": "ok", "favor_impl": choices}}
    text = summary_markdown(record, tmp_path / "none", tmp_path / "none.csv", tmp_path / "none.log")
    assert "FAVOR+ implementations" in text
    for key in keys:
        row = next(line for line in text.splitlines() if line.startswith(f"| {key.table_key} |"))
        assert all(f"{runner.times[(key.table_key, name)]:.3g}" in row for name in ("chunk", "legacy"))


def test_forced_configs_reach_the_launch_and_stay_correct() -> None:
    """The real runner's numerics check, under the interpreter: the flash forward and backward
    with a forced non-default tile, against the float64 ground truth."""
    cfg = FlashConfig(16, 32, 4, 1)
    assert cfg != flash_configs.INTERPRETER_CONFIG
    runner = tn.CudaRunner(device="cpu", check_n=45)
    key = tn.TuneKey("flash_bwd", torch.float32, 16, True, 45, window=None)
    with tuning.forced({"flash_fwd": cfg, "flash_bwd": cfg}) as seen:
        assert flash_configs.select_config(LaunchShape(16, 4, True, n=45), backward=True) == cfg
    assert seen == [("flash_bwd", LaunchShape(16, 4, True, n=45))]
    shape = LaunchShape(16, 4, True, n=45)
    assert flash_configs.select_config(shape, backward=True) == flash_configs.INTERPRETER_CONFIG
    torch.manual_seed(0)
    assert runner.check(key, cfg) is None
    with pytest.raises(ValueError, match="unknown kernel"), tuning.forced({"flash": cfg}):
        pass


def test_each_forced_block_reaches_the_launch() -> None:
    """The launches cache their config per launch shape; a forced block (one tuner candidate)
    and the calls after it must still get their own config, not the one cached before."""
    from attention_variants import attention

    q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
    for cfg in (FlashConfig(16, 32, 4, 1), FlashConfig(32, 16, 4, 1)):
        with tuning.forced({"flash_fwd": cfg}) as seen:
            attention(q, k, v, "full", backend="triton")
        assert [kernel for kernel, _ in seen] == ["flash_fwd"], cfg
    attention(q, k, v, "full", backend="triton")
    shape = seen[0][1]
    assert flash_configs.select_config(shape, backward=False) == flash_configs.INTERPRETER_CONFIG


def test_table_file_round_trip_and_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        tuning.Table.from_json({"format": 99, "entries": {}})
    with pytest.raises(ValueError, match="entries"):
        tuning.Table.from_json({"format": tuning.FORMAT, "entries": []})
    with pytest.raises(ValueError, match="block_n"):
        tuning.config_from_dict({"block_m": 64, "block_n": 48, "num_warps": 4, "num_stages": 2})
    with pytest.raises(ValueError, match="num_stages"):
        tuning.config_from_dict({"block_m": 64, "block_n": 32, "num_warps": 4})
    t = tuning.Table(CARD, meta={"capability": "9.0"})
    with pytest.raises(ValueError, match="kernel"):
        t.put("fwd", "k", {"config": {}, "source_hash": ""})
    cfg = KernelConfig(128, 64, 8, 4)
    t.put("flash_fwd", "k", {"config": tuning.config_dict(cfg), "source_hash": "x"})
    back = tuning.Table.read(t.write(tmp_path))
    assert back.meta == {"capability": "9.0"} and back.entries == t.entries
    assert tuning.config_from_dict(back.entry("flash_fwd", "k")["config"]) == cfg
    assert not list(tmp_path.glob("*.tmp"))
    # the fields a config class adds: written, read back, defaults when missing, type-checked
    flash = FlashConfig(32, 128, 8, 3, tma=True, bwd="atomic")
    data = tuning.config_dict(flash)
    assert data["tma"] is True and data["bwd"] == "atomic"
    assert tuning.config_from_dict(data, FlashConfig) == flash
    assert tuning.config_from_dict(tuning.config_dict(cfg), FlashConfig) == FlashConfig(128, 64, 8, 4)
    with pytest.raises(ValueError, match="tma"):
        tuning.config_from_dict({**data, "tma": 1}, FlashConfig)
    with pytest.raises(ValueError, match="bwd"):
        tuning.config_from_dict({**data, "bwd": "fused"}, FlashConfig)


def test_tune_command_without_cuda_and_bad_options() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["tune", "--kernels", "flash,nope"])
    assert res.exit_code == 2 and "--kernels" in res.output and "nope" in res.output
    res = runner.invoke(app, ["tune", "--n", "1024,x"])
    assert res.exit_code == 2 and "--n" in res.output
    if torch.cuda.is_available():
        return
    res = runner.invoke(app, ["tune", "--budget-s", "10"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0]


def _fake_tune_child(tmp_path: Path, calls: list):
    """Stands in for the ``attn-bench tune`` child of the device check: writes a table for the
    keys it is asked to tune into its ``--out`` (what the real command does on a GPU)."""

    def run(cmd, log, box, env=None):
        calls.append((cmd, box))
        out = Path(cmd[cmd.index("--out") + 1])
        table = tuning.Table(CARD)
        for key in tn.plan():
            cands = tn.candidates(key, CAP)
            entry = {"config": tuning.config_dict(cands[0]), "source_hash": key_hash(key), "name": cands[0].name}
            entry |= {"default": cands[0].name, "ms": 1.0, "timings": {c.name: 1.0 + i for i, c in enumerate(cands)}}
            table.put(key.kernel, key.table_key, entry)
        table.write(out)
        return 0, 1.0

    key_hash = lambda key: tuning.source_hash(key.family)
    return run


def test_device_check_tunes_a_missing_table_and_returns_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(dc, "run_boxed", _fake_tune_child(tmp_path, calls))
    monkeypatch.setattr(tuning, "PACKAGE_DIR", tmp_path / "package")
    out, run_dir = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    env: dict[str, str] = {}
    rec = dc.tune_table({"gpu": CARD}, True, run_dir, out, tmp_path / "log", lambda: 400.0, env)
    assert rec["table_before"] == "missing" and rec["status"] == "ok" and rec["table_used"]
    cmd, box = calls[0]
    assert cmd[cmd.index("tune") + 1 :][:2] == ["--budget-s", f"{min(dc.TUNE_MAX_S, dc.TUNE_SHARE * 400):.0f}"]
    assert box == pytest.approx(min(dc.TUNE_MAX_S, dc.TUNE_SHARE * 400) + dc.TUNE_GRACE_S)
    assert (out / "nvidia-test-card-80gb.json").is_file() and rec["file"] == "nvidia-test-card-80gb.json"
    assert env[tuning.DIR_ENV] == str(run_dir / "tuned") and rec["pending_after"] == 0
    # old and new side by side per softmax shape, from the same run, in the record and the summary
    rows = {(r["kernel"], r["shape"]): r for r in rec["comparison"]}
    key = tn.TuneKey("flash_fwd", torch.bfloat16, 128, False, 16384)
    row = rows[("flash_fwd", key.table_key)]
    assert row["new default"] == "M128-N128-w8-s2-tma" and row["earlier default"] == "M128-N32-w8-s2"
    assert row["ms"] == 1.0 and row["earlier ms"] > 1.0
    bwd = rows[("flash_bwd", tn.TuneKey("flash_bwd", torch.bfloat16, 128, True, 4096).table_key)]
    assert bwd["new default"] == "M32-N128-w8-s3-split" and bwd["earlier default"] == "M32-N32-w4-s2"
    record = {"tuning": rec, "steps": [], "budget_s": 600}
    text = summary_markdown(record, tmp_path / "none", tmp_path / "v.csv", tmp_path / "t.log")
    assert "M128-N32-w8-s2" in text and "M128-N128-w8-s2-tma" in text and "old and new" in text
    # with that table committed, the next check tunes nothing and still returns the table
    (tmp_path / "package").mkdir()
    (out / rec["file"]).rename(tmp_path / "package" / rec["file"])
    calls.clear()
    rec = dc.tune_table({"gpu": CARD}, True, tmp_path / "run2", out, tmp_path / "log", lambda: 400.0, {})
    assert not calls and rec["table_before"] == "fresh" and rec["table_used"]
    assert (out / rec["file"]).is_file()
    # no CUDA: nothing tuned, nothing used
    rec = dc.tune_table({}, False, tmp_path / "run3", out, tmp_path / "log", lambda: 400.0, {})
    assert rec["status"] == "skipped" and not rec["table_used"]


# ---------------------------------------------------------------------------------------------
# The sm_90 candidates compile without spills (ptxas of the Triton wheel, no GPU needed)
# ---------------------------------------------------------------------------------------------

_FLAGS = {"plain": {"has_global": False}, "global": {}, "padded": {"has_global": False, "has_pad": True}}
_FWD_SPECS = [
    pytest.param(c, name, id=f"{c.config}-D{c.max_head_dim}-{name}")
    for c in flash_configs.TUNE_FWD_CANDIDATES
    for name in _FLAGS
    if not (c.full_only and name == "global")  # a full-attention config never sees global tokens
]


# Candidates that spill a little with the integer arguments specialised as the launcher does: at
# most this many bytes, per Triton release ("3.6" or "newer"). ptxas 13.x (Triton 3.9) puts
# M128-N64-w8-s4 at 255 registers and spills (32 B plain); under Triton 3.6, the GPU machines'
# release, it does not spill. The 128 x 128 TMA forward with causal masks and key padding spills
# 8 B under Triton 3.6, as the shipped one with 2 stages (tests/test_flash_compile.py).
_SPILL_BOUNDS = {
    ("newer", "M128-N64-w8-s4", "plain"): 64,
    ("newer", "M128-N64-w8-s4", "global"): 256,
    ("3.6", "M128-N128-w8-s3-tma", "padded"): 8,
}


@pytest.mark.compile_sweep
@pytest.mark.parametrize(("cand", "flags_name"), _FWD_SPECS)
def test_sm90_forward_candidates_do_not_spill(cand, flags_name: str) -> None:
    flash_kernels = pytest.importorskip("attn_kernels.flash_kernels")
    aot = pytest.importorskip("attn_kernels.aot")
    cfg, flags = cand.config, _FLAGS[flags_name]
    fn, sig, constexprs = flash_kernels.aot_spec("fwd", cfg, cand.max_head_dim, torch.bfloat16, **flags)
    stats = aot.compile_for(fn, sig, constexprs, arch=90, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    print(f"\nfwd {cfg} D{cand.max_head_dim} {flags} sm_90: {stats.registers} registers, {stats.spill_bytes} B spilled")
    assert stats.spill_bytes <= _SPILL_BOUNDS.get((aot_release(), str(cfg), flags_name), 0)
    assert "wgmma" in stats.ptx  # Hopper's warp-group MMA, as the shipped sm_90 forwards


@pytest.mark.gpu
def test_real_tuner_on_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real runner on one key: every candidate checked and timed, the table written and read
    back by the launch path."""
    keys = tn.plan(kernels=["flash_fwd"], head_dims=[64], ns=[2048], windows=[None])[:1]
    card, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    runner = tn.CudaRunner(warmup_ms=5, rep_ms=20)
    run = tn.tune(keys, runner, card=card, capability=cap, budget_s=120, out_dirs=[tmp_path], echo=print)
    assert run.tuned == keys and not run.failed, run.failed
    entry = tuning.Table.read(run.paths[0]).entry("flash_fwd", keys[0].table_key)
    assert entry["timed"] == entry["candidates"] == len(tn.candidates(keys[0], cap)) and not entry["failed"]
    assert 0 < entry["ratio"] <= 1.0 and entry["ms"] > 0
    monkeypatch.setenv(tuning.DIR_ENV, str(tmp_path))
    tuning.reset()
    chosen = tuning.config_from_dict(entry["config"])
    assert flash_configs.select_config(keys[0].shape(), backward=False) == chosen
