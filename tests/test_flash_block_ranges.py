"""The host-side block schedules of the fused softmax kernels, checked against the dense mask.

For every program the schedule ``(start, lo, hi, end)`` must visit every key (query) holding a
visible pair, the unmasked interior ``[lo, hi)`` must be visible to every row (key) of the
program, and a window must cost at most ``ceil((left + right + BLOCK) / BLOCK') + 1`` blocks.
Pure torch: no Triton needed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_variants import masks
from attn_kernels import flash_configs as fc


def _gmask(n: int, positions: list[int] | None) -> torch.Tensor | None:
    if not positions:
        return None
    g = torch.zeros(n, dtype=torch.bool)
    g[torch.tensor(positions)] = True
    return g


def _check_row(sched: torch.Tensor, block: int, total: int) -> tuple[int, int, int, int]:
    start, lo, hi, end = (int(x) for x in sched)
    assert 0 <= start <= lo <= hi <= end <= total, (start, lo, hi, end)
    assert start % block == 0
    assert lo == end or lo % block == 0
    assert hi == end or hi % block == 0
    return start, lo, hi, end


def check_query_schedule(nq, nk, bm, bn, causal, window, positions, gb=None) -> None:
    gm = _gmask(nq, positions)
    dense = masks.dense_mask(nq, nk, causal=causal, window=window, global_mask=gm)
    band = masks.dense_mask(nq, nk, causal=causal, window=window)  # what the band loops compute
    gidx = gm.nonzero().flatten() if gm is not None else None
    sched = fc.query_block_schedule(nq, nk, bm, bn, causal=causal, window=window, global_idx=gidx, global_block=gb)
    gb = gb or bm
    n_band = math.ceil(nq / bm)
    n_glob = 0 if gidx is None else math.ceil(gidx.numel() / gb)
    assert sched.shape == (n_band + n_glob, 4) and sched.dtype == torch.int32
    is_global = gm if gm is not None else torch.zeros(nq, dtype=torch.bool)
    for prog in range(n_band + n_glob):
        start, lo, hi, end = _check_row(sched[prog], bn, nk)
        if prog < n_band:
            rows = torch.arange(prog * bm, min(prog * bm + bm, nq))
            rows_checked = rows[~is_global[rows]]  # global rows are stored by their own programs
            covered = torch.zeros(nk, dtype=torch.bool)
            covered[start:end] = True
            if gm is not None:
                covered |= gm  # the gathered global keys
            assert not (dense[rows_checked] & ~covered).any(), f"program {prog} misses a visible key"
            assert band[rows, lo:hi].all(), f"program {prog}: interior [{lo}, {hi}) is not fully visible"
            if window is not None:
                left, right = window
                limit = math.ceil((left + right + bm) / bn) + 1
                assert math.ceil((end - start) / bn) <= limit, f"program {prog} visits too many blocks"
        else:
            assert gidx is not None
            t = (prog - n_band) * gb
            rows = gidx[t : t + gb]
            covered = torch.zeros(nk, dtype=torch.bool)
            covered[start:end] = True
            assert not (dense[rows] & ~covered).any(), f"global program {prog} misses a visible key"
            assert dense[rows, lo:hi].all(), f"global program {prog}: interior not fully visible"


def check_key_schedule(nq, nk, bm, bn, causal, window, positions) -> None:
    gm = _gmask(nq, positions)
    dense = masks.dense_mask(nq, nk, causal=causal, window=window, global_mask=gm)
    band = masks.dense_mask(nq, nk, causal=causal, window=window)
    gidx = gm.nonzero().flatten() if gm is not None else None
    sched = fc.key_block_schedule(nq, nk, bm, bn, causal=causal, window=window, global_idx=gidx)
    n_band = math.ceil(nk / bn)
    n_glob = 0 if gidx is None else math.ceil(gidx.numel() / bn)
    assert sched.shape == (n_band + n_glob, 4) and sched.dtype == torch.int32
    is_global = gm if gm is not None else torch.zeros(nk, dtype=torch.bool)
    for prog in range(n_band + n_glob):
        start, lo, hi, end = _check_row(sched[prog], bm, nq)
        if prog < n_band:
            cols = torch.arange(prog * bn, min(prog * bn + bn, nk))
            cols_checked = cols[~is_global[cols]]  # global keys are stored by their own programs
            covered = torch.zeros(nq, dtype=torch.bool)
            covered[start:end] = True
            if gm is not None:
                covered |= gm  # the gathered global rows
            assert not (dense[:, cols_checked] & ~covered[:, None]).any(), f"key program {prog} misses a row"
            assert band[lo:hi, cols].all(), f"key program {prog}: interior [{lo}, {hi}) is not fully visible"
            if window is not None:
                left, right = window
                limit = math.ceil((left + right + bn) / bm) + 1
                assert math.ceil((end - start) / bm) <= limit, f"key program {prog} visits too many blocks"
        else:
            assert gidx is not None
            t = (prog - n_band) * bn
            cols = gidx[t : t + bn]
            covered = torch.zeros(nq, dtype=torch.bool)
            covered[start:end] = True
            assert not (dense[:, cols] & ~covered[:, None]).any(), f"global key program {prog} misses a row"
            assert dense[lo:hi, cols].all(), f"global key program {prog}: interior not fully visible"


CASES = [
    # (nq, nk, window, global positions)
    (1, 1, None, None),
    (17, 17, None, None),
    (64, 113, None, None),
    (113, 17, None, None),
    (200, 200, None, None),
    (113, 113, (3, 3), None),
    (200, 200, (40, 25), None),
    (64, 200, (70, 0), None),
    (200, 64, (5, 90), None),
    (64, 64, (500, 500), None),
    (113, 113, (4, 4), [0, 1]),
    (200, 200, (10, 3), [0, 50, 51, 199]),
    (200, 200, (0, 0), list(range(0, 200, 7))),
]


def _case_id(case) -> str:
    nq, nk, window, positions = case
    n = f"N{nq}" if nq == nk else f"Nq{nq}-Nk{nk}"
    w = "full" if window is None else f"W{window[0]}-{window[1]}"
    g = f"-G{len(positions)}" if positions else ""
    return f"{n}-{w}{g}"


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32), (64, 64), (128, 64)], ids=lambda b: f"M{b[0]}-N{b[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_schedules_cover_the_dense_mask(case, causal: bool, blocks) -> None:
    nq, nk, window, positions = case
    if window is not None:
        window = masks.window_bounds(window, causal)
    check_query_schedule(nq, nk, *blocks, causal, window, positions, gb=max(16, blocks[0] // 2))
    check_key_schedule(nq, nk, *blocks, causal, window, positions)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    nq=st.integers(1, 150),
    nk=st.integers(1, 150),
    bm=st.sampled_from([16, 32, 64]),
    bn=st.sampled_from([16, 32, 64]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 160), st.integers(0, 160))),
    gseed=st.integers(0, 3),
    gb=st.sampled_from([None, 16]),
)
def test_schedules_random(nq, nk, bm, bn, causal, window, gseed, gb) -> None:
    positions = None
    if window is not None and gseed and nq == nk:
        gen = torch.Generator().manual_seed(gseed)
        positions = sorted(set(torch.randint(0, nq, (gseed * 2,), generator=gen).tolist()))
    if window is not None:
        window = masks.window_bounds(window, causal)
    check_query_schedule(nq, nk, bm, bn, causal, window, positions, gb=gb)
    check_key_schedule(nq, nk, bm, bn, causal, window, positions)


def test_window_work_is_independent_of_n() -> None:
    """The number of visited key blocks per query block is set by the window, not by N."""
    visits = []
    for n in (1024, 8192):
        sched = fc.query_block_schedule(n, n, 128, 64, causal=True, window=(256, 0))
        visits.append(int(((sched[:, 3] - sched[:, 0] + 63) // 64).max()))
    assert visits[0] == visits[1] <= math.ceil((256 + 128) / 64) + 1
