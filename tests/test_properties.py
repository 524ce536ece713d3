"""Property-based tests (hypothesis) of the ``torch`` backend over random shapes and options."""

from __future__ import annotations

import torch
from helpers import max_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attention_variants as av
from attention_variants import masks

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    hk = draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 3))
    nq = draw(st.integers(1, 150))
    nk = draw(st.sampled_from([nq, draw(st.integers(1, 150))]))
    d = draw(st.sampled_from([8, 16, 24]))
    dv = draw(st.sampled_from([d, 8]))
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return b, h, hk, nq, nk, d, dv, causal, seed


def _inputs(b, h, hk, nq, nk, d, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hk, nk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hk, nk, dv, generator=gen, dtype=torch.float64)
    return q, k, v


def _check(variant, q, k, v, causal):
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = variant(qs, ks, vs, causal=causal, backend="torch")
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = variant.reference(qr, kr, vr, causal=causal)
    assert max_err(out, ref) < 1e-10
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (qs, ks, vs), g)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
    for a, r in zip(grads, ref_grads, strict=True):
        assert max_err(a, r) < 1e-9


@SETTINGS
@given(problems(), st.integers(0, 40), st.integers(0, 40), st.booleans(), st.integers(0, 3))
def test_sliding_window_matches_reference(problem, left, right, pair, n_global):
    b, h, hk, nq, nk, d, dv, causal, seed = problem
    window = (left, right) if pair else left
    glob = min(n_global, nq) if nq == nk else None  # a count beyond N raises
    variant = av.SlidingWindowAttention(window, global_tokens=glob)
    _check(variant, *_inputs(b, h, hk, nq, nk, d, dv, seed), causal)


@SETTINGS
@given(problems())
def test_full_matches_reference(problem):
    b, h, hk, nq, nk, d, dv, causal, seed = problem
    _check(av.FullAttention(), *_inputs(b, h, hk, nq, nk, d, dv, seed), causal)


@SETTINGS
@given(problems(), st.integers(1, 70), st.booleans(), st.sampled_from(["softmax", "relu"]))
def test_performer_matches_reference(problem, m, ortho, kernel):
    b, h, hk, nq, nk, d, dv, causal, seed = problem
    variant = av.PerformerAttention(num_features=m, ortho=ortho, kernel=kernel, seed=seed)
    _check(variant, *_inputs(b, h, hk, nq, nk, d, dv, seed), causal)


@SETTINGS
@given(st.integers(1, 60), st.integers(1, 60), st.booleans(), st.integers(0, 70), st.integers(0, 70))
def test_visible_pairs_equals_mask_sum(nq, nk, causal, left, right):
    expected = int(masks.dense_mask(nq, nk, causal=causal, window=(left, right)).sum())
    assert masks.visible_pairs(nq, nk, causal=causal, window=(left, right)) == expected


@SETTINGS
@given(st.integers(1, 80), st.booleans(), st.integers(0, 20), st.lists(st.integers(0, 79), max_size=6))
def test_attention_rows_sum_like_softmax(n, causal, w, gpos):
    """Attention to a constant value vector returns that constant on every row with a visible key."""
    gpos = [p for p in gpos if p < n]
    variant = av.SlidingWindowAttention(w, global_tokens=gpos or None)
    q = torch.randn(1, 1, n, 8, dtype=torch.float64)
    k = torch.randn(1, 1, n, 8, dtype=torch.float64)
    v = torch.full((1, 1, n, 3), 2.5, dtype=torch.float64)
    out = variant(q, k, v, causal=causal, backend="torch")
    assert torch.allclose(out, torch.full_like(out, 2.5))
