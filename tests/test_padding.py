"""Key padding (``key_padding_mask``) on the ``reference`` and ``torch`` backends.

A padded key is invisible; positions are not shifted, so the variant's mask is computed on the
padded layout (as Hugging Face's masks are). Every backend is checked against the float64 ground
truth of :mod:`attn_bench.core.numerics`, which applies the padding vector on its own (from the mask
predicate for the softmax variants; for the Performer, whose ground truth is its float64
``reference``, an independent unstabilised FAVOR+ is checked below too).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import check_backend, make_qkv

import attention_variants as av
import attention_variants.base as base
from attention_variants import masks
from attn_bench.core.numerics import check

CPU_BACKENDS = ["reference", "torch"]
B, H, HK, N, D = 4, 4, 2, 37, 16  # GQA, odd length

VARIANTS = {
    "full": lambda: av.FullAttention(),
    "sliding": lambda: av.SlidingWindowAttention((5, 3)),
    # Global positions 0 and 30 are padded in some batch elements below: a padded global key is invisible.
    "sliding_global": lambda: av.SlidingWindowAttention(2, global_tokens=[0, 17, 30]),
    "performer": lambda: av.PerformerAttention(num_features=32, seed=3),
    "performer_relu": lambda: av.PerformerAttention(num_features=32, kernel="relu", seed=3),
}


def padding_mask(b: int, nk: int) -> torch.Tensor:
    """Element 0 left-padded, 1 right-padded, 2 all padded, 3 with a hole (and its first key padded)."""
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[0, : nk // 4] = False
    mask[1, nk - nk // 3 :] = False
    if b > 2:
        mask[2] = False
    if b > 3:
        mask[3, 0] = False
        mask[3, nk // 4 : nk // 4 + 12] = False
    return mask


SHAPES = [(N, N), (17, N), (N, 23)]  # (Nq, Nk)


def _cases():
    for name in VARIANTS:
        for backend in CPU_BACKENDS:
            for nq, nk in SHAPES:
                if name == "sliding_global" and nq != nk:
                    continue  # global tokens need Nq == Nk
                if backend == "reference" and nq != nk:
                    continue  # the dense formula has no special case for Nq != Nk; keep the suite fast
                yield name, backend, nq, nk


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("name", "backend", "nq", "nk"), list(_cases()))
def test_padding_matches_ground_truth(name, backend, nq, nk, causal):
    """Output and dq, dk, dv against the float64 ground truth, with left / right / full / hole padding."""
    variant = VARIANTS[name]()
    q, k, v = make_qkv(B, H, HK, nq, nk, D)
    check_backend(variant, backend, q, k, v, causal=causal, key_padding_mask=padding_mask(B, nk))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, torch.float64) for name in VARIANTS]
    + [(name, dt) for name in ("full", "sliding_global", "performer") for dt in (torch.float16, torch.bfloat16)],
    ids=str,
)
def test_padding_other_dtypes(name, dtype):
    variant = VARIANTS[name]()
    q, k, v = make_qkv(B, H, HK, N, N, D, dtype=dtype)
    check_backend(variant, "torch", q, k, v, causal=True, key_padding_mask=padding_mask(B, N))


def test_full_causal_without_the_fused_cpu_op(monkeypatch: pytest.MonkeyPatch):
    """Where PyTorch lacks the fused CPU kernel taking a causal flag and a mask together, the
    ``full`` torch backend falls back to a dense causal mask: same results."""
    import attention_variants.full as full

    monkeypatch.setattr(full, "_FUSED_CPU_CAUSAL_WITH_MASK", None)
    q, k, v = make_qkv(B, H, HK, N, N, D)
    check_backend(av.FullAttention(), "torch", q, k, v, causal=True, key_padding_mask=padding_mask(B, N))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_rows_without_a_visible_key(name, backend):
    """Left padding + causal: the first query rows see only padded keys; element 2 sees none at all.
    Those rows are exactly 0 with exactly zero dq, padded keys get exactly zero dk and dv, no NaN."""
    variant = VARIANTS[name]()
    q, k, v = (t.requires_grad_() for t in make_qkv(B, H, HK, N, N, D))
    mask = padding_mask(B, N)
    out = variant(q, k, v, causal=True, backend=backend, key_padding_mask=mask)
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    # Which rows see no real key, from the mask predicate (causal for the Performer) and the mask.
    if variant.softmax:
        visible = masks.dense_from_mod(variant.mask_mod(N, N, True), N, N)
    else:
        visible = masks.dense_mask(N, N, causal=True)
    empty = ~(visible[None] & mask[:, None, :]).any(dim=-1)  # (B, N)
    assert empty[0, : N // 4].all() and empty[2].all()
    assert (out.detach()[empty[:, None].expand(B, H, N)] == 0).all()
    assert (q.grad[empty[:, None].expand(B, H, N)] == 0).all()
    padded = ~mask[:, None].expand(B, HK, N)
    assert (k.grad[padded] == 0).all() and (v.grad[padded] == 0).all()
    # A row that sees a real key is not zero.
    assert (out.detach()[~empty[:, None].expand(B, H, N)].abs().sum(-1) > 0).all()


def test_sliding_window_row_inside_a_padding_hole_is_zero():
    """Non-causal window (5, 3): queries 14 to 17 see keys [i - 5, i + 3], all inside the hole [9, 21)."""
    variant = VARIANTS["sliding"]()
    for backend in CPU_BACKENDS:
        q, k, v = (t.requires_grad_() for t in make_qkv(B, H, HK, N, N, D))
        out = variant(q, k, v, backend=backend, key_padding_mask=padding_mask(B, N))
        out.backward(torch.ones_like(out))
        assert (out[3, :, 14:18] == 0).all() and (q.grad[3, :, 14:18] == 0).all()
        assert (out[3, :, 13].abs().sum(-1) > 0).all() and (out[3, :, 18].abs().sum(-1) > 0).all()  # keys 8, 21
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


# ---------------------------------------------------------------------------------------------
# A padded sequence gives its real tokens what the unpadded sequence gives
# ---------------------------------------------------------------------------------------------


def _run(variant, q, k, v, causal, backend, mask, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = variant(q, k, v, causal=causal, backend=backend, key_padding_mask=mask)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_padded_equals_unpadded(name, backend, causal, side):
    """The real tokens of a padded sequence get exactly what the sequence alone gets.

    Self-attention (Nq == Nk) of ``L = 29`` real tokens, padded to ``N = 37`` with ``P = 8`` pad
    tokens on the left or the right, against the ``L`` tokens run alone. Positions are not
    shifted by padding (Hugging Face's convention): the padded run's masks are those of the
    padded layout. This gives the same result because

    - right padding: real token ``t`` is at position ``t`` in both runs; the pad keys are hidden;
    - left padding: real token ``t`` is at position ``P + t``. Causal and sliding-window masks
      depend only on ``j - i`` (and the causal key prefix before ``P + t`` holds pad keys only),
      and the Performer is position-free, so hiding the pad keys leaves what the unpadded run sees.
      Global tokens are absolute positions: the padded run names them in its own layout
      (``P + g``), which is what a caller of a left-padded batch would pass.

    Compared in float64 on output, dq of the real rows, and dk / dv of the real keys, with an
    upstream gradient on the real rows only (pad query rows are outputs nobody reads).
    """
    length, pad = N - 8, 8
    start = pad if side == "left" else 0
    real = slice(start, start + length)
    q, k, v = make_qkv(1, H, HK, N, N, D, dtype=torch.float64)
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[:, real] = True
    dout = torch.zeros(1, H, N, D, dtype=torch.float64)
    dout[:, :, real] = torch.randn(1, H, length, D, dtype=torch.float64)

    padded_variant, alone_variant = VARIANTS[name](), VARIANTS[name]()
    if name == "sliding_global":  # the same global tokens, named in each run's layout
        padded_variant = av.SlidingWindowAttention(2, global_tokens=[start + 0, start + 17])
        alone_variant = av.SlidingWindowAttention(2, global_tokens=[0, 17])

    out, dq, dk, dv = _run(padded_variant, q, k, v, causal, backend, mask, dout)
    sub = [t[:, :, real] for t in (q, k, v)]
    out1, dq1, dk1, dv1 = _run(alone_variant, *sub, causal, backend, None, dout[:, :, real])
    tol = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(out[:, :, real], out1, **tol)
    torch.testing.assert_close(dq[:, :, real], dq1, **tol)
    torch.testing.assert_close(dk[:, :, real], dk1, **tol)
    torch.testing.assert_close(dv[:, :, real], dv1, **tol)
    assert (dk[:, :, ~mask[0]] == 0).all() and (dv[:, :, ~mask[0]] == 0).all()


def test_module_and_functional_forward_the_mask():
    """AttentionLayer and attention() pass key_padding_mask through (right padding vs the sequence alone)."""
    torch.manual_seed(0)
    layer = av.AttentionLayer(32, 4, "sliding_window", num_kv_heads=2, causal=False, window=3, dtype=torch.float64)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    y = layer(x, key_padding_mask=mask)
    torch.testing.assert_close(y[1, :7], layer(x[1:, :7])[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(y[0], layer(x[:1])[0], atol=1e-12, rtol=1e-10)

    q, k, v = make_qkv(2, 4, 2, 11, 11, 8, dtype=torch.float64)
    got = av.attention(q, k, v, "full", causal=True, key_padding_mask=mask)
    want = av.FullAttention().reference(q, k, v, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(got, want)


def test_non_contiguous_inputs_and_mask():
    q = torch.randn(B, N, H, D).transpose(1, 2)  # (B, H, N, D) views
    k, v = (torch.randn(B, N, HK, D).transpose(1, 2) for _ in range(2))
    mask = padding_mask(B, N).t().contiguous().t()  # a transposed view
    assert not mask.is_contiguous() and not k.is_contiguous()
    for name in VARIANTS:
        check_backend(VARIANTS[name](), "torch", q, k, v, causal=True, key_padding_mask=mask)


# ---------------------------------------------------------------------------------------------
# The Performer: padded keys leave the sums and the key stabiliser
# ---------------------------------------------------------------------------------------------


def favor_unstabilised(variant, q, k, v, causal, mask):
    """FAVOR+ from its definition in float64, with no stabiliser: features
    ``exp(W x' - |x'|^2 / 2) / sqrt(m)`` (or ``relu(W x') + 1e-3``), padded and causally hidden keys
    removed from both sums, rows with no visible key 0. Valid for moderate input norms only."""
    scale = q.shape[-1] ** -0.5
    w = variant.projection_matrix(q.shape[-1], dtype=torch.float64)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def phi(x):
        x = x * scale**0.5
        if variant.kernel == "relu":
            return torch.relu(x @ w.T) + 1e-3
        return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    a = phi(q) @ phi(k).transpose(-1, -2)
    nq, nk = q.shape[2], k.shape[2]
    visible = mask[:, None, None, :].expand(-1, 1, nq, nk)
    if causal:
        i = torch.arange(nq)[:, None] + nk - nq
        visible = visible & (torch.arange(nk)[None, :] <= i)
    a = torch.where(visible, a, 0.0)
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v) / torch.where(den > 0, den, 1.0), 0.0)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("nq", "nk"), SHAPES)
def test_performer_reference_against_its_definition(nq, nk, causal, kernel):
    """The float64 reference (the Performer's ground truth) against the unstabilised definition."""
    variant = av.PerformerAttention(num_features=32, kernel=kernel, seed=5)
    q, k, v = make_qkv(B, H, HK, nq, nk, D, dtype=torch.float64)
    mask = padding_mask(B, nk)
    got = variant.reference(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(got, favor_unstabilised(variant, q, k, v, causal, mask), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_performer_stabiliser_ignores_padded_keys(backend, causal):
    """Padded keys that maximise the key exponents: the stabiliser is a per-feature max over the
    keys, and were the padded keys in it, every real key's float32 feature would underflow.

    With projection rows ``w_f`` of norm 20, the exponent ``w_f.k' - |k'|^2 / 2`` of a real key
    (standard normal, ``k' = k * scale ** 0.5``) is about -2 +- 25, while padded key ``j``, set to
    ``k' = w_f`` (``f = j mod m``), reaches ``|w_f|^2 / 2 = 200`` in feature ``f``. The real rows
    must follow the float64 definition computed without the padded keys, to float32 accuracy."""
    scale = D**-0.5
    w = torch.randn(8, D, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True) * 20.0
    variant = av.PerformerAttention(projection=w)
    q, k, v = make_qkv(B, H, HK, N, N, D, dtype=torch.float64)
    mask = padding_mask(B, N)
    exciting = (w / scale**0.5)[torch.arange(N) % w.shape[0]]  # (N, D)
    k = torch.where(mask[:, None, :, None], k, exciting)
    want = favor_unstabilised(variant, q, k, v, causal, mask)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    got = variant(q32, k32, v32, causal=causal, backend=backend, key_padding_mask=mask)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    got.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q32, k32, v32))
    assert (k32.grad[~mask[:, None].expand(B, HK, N)] == 0).all()


# ---------------------------------------------------------------------------------------------
# The checker applies the mask; errors; dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["full", "performer"])
def test_checker_catches_a_backend_that_ignores_the_mask(name):
    variant = VARIANTS[name]()
    q, k, v = make_qkv(B, H, HK, N, N, D)
    mask = padding_mask(B, N)
    res = check(lambda a, b, c: variant(a, b, c, backend="torch"), variant, q, k, v, False, key_padding_mask=mask)
    assert not res.ok
    good = check(
        lambda a, b, c: variant(a, b, c, backend="torch", key_padding_mask=mask),
        variant,
        q,
        k,
        v,
        False,
        key_padding_mask=mask,
    )
    assert good.ok, good.message


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.ones(B, N), TypeError, "key_padding_mask must be a bool"),
        (torch.ones(B, N, dtype=torch.int64), TypeError, "key_padding_mask must be a bool"),
        ([[True] * N] * B, TypeError, "key_padding_mask must be a bool"),
        (torch.ones(B, N + 1, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, Nk\)"),
        (torch.ones(N, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, Nk\)"),
        (torch.ones(B, N, 1, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, Nk\)"),
        (torch.ones(B, N, dtype=torch.bool, device="meta"), ValueError, "key_padding_mask is on meta"),
    ],
)
def test_bad_masks(mask, error, match):
    q, k, v = make_qkv(B, H, HK, N, N, D)
    for name in VARIANTS:
        with pytest.raises(error, match=match):
            VARIANTS[name]()(q, k, v, key_padding_mask=mask)
    with pytest.raises(error, match=match):
        av.attention(q, k, v, key_padding_mask=mask)


@pytest.fixture
def own_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends registered in a test are forgotten after it (the registry is process-wide)."""
    monkeypatch.setattr(base, "_EXTRA_BACKENDS", list(base._EXTRA_BACKENDS))
    monkeypatch.setattr(av.FullAttention, "_backends", dict(av.FullAttention._backends))


def test_backend_without_padding_refuses_a_mask(own_backends):
    calls = []

    @av.register_backend(av.FullAttention, "nopad")
    def nopad(variant, q, k, v, causal, scale):  # the pre-padding signature
        calls.append(1)
        return variant.dense(q, k, v, causal, scale)

    q, k, v = make_qkv(2, 2, 2, 9, 9, 8)
    av.FullAttention()(q, k, v, backend="nopad")  # no mask: called as before
    assert calls == [1]
    with pytest.raises(ValueError, match=r"backend='nopad'.*does not take key_padding_mask"):
        av.FullAttention()(q, k, v, backend="nopad", key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding must be a bool"):
        av.register_backend(av.FullAttention, "nopad2", padding="yes")


def test_padding_backend_gets_the_mask_as_a_keyword(own_backends):
    seen = []

    @av.register_backend(av.FullAttention, "withpad", padding=True)
    def withpad(variant, q, k, v, causal, scale, key_padding_mask=None):
        seen.append(key_padding_mask)
        return variant.dense(q, k, v, causal, scale, key_padding_mask=key_padding_mask)

    q, k, v = make_qkv(2, 2, 2, 9, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.bool)
    av.FullAttention()(q, k, v, backend="withpad")
    av.FullAttention()(q, k, v, backend="withpad", key_padding_mask=mask)
    assert seen[0] is None and seen[1] is mask


def test_auto_skips_a_backend_that_cannot_take_the_mask(own_backends):
    """With the torch backend re-registered without padding, auto goes to the next backend that
    takes the mask (reference) when one is given, and stays on torch otherwise."""
    torch_forward = av.FullAttention._backends["torch"].forward

    @av.register_backend(av.FullAttention, "torch")
    def torch_no_padding(variant, q, k, v, causal, scale):
        return torch_forward(variant, q, k, v, causal, scale)

    variant = av.FullAttention()
    q, k, v = make_qkv(2, 2, 2, 9, 9, 8)
    mask = padding_mask(2, 9)
    assert variant.resolve_backend("auto", q, v) == "torch"
    assert variant.resolve_backend("auto", q, v, padding=True) == "reference"
    out = variant(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out, variant.reference(q, k, v, key_padding_mask=mask))
    with pytest.raises(ValueError, match="does not take key_padding_mask"):
        variant(q, k, v, backend="torch", key_padding_mask=mask)


def test_empty_sequences_with_a_mask():
    q, k, v = make_qkv(2, 2, 2, 0, 5, 8)
    for name in VARIANTS:
        if name == "sliding_global":
            continue
        assert VARIANTS[name]()(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)).shape == (2, 2, 0, 8)
    q, k, v = make_qkv(2, 2, 2, 4, 0, 8)
    out = av.FullAttention()(q, k, v, key_padding_mask=torch.ones(2, 0, dtype=torch.bool))
    assert out.shape == (2, 2, 4, 8) and (out == 0).all()


def test_rows_seen_helpers_match_the_dense_rule():
    """masks.keys_seen / window_rows_seen (prefix counts) against the dense mask and the padding vector."""
    gen = torch.Generator().manual_seed(7)
    for nq, nk in [(13, 13), (5, 13), (13, 5)]:
        kpm = torch.rand(6, nk, generator=gen) < 0.4
        kpm[0] = False
        for causal in (False, True):
            dense = masks.dense_mask(nq, nk, causal=causal)
            assert torch.equal(masks.keys_seen(kpm, nq, causal), (dense[None] & kpm[:, None]).any(-1))
            for window in (0, 2, (1, 3), (3, 0), 50):
                gms = [None, torch.tensor([1, 8]), torch.tensor([0, 12])] if nq == nk else [None]
                for g in gms:
                    gm = None if g is None else masks.global_mask(g, nq)
                    dense = masks.dense_mask(nq, nk, causal=causal, window=window, global_mask=gm)
                    want = (dense[None] & kpm[:, None]).any(-1)
                    assert torch.equal(masks.window_rows_seen(kpm, nq, window, causal, gm), want), (window, g)
