"""Every variant x CPU backend against the float64 ground truth, outputs and gradients.

The checker is the harness's (bench/attn_bench/core/numerics.py): FlashAttention's ``err <= 2 * err_same_dtype +
atol`` (3x for gradients) plus an RMS-ratio bound, on fresh random inputs. For the softmax
variants the ground truth is computed by the checker from the mask predicate alone, so the
``reference`` backend is tested too. The Performer's reference is its own ground truth (the
checker has no second FAVOR+): its reference backend is tested in tests/test_performer.py against
features written out there, and here only the ``torch`` backend is checked.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_backend, make_qkv, shape_id

import attention_variants as av

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]

# (B, H, Hk, Nq, Nk, D): odd lengths, Nq != Nk both ways, head dims 16..128, GQA.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 2, 2, 2, 2, 40),
    (1, 4, 2, 17, 17, 64),
    (2, 4, 4, 113, 113, 80),
    (1, 2, 1, 257, 257, 128),
    (1, 2, 2, 1000, 1000, 64),
    (1, 4, 2, 113, 203, 64),
    (1, 2, 2, 203, 113, 40),
    (1, 2, 1, 1, 239, 16),
    (1, 2, 2, 239, 1, 64),
]


def _params(shapes):
    out = []
    for shape in shapes:
        for causal in (False, True):
            b, h, hk, nq, nk, d = shape
            out.append(pytest.param(shape, causal, id=shape_id(b, h, hk, nq, nk, d, causal)))
    return out


BACKENDS = ["reference", "torch"]

SLIDING = [
    pytest.param({"window": 0}, id="w0"),
    pytest.param({"window": (5, 3)}, id="w5-3"),
    pytest.param({"window": 33}, id="w33"),
    pytest.param({"window": 5000}, id="w-wider-than-N"),
    pytest.param({"window": 16, "global_tokens": 1}, id="w16-g0"),
    pytest.param({"window": (8, 4), "global_tokens": "mid"}, id="w8-4-gmid"),
]

PERFORMER = [
    pytest.param({"num_features": 64}, id="m64"),
    pytest.param({"num_features": 16, "ortho": False}, id="m16-iid"),
    pytest.param({"num_features": 48, "kernel": "relu"}, id="m48-relu"),
]


def _grad_ok(dtype: torch.dtype, nq: int, nk: int) -> bool:
    # The naive half-precision reference is slow on CPU at N=1000; outputs are still checked.
    return not (dtype in (torch.float16, torch.bfloat16) and nq * nk > 100_000)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "causal"), _params(SHAPES))
def test_full(shape, causal, backend, dtype):
    b, h, hk, nq, nk, d = shape
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype)
    check_backend(av.FullAttention(), backend, q, k, v, causal=causal, grad=_grad_ok(dtype, nq, nk))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", SLIDING)
@pytest.mark.parametrize(("shape", "causal"), _params(SHAPES[:7] + SHAPES[8:9]))
def test_sliding_window(shape, causal, opts, backend, dtype):
    b, h, hk, nq, nk, d = shape
    opts = dict(opts)
    if "global_tokens" in opts:
        if nq != nk:
            pytest.skip("global tokens need Nq == Nk")
        if opts["global_tokens"] == "mid":
            gm = torch.zeros(nq, dtype=torch.bool)
            gm[nq // 2] = True
            gm[nq - 1] = True
            opts["global_tokens"] = gm
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype)
    check_backend(av.SlidingWindowAttention(**opts), backend, q, k, v, causal=causal, grad=_grad_ok(dtype, nq, nk))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("opts", PERFORMER)
@pytest.mark.parametrize(("shape", "causal"), _params(SHAPES[:5] + SHAPES[6:]))
def test_performer(shape, causal, opts, backend, dtype):
    b, h, hk, nq, nk, d = shape
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype)
    check_backend(av.PerformerAttention(**opts), backend, q, k, v, causal=causal, grad=_grad_ok(dtype, nq, nk))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_long_causal_chunks(causal):
    """Several chunks of the causal prefix form, with a ragged last chunk and a key offset."""
    q, k, v = make_qkv(1, 2, 1, 300, 333, 32)
    check_backend(av.PerformerAttention(num_features=32), "torch", q, k, v, causal=causal)


@pytest.mark.parametrize("variant", ["full", "sliding_window", "performer"])
def test_explicit_scale(variant):
    opts = {"window": 7} if variant == "sliding_window" else {}
    q, k, v = make_qkv(1, 2, 2, 50, 50, 32)
    check_backend(av.get_variant(variant, **opts), "torch", q, k, v, causal=True, scale=0.3)


@pytest.mark.parametrize("variant", ["full", "sliding_window", "performer"])
def test_different_value_head_dim(variant):
    opts = {"window": (4, 9)} if variant == "sliding_window" else {}
    q, k, v = make_qkv(2, 4, 2, 70, 90, 32, dv=48)
    check_backend(av.get_variant(variant, **opts), "torch", q, k, v, causal=True)


_SOFTMAX = torch.softmax


def _hot_softmax(scores, dim=-1):
    """A 10% temperature error: the mutation the reference-backend tests must catch."""
    return _SOFTMAX(scores * 1.1, dim=dim)


@pytest.mark.parametrize("variant", [av.FullAttention(), av.SlidingWindowAttention(window=9, global_tokens=1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wrong_reference_fails(monkeypatch, variant, dtype):
    """A softmax with a 10% temperature error inside the variants' dense reference fails the checker."""

    q, k, v = make_qkv(1, 2, 2, 40, 40, 32, dtype=dtype)
    check_backend(variant, "reference", q, k, v, causal=True)  # passes as it is
    monkeypatch.setattr(torch, "softmax", _hot_softmax)
    with pytest.raises(AssertionError, match="max err"):
        check_backend(variant, "reference", q, k, v, causal=True)
