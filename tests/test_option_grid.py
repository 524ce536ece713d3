"""Every combination of a variant's documented options runs on every backend that claims it.

The grid crosses value head size (Dv != D), grouped-query attention, key padding, causal and
Nq != Nk (both ways) for each registered variant, with its ``verify_options`` and more; every case
is checked, output and gradients, against the float64 ground truth of the harness's checker. The
``reference`` and ``torch`` backends walk the whole grid; the Triton kernels (run by the
interpreter, seconds per call) walk a covering subset in which every pair of factor levels occurs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import check_backend, make_qkv

import attention_variants as av

B, D = 2, 16
SHAPES = [(9, 9), (6, 11), (11, 6)]  # (Nq, Nk)
FACTORS = {
    "dv": [D, 8],
    "kv_heads": [4, 2],  # H = 4: plain multi-head, then two query heads per key head
    "padding": [False, True],
    "causal": [False, True],
    "shape": SHAPES,
}


def option_sets() -> list[tuple[str, dict]]:
    """Each registered variant with each option set it documents (``verify_options``), plus the
    Performer's relu kernel and a window wider than every sequence here."""
    out = []
    for name in av.list_variants():
        cls = av.variant_class(name)
        out += [(name, dict(opts)) for opts in cls.verify_options]
    out += [("performer", {"num_features": 16, "kernel": "relu"}), ("sliding_window", {"window": (20, 1)})]
    return out


def padding_mask(nk: int) -> torch.Tensor:
    """Element 0 left-padded (3 keys), element 1 right-padded (2 keys)."""
    mask = torch.ones(B, nk, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, -2:] = False
    return mask


def _valid(options: dict, shape: tuple[int, int]) -> bool:
    return not options.get("global_tokens") or shape[0] == shape[1]  # global tokens need Nq == Nk


def full_grid() -> list[dict]:
    keys = list(FACTORS)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*FACTORS.values())]


def covering_grid() -> list[dict]:
    """A small subset of :func:`full_grid` in which every pair of levels of two factors occurs
    (greedy pairwise cover, deterministic)."""
    keys = list(FACTORS)
    levels = {key: range(len(values)) for key, values in FACTORS.items()}
    pairs = {(a, i, b, j) for a, b in itertools.combinations(keys, 2) for i in levels[a] for j in levels[b]}
    chosen = []
    candidates = list(itertools.product(*levels.values()))
    while pairs:
        best = max(candidates, key=lambda c: len(_pairs_of(keys, c) & pairs))
        pairs -= _pairs_of(keys, best)
        chosen.append({key: FACTORS[key][i] for key, i in zip(keys, best, strict=True)})
    return chosen


def _pairs_of(keys: list[str], combo: tuple[int, ...]) -> set:
    return {(keys[a], combo[a], keys[b], combo[b]) for a, b in itertools.combinations(range(len(keys)), 2)}


def _cases():
    for name, options in option_sets():
        variant = av.get_variant(name, **options)
        for backend in av.list_backends():
            if not variant.supports(backend, "cpu", torch.float32, D):
                continue
            grid = covering_grid() if backend == "triton" else full_grid()
            for point in grid:
                if point["padding"] and not variant.takes_padding(backend):
                    continue
                if _valid(options, point["shape"]):
                    opts = ",".join(f"{k}={v}" for k, v in options.items())
                    pid = "-".join(f"{k}{v}" for k, v in point.items() if k != "shape")
                    yield pytest.param(
                        name, options, backend, point, id=f"{name}[{opts}]-{backend}-{pid}-{point['shape']}"
                    )


def test_covering_grid_covers_every_pair():
    grid = covering_grid()
    keys = list(FACTORS)
    for a, b in itertools.combinations(keys, 2):
        seen = {(repr(p[a]), repr(p[b])) for p in grid}
        assert len(seen) == len(FACTORS[a]) * len(FACTORS[b]), (a, b)
    assert len(grid) < len(full_grid()) // 4


@pytest.mark.parametrize(("name", "options", "backend", "point"), list(_cases()))
def test_option_grid(name, options, backend, point):
    variant = av.get_variant(name, **options)
    nq, nk = point["shape"]
    q, k, v = make_qkv(B, 4, point["kv_heads"], nq, nk, D, point["dv"])
    mask = padding_mask(nk) if point["padding"] else None
    check_backend(variant, backend, q, k, v, causal=point["causal"], key_padding_mask=mask)
