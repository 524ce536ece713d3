"""Gates over the static kernel report for the shipped softmax configs: what the compiled code of
the launches a Hopper (sm_90) or Ampere (sm_80) GPU runs must look like, checked without a GPU.

Each kernel is compiled as ``attn-bench kernels`` compiles it (:mod:`attn_kernels.static_report`:
the launcher's integer specialisation for a contiguous ``(2, 16, 4096, D)`` launch, ``ptxas -v``
for registers and spills, the main loop read from ``cuobjdump -sass``), under the installed
Triton (CI runs this file under Triton 3.6 and under the newest release). The gates:

- forward, head dim 128, bfloat16 and float16, full attention: 128-row tiles on 8 warps, at
  least 64 keys per tile, no spill, only wgmma (HGMMA) in the main loop, only asynchronous
  loads (TMA where the installed Triton has tensor descriptors, ``cp.async`` at least), at most
  4.5 instructions per key and warp, and the softmax scale folded into the ``exp2`` argument
  (FMULs only for the accumulator's rescale, one FFMA per score);
- backward: wgmma and no ``mma.sync`` in both kernels, dk/dv programs owning 128 keys on 8
  warps, no spill, at most 4 barriers per iteration; the products per (query tile, key tile)
  pair counted from the HGMMA shapes (7 in the shipped deterministic mode, 5 with atomic dQ);
- sliding window: a narrow band runs 64-row blocks, which waste less of the band than 128-row
  blocks (counted on the host schedule), in one pipelined loop per program (forward, dq, dk/dv);
- head dim 64 on sm_90, and sm_80 (no wgmma): the shipped forwards do not spill.

A handful of compiles (a few seconds each), each made once per module.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from attn_kernels import flash_configs
from attn_kernels.flash_configs import FlashConfig
from attn_kernels.launch import LaunchShape

flash_kernels = pytest.importorskip("attn_kernels.flash_kernels")
aot = pytest.importorskip("attn_kernels.aot")
static_report = pytest.importorskip("attn_kernels.static_report")
sass = pytest.importorskip("attn_kernels.sass")
pytest.importorskip("triton.backends.nvidia.compiler")

SM90, SM80 = (9, 0), (8, 0)
N = 4096  # the LaunchSample's sequence length
HAS_TMA = importlib.util.find_spec("triton.tools.tensor_descriptor") is not None
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _shipped(backward: bool, capability: tuple[int, int], head_dim: int = 128, window: int | None = None):
    shape = LaunchShape(head_dim, 2, False, n=N, window=window)
    return flash_configs._select_gpu(shape, backward, capability)


@functools.cache
def _row(kernel: str, cfg: FlashConfig, head_dim: int, dtype: torch.dtype, arch: int) -> dict:
    """The report row of one kernel (full attention, not causal, no padding), as ``attn-bench
    kernels`` makes it."""
    fn, sig, cx = flash_kernels.aot_spec(kernel, cfg, head_dim, dtype, causal=False, has_global=False)
    unit, items = ("queries", cfg.block_m) if kernel == "bwd_dkdv" else ("keys", cfg.block_n)
    spec = static_report.KernelSpec(f"flash_{kernel}", "flash", "", "shipped", cfg, fn, sig, cx, unit, items)
    row = static_report.compile_row(spec, arch, dtype, head_dim, False)
    assert row["status"] == "ok", row["error"]
    print(f"\n{kernel} {cfg} D{head_dim} {dtype} sm_{arch}: " + ", ".join(f"{k} {row[k]}" for k in _SHOWN))
    return row


_SHOWN = ("registers", "spill_bytes", "hgmma", "hmma", "hgmma_shapes", "loads", "instr_per_item_per_warp", "bar")


def _products_per_tile_pair(row: dict, block_m: int, block_n: int, head_dim: int, warpgroups: int) -> float:
    """Tile products of one main-loop iteration, in units of one ``block_m x block_n x head_dim``
    product, from the HGMMA shapes (each instruction is one warp group's ``M x N x K``)."""
    flops = 0
    for part in str(row["hgmma_shapes"]).split(", "):
        shape, count = part.split(" x")
        m, n, k = (int(x) for x in shape.split("x"))
        flops += m * n * k * int(count)
    return flops * warpgroups / (block_m * block_n * head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_hd128_on_hopper(dtype: torch.dtype) -> None:
    cfg = _shipped(False, SM90)
    row = _row("fwd", cfg, 128, dtype, 90)
    assert (cfg.block_m, cfg.num_warps) == (128, 8) and cfg.block_n >= 64, cfg
    assert row["spill_bytes"] == 0
    assert row["hgmma"] > 0 and row["hmma"] == 0  # wgmma only
    assert row["ldg"] == 0 and row["utmaldg"] + row["ldgsts"] > 0  # asynchronous loads only
    if HAS_TMA:
        assert row["utmaldg"] > 0 and cfg.tma
    assert row["instr_per_item_per_warp"] <= 4.5
    # Per thread: one FMUL per accumulator element (the rescale) and a few per row (the row max
    # times the scale), no FMUL per score; one FFMA per score (the exp2 argument).
    acc = cfg.block_m * 128 // (32 * cfg.num_warps)
    scores = cfg.block_m * cfg.block_n // (32 * cfg.num_warps)
    assert row["fmul"] <= acc + 4 and row["ffma"] >= scores


def test_backward_hd128_on_hopper() -> None:
    cfg = _shipped(True, SM90)
    dq_cfg = flash_configs.dq_config(cfg)
    assert cfg.block_n >= 128 and cfg.num_warps == 8, cfg  # dk/dv programs own 128 keys
    assert dq_cfg.block_m >= 64, dq_cfg  # dq programs own 64 or more queries
    rows = {k: _row(k, c, 128, torch.bfloat16, 90) for k, c in (("bwd_dq", dq_cfg), ("bwd_dkdv", cfg))}
    for kernel, row in rows.items():
        assert row["spill_bytes"] == 0, kernel
        assert row["hgmma"] > 0 and row["hmma"] == 0, kernel
        assert row["bar"] <= 4, kernel
    # The deterministic split: dk/dv 4 products per pair, dq 3 per pair of its own tiles.
    wg = cfg.num_warps // 4
    assert _products_per_tile_pair(rows["bwd_dkdv"], cfg.block_m, cfg.block_n, 128, wg) == pytest.approx(4)
    assert _products_per_tile_pair(rows["bwd_dq"], dq_cfg.block_m, dq_cfg.block_n, 128, wg) == pytest.approx(3)


@pytest.mark.xfail(strict=True, reason="the shipped backward is the deterministic split (7 products per tile pair)")
def test_backward_ships_five_products_per_tile_pair() -> None:
    assert _shipped(True, SM90).bwd == "atomic"


def test_atomic_backward_candidate_runs_five_products_on_wgmma() -> None:
    """The atomic-dQ mode (a tuner candidate on sm_90): one kernel, 5 products per tile pair."""
    shape = LaunchShape(128, 2, False, n=N)
    cfg = next(c for c in flash_configs.tune_candidates(shape, True, SM90) if c.bwd == "atomic")
    row = _row("bwd_dkdv", cfg, 128, torch.bfloat16, 90)
    assert cfg.block_n >= 128 and cfg.num_warps == 8
    assert row["spill_bytes"] == 0 and row["hgmma"] > 0 and row["hmma"] == 0
    assert _products_per_tile_pair(row, cfg.block_m, cfg.block_n, 128, cfg.num_warps // 4) == pytest.approx(5)


def _band_waste(block_m: int, block_n: int, left: int, right: int, n: int = N) -> float:
    """Share of the score tiles a band's programs compute that no row sees (host schedule)."""
    sched = flash_configs.query_block_schedule(n, n, block_m, block_n, causal=False, window=(left, right))
    rows = torch.arange(n)
    seen = ((rows + right).clamp(max=n - 1) - (rows - left).clamp(min=0) + 1).sum().item()
    starts = torch.arange(0, n, block_m)
    keys = -((sched[:, 0] - sched[:, 3]).clamp(max=0) // block_n) * block_n  # whole key tiles
    computed = (keys * ((starts + block_m).clamp(max=n) - starts)).sum().item()
    return 1 - seen / computed


def _one_loop(kernel: str, cfg: FlashConfig, window: int) -> None:
    """The band specialisation of ``kernel`` holds one tile's products: one loop (a loop per pass,
    as full attention runs them, would hold them once per pass; ptxas lays a loop's masked branch
    out of line, so the loops are counted by their products, not by their back branches)."""
    fn, sig, cx = flash_kernels.aot_spec(kernel, cfg, 128, torch.bfloat16, causal=True, has_global=False, window=window)
    stats = aot.compile_for(fn, sig, cx, arch=90, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    assert stats.spill_bytes == 0, kernel
    listing = sass.parse(aot.disassemble(stats.cubin))
    main = sass.main_loop(listing)
    assert main is not None and main.stats.hgmma > 0, kernel
    assert sum(i.base == "HGMMA" for i in listing) == main.stats.hgmma, kernel


def test_narrow_band_wastes_less_and_runs_one_loop() -> None:
    w = 128  # window=128 on both sides: 257 keys per row
    cfg = _shipped(False, SM90, window=2 * w + 1)
    assert cfg.block_m < 128, cfg
    wide = _band_waste(128, cfg.block_n, w, w)
    assert _band_waste(cfg.block_m, cfg.block_n, w, w) < wide - 0.1, (cfg, wide)
    _one_loop("fwd", cfg, w)
    bwd = _shipped(True, SM90, window=2 * w + 1)
    _one_loop("bwd_dq", flash_configs.dq_config(bwd), w)
    _one_loop("bwd_dkdv", bwd, w)


@pytest.mark.parametrize(
    ("capability", "head_dim"),
    [
        pytest.param(SM90, 64, id="sm90-d64"),
        pytest.param(SM80, 128, id="sm80-d128"),
        pytest.param(SM80, 64, id="sm80-d64"),
    ],
)
def test_other_shipped_forwards_do_not_spill(capability: tuple[int, int], head_dim: int) -> None:
    cfg = _shipped(False, capability, head_dim)
    row = _row("fwd", cfg, head_dim, torch.bfloat16, capability[0] * 10)
    assert row["spill_bytes"] == 0
    assert (row["hgmma"] > 0) == (capability >= SM90) and row["ldg"] == 0
