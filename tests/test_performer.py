"""Performer specifics: the random draw, approximation quality and numerical robustness."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import check_backend, make_qkv, max_err

import attention_variants as av
from attention_variants.favor import draw_projection


def test_orthogonal_draw_structure():
    w = draw_projection(100, 16, ortho=True, seed=3)
    assert w.shape == (100, 16) and w.dtype == torch.float64
    # Rows within one block of 16 are orthogonal.
    block = w[16:32]
    gram = block @ block.T
    off_diag = gram - torch.diag(torch.diagonal(gram))
    assert off_diag.abs().max() < 1e-10
    # Row norms are chi(16)-distributed: mean close to sqrt(16) (E chi_16 ~ 3.94).
    assert abs(w.norm(dim=1).mean().item() - 3.94) < 0.3


def test_same_seed_same_projection_everywhere():
    a = av.PerformerAttention(num_features=32, seed=7)
    b = av.PerformerAttention(num_features=32, seed=7)
    wa = a.projection_matrix(16, "cpu", torch.float64)
    assert torch.equal(wa, b.projection_matrix(16, "cpu", torch.float64))
    assert torch.equal(a.projection_matrix(16, "cpu", torch.float32), wa.float())
    assert not torch.equal(
        wa, av.PerformerAttention(num_features=32, seed=8).projection_matrix(16, "cpu", torch.float64)
    )
    # Functional calls with the default seed agree across backends and dtypes.
    q, k, v = make_qkv(1, 2, 2, 30, 30, 16, dtype=torch.float64)
    out64 = av.attention(q, k, v, "performer", num_features=32, backend="torch")
    out32 = av.attention(q.float(), k.float(), v.float(), "performer", num_features=32, backend="reference")
    assert max_err(out32, out64) < 1e-5


def test_redraw_changes_features_and_is_reproducible():
    p = av.PerformerAttention(num_features=16, seed=0)
    w0 = p.projection_matrix(8).clone()
    p.redraw()
    assert p.seed == 1 and not torch.equal(w0, p.projection_matrix(8))
    p.redraw(seed=0)
    assert torch.equal(w0, p.projection_matrix(8))


def test_injected_projection_is_used():
    w = torch.randn(24, 16)
    p = av.PerformerAttention(projection=w)
    assert p.num_features == 24
    assert torch.equal(p.projection_matrix(16, "cpu", torch.float32), w)
    q, k, v = make_qkv(1, 1, 1, 10, 10, 16, dtype=torch.float64)
    phi_q = torch.exp(q * 0.5 @ w.double().T - (q * 0.5).pow(2).sum(-1, keepdim=True) / 2)
    phi_k = torch.exp(k * 0.5 @ w.double().T - (k * 0.5).pow(2).sum(-1, keepdim=True) / 2)
    a = phi_q @ phi_k.transpose(-1, -2)
    expected = (a @ v) / a.sum(-1, keepdim=True)
    # scale 1/4 makes x' = x / 2 exactly.
    assert max_err(p(q, k, v, scale=0.25, backend="torch"), expected) < 1e-12
    assert max_err(p.reference(q, k, v, scale=0.25), expected) < 1e-12


def _approx_err(num_features: int, ortho: bool, seeds: range, causal: bool = False) -> float:
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(2, 4, 128, 16, generator=gen, dtype=torch.float64) * 0.6
    k = torch.randn(2, 4, 128, 16, generator=gen, dtype=torch.float64) * 0.6
    v = torch.randn(2, 4, 128, 16, generator=gen, dtype=torch.float64)
    exact = av.FullAttention().reference(q, k, v, causal=causal)
    errs = []
    for seed in seeds:
        out = av.PerformerAttention(num_features=num_features, ortho=ortho, seed=seed)(
            q, k, v, causal=causal, backend="torch"
        )
        errs.append((out - exact).pow(2).mean().sqrt().item())
    return sum(errs) / len(errs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_approximation_error_falls_with_features(causal):
    errs = [_approx_err(m, True, range(4), causal) for m in (16, 64, 256, 1024)]
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[3] < 0.5 * errs[1]


def test_orthogonal_features_beat_iid_on_average():
    ortho = _approx_err(32, True, range(12))
    iid = _approx_err(32, False, range(12))
    assert ortho < iid, (ortho, iid)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp16_large_norms_stay_finite(backend, causal):
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, dtype=torch.float16)
    q, k = (q * 5).requires_grad_(True), (k * 5).requires_grad_(True)
    v.requires_grad_(True)
    out = av.attention(q, k, v, "performer", num_features=64, causal=causal, backend=backend)
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    # And it still matches the float64 computation of the same formula.
    ref = av.attention(
        q.double(), k.double(), v.double(), "performer", num_features=64, causal=causal, backend="reference"
    )
    assert max_err(out, ref) < 5e-2


def test_relu_kernel_features():
    p = av.PerformerAttention(num_features=8, kernel="relu")
    x = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    w = p.projection_matrix(4, "cpu", torch.float64)
    phi = p.features(x, 1.0, is_query=True)
    assert torch.allclose(phi, torch.relu(x @ w.T) + 1e-3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("nq", "nk"), [(700, 700), (300, 650), (650, 300)])
def test_torch_backend_in_many_pieces(monkeypatch, causal, nq, nk):
    """The PyTorch backend walks long sequences in pieces; force several, with ragged ends."""
    from attention_variants import favor

    monkeypatch.setattr(favor, "PIECE_ELEMENTS", 2 * 2 * 16 * 256)  # 256 rows per piece here
    assert favor.piece_rows(4, 16) == 256
    q, k, v = make_qkv(1, 4, 2, nq, nk, 16)
    check_backend(av.PerformerAttention(num_features=16), "torch", q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_zero_head_dim_is_uniform_attention(causal):
    """D = 0: q.k = 0, so the features are constant and the output is the mean of the visible
    values, as full attention gives (issue 15)."""
    q, k, v = make_qkv(1, 4, 2, 9, 7, 0, dv=5, dtype=torch.float64)
    expected = av.FullAttention().reference(q, k, v, causal=causal)
    for backend in ("reference", "torch"):
        out = av.attention(q, k, v, "performer", causal=causal, backend=backend, num_features=16)
        assert out.shape == (1, 4, 9, 5) and max_err(out, expected) < 1e-12


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_large_norms_low_precision_follows_float64(backend):
    """Issue 20: inputs of standard deviation 30 at D = 64 put the key exponents hundreds apart.
    With one key stabiliser per (batch, head) most key features underflowed in float32 (relative
    error 0.69 against float64); the per-feature stabiliser keeps float32 at its rounding."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 256, 64, generator=gen, dtype=torch.float64) * 30 for _ in range(2))
    v = torch.randn(1, 2, 256, 64, generator=gen, dtype=torch.float64)
    p = av.PerformerAttention(num_features=128)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        ref = p(qd.double(), kd.double(), vd.double(), backend="reference")  # the same rounded inputs
        assert _rel(p(qd, kd, vd, backend=backend), ref) < tol, dtype


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [1e6, 1e20, 1e30])
def test_huge_scale_stays_finite(scale, causal):
    """Issue 20: scale >= 1e20 gave all-NaN (and 1e6 a relative error of 0.5): the key exponents
    now subtract their own maximum, so the largest is exactly 0 whatever its magnitude."""
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    p = av.PerformerAttention(num_features=32)
    with warnings.catch_warnings():
        # Causal: the early rows lose keys to underflow (in float64 too) and say so, see below.
        warnings.simplefilter("ignore" if causal else "error", av.PrecisionWarning)
        ref = p(q.double(), k.double(), v.double(), causal=causal, scale=scale, backend="reference")
        for backend in ("reference", "torch"):
            out = p(q, k, v, causal=causal, scale=scale, backend=backend)
            assert torch.isfinite(out).all() and _rel(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_causal_underflow_warns(backend):
    """Causal rows see a prefix of the keys, which the per-feature shift (a maximum over all keys)
    cannot follow: at large norms early keys underflow. That is documented and warned about."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=gen) * s for s in (30, 30, 1))
    with pytest.warns(av.PrecisionWarning, match="causal Performer in torch.float32"):
        av.attention(q, k, v, "performer", causal=True, backend=backend, num_features=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        av.attention(q / 30, k / 30, v, "performer", causal=True, backend=backend, num_features=64)
        av.attention(q, k, v, "performer", causal=False, backend=backend, num_features=64)
