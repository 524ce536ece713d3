"""Mask semantics, window identities, empty rows, FLOPs and other behaviour of the interface."""

from __future__ import annotations

import pytest
import torch
from helpers import make_qkv, max_err

import attention_variants as av
from attention_variants import masks

CPU_BACKENDS = ["reference", "torch"]


def _picture(mask: torch.Tensor) -> list[str]:
    return ["".join("x" if v else "." for v in row) for row in mask.tolist()]


def test_mask_pictures_match_docstring():
    """The ASCII pictures in masks.py, checked cell by cell."""
    assert _picture(masks.dense_mask(2, 5, causal=True)) == ["xxxx.", "xxxxx"]
    assert _picture(masks.dense_mask(5, 2, causal=True)) == ["..", "..", "..", "x.", "xx"]
    assert _picture(masks.dense_mask(6, 6, window=(2, 1))) == [
        "xx....",
        "xxx...",
        "xxxx..",
        ".xxxx.",
        "..xxxx",
        "...xxx",
    ]
    g = masks.global_mask(1, 5)
    assert _picture(masks.dense_mask(5, 5, window=(1, 1), global_mask=g)) == [
        "xxxxx",
        "xxx..",
        "xxxx.",
        "x.xxx",
        "x..xx",
    ]


@pytest.mark.parametrize(
    ("window", "causal", "expected"), [(3, False, (3, 3)), (3, True, (3, 0)), ((2, 5), True, (2, 0))]
)
def test_window_bounds(window, causal, expected):
    assert masks.window_bounds(window, causal) == expected


def test_dense_mask_rule_bruteforce():
    """dense_mask equals the rule of DESIGN.md written as a double loop."""
    gm = torch.tensor([False, True, False, False, False, False, True])
    for nq, nk in [(7, 7), (4, 9), (9, 4)]:
        for causal in (False, True):
            for window in (None, 0, 2, (1, 3)):
                g = gm if nq == nk == 7 else None
                got = masks.dense_mask(nq, nk, causal=causal, window=window, global_mask=g)
                left, right = masks.window_bounds(window, causal) if window is not None else (10**9, 10**9)
                for i in range(nq):
                    p = i + nk - nq
                    for j in range(nk):
                        vis = p - left <= j <= p + right
                        if g is not None:
                            vis = vis or bool(g[i]) or bool(g[j])
                        if causal:
                            vis = vis and j <= p
                        assert bool(got[i, j]) == vis, (nq, nk, causal, window, i, j)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk"), [(37, 37), (20, 45), (45, 20)])
def test_visible_pairs_counts_dense_mask(nq, nk, causal):
    for window in (None, 0, 3, (2, 7), 100):
        assert masks.visible_pairs(nq, nk, causal=causal, window=window) == int(
            masks.dense_mask(nq, nk, causal=causal, window=window).sum()
        )
    if nq == nk:
        g = torch.zeros(nq, dtype=torch.bool)
        g[[0, 5, nq - 1]] = True
        expected = masks.dense_mask(nq, nk, causal=causal, window=(3, 2), global_mask=g).sum()
        assert masks.visible_pairs(nq, nk, causal=causal, window=(3, 2), global_mask=g) == int(expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_window_wider_than_n_is_full(backend, causal):
    q, k, v = make_qkv(2, 4, 2, 77, 77, 32, dtype=torch.float64)
    out = av.attention(q, k, v, "sliding_window", window=1000, causal=causal, backend=backend)
    full = av.attention(q, k, v, "full", causal=causal, backend="reference")
    assert max_err(out, full) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_n_0_non_causal_is_causal_full(backend):
    n = 90
    q, k, v = make_qkv(1, 2, 2, n, n, 16, dtype=torch.float64)
    out = av.attention(q, k, v, "sliding_window", window=(n, 0), causal=False, backend=backend)
    full = av.attention(q, k, v, "full", causal=True, backend="reference")
    assert max_err(out, full) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("nq", "nk"), [(50, 50), (30, 50), (50, 30)])
def test_window_zero_sees_the_diagonal_only(backend, nq, nk):
    q, k, v = make_qkv(1, 2, 1, nq, nk, 16, dtype=torch.float64)
    out = av.attention(q, k, v, "sliding_window", window=0, backend=backend)
    expected = torch.zeros(1, 2, nq, 16, dtype=torch.float64)
    for i in range(nq):
        p = i + nk - nq
        if 0 <= p < nk:
            expected[:, :, i] = v[:, 0, p]
    assert max_err(out, expected) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("variant", "opts"),
    [("full", {}), ("sliding_window", {"window": (0, 2)}), ("performer", {"num_features": 16})],
)
def test_rows_without_keys_are_zero_with_zero_grads(backend, variant, opts):
    """Causal with Nq > Nk: the first Nq - Nk queries see no key."""
    q, k, v = make_qkv(1, 2, 2, 40, 15, 16)
    q.requires_grad_(True)
    out = av.attention(q, k, v, variant, causal=True, backend=backend, **opts)
    assert torch.isfinite(out).all()
    assert (out[:, :, :25] == 0).all()
    assert (out[:, :, 25:].abs().sum(-1) > 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert (q.grad[:, :, :25] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_pair_can_leave_rows_empty(backend):
    """Window (0, 2) with Nq > Nk and no causal flag: early queries' bands end before key 0."""
    q, k, v = make_qkv(1, 1, 1, 20, 8, 8)
    out = av.attention(q, k, v, "sliding_window", window=(0, 2), backend=backend)
    ref = av.attention(q.double(), k.double(), v.double(), "sliding_window", window=(0, 2), backend="reference")
    assert (out[:, :, :10] == 0).all() and max_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["full", "sliding_window", "performer"])
def test_empty_sequences(backend, variant):
    opts = {"window": 4} if variant == "sliding_window" else {}
    for nq, nk in [(0, 10), (10, 0), (0, 0)]:
        q, k, v = make_qkv(2, 2, 1, nq, nk, 8, dv=12)
        q.requires_grad_(True)
        out = av.attention(q, k, v, variant, backend=backend, **opts)
        assert out.shape == (2, 2, nq, 12)
        assert (out == 0).all()
        out.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["full", "sliding_window", "performer"])
def test_non_contiguous_inputs(backend, variant):
    opts = {"window": 5, "global_tokens": 2} if variant == "sliding_window" else {}
    # Stored as (B, N, H, D), viewed as (B, H, N, D): non-contiguous, as after a head split.
    q = torch.randn(1, 33, 4, 16, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(1, 33, 2, 16, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    out = av.attention(q, k, v, variant, causal=True, backend=backend, **opts)
    ref = av.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), variant, causal=True, backend="reference", **opts
    )
    assert max_err(out, ref) < 1e-10


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["full", "sliding_window", "performer"])
def test_nan_propagates(backend, variant):
    opts = {"window": 3} if variant == "sliding_window" else {}
    q, k, v = make_qkv(1, 1, 1, 20, 20, 8)
    v[0, 0, 5, 0] = float("nan")
    out = av.attention(q, k, v, variant, backend=backend, **opts)
    assert out.isnan().any()


def test_gqa_matches_repeated_heads():
    q, k, v = make_qkv(2, 6, 2, 40, 40, 16, dtype=torch.float64)
    for variant, opts in [("full", {}), ("sliding_window", {"window": 4}), ("performer", {"num_features": 32})]:
        out = av.attention(q, k, v, variant, causal=True, backend="torch", **opts)
        rep = av.attention(
            q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), variant, causal=True, backend="torch", **opts
        )
        assert max_err(out, rep) < 1e-12


def test_object_and_functional_forms_agree():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    sw = av.SlidingWindowAttention(window=8, global_tokens=1)
    a = sw(q, k, v, causal=False, backend="torch")
    b = av.attention(q, k, v, "sliding_window", window=8, global_tokens=1, backend="torch")
    assert torch.equal(a, b)
    assert max_err(sw.reference(q, k, v), a) < 1e-5


def test_auto_resolves_to_torch_on_cpu():
    q, _, v = make_qkv(1, 1, 1, 8, 8, 8)
    for name in av.list_variants():
        opts = {"window": 2} if name == "sliding_window" else {}
        assert av.get_variant(name, **opts).resolve_backend("auto", q, v) == "torch"


def test_registry_lists():
    assert av.list_variants() == ["full", "sliding_window", "performer"]
    assert av.list_backends() == ["reference", "torch", "triton"]
    for name in av.list_variants():
        assert set(av.variant_class(name)._backends) == set(av.list_backends())


@pytest.mark.parametrize("variant", ["full", "sliding_window", "performer"])
def test_supports(variant, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    opts = {"window": 2} if variant == "sliding_window" else {}
    var = av.get_variant(variant, **opts)
    for backend in ("reference", "torch"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert var.supports(backend, "cpu", dtype, 64)
    assert not var.supports("triton", "cpu", torch.float16, 64)
    assert "CUDA" in var.unsupported_reason("triton", "cpu", torch.float16, 64)
    assert not var.supports("torch", "cpu", torch.int32, 64)


def test_flops():
    b, h, n, d = 2, 3, 100, 16
    full = av.FullAttention()
    assert full.flops((b, h, n, d), (b, h, n, d), (b, h, n, d)) == 4 * b * h * n * n * d
    assert full.flops((b, h, n, d), (b, h, n, d), (b, h, n, d), causal=True) == 4 * b * h * (n * (n + 1) // 2) * d
    sw = av.SlidingWindowAttention(window=(3, 2), global_tokens=[0, 50])
    pairs = int(sw.dense_mask(n, n, causal=False).sum())
    assert sw.flops((b, h, n, d), (b, h, n, d), (b, h, n, 8)) == 2 * b * h * pairs * (d + 8)
    q, k, v = make_qkv(b, h, 1, n, n, d)
    perf = av.PerformerAttention(num_features=32)
    assert perf.flops(q, k, v) == 2 * 32 * d * b * (h * n + n) + 2 * 32 * (d + 1) * b * (n + h * n)


def test_module_in_a_transformer_block():
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self, variant: str, **opts):
            super().__init__()
            self.norm = torch.nn.LayerNorm(64)
            self.attn = av.AttentionLayer(64, 4, variant, num_kv_heads=2, causal=True, **opts)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))

        def forward(self, x):
            x = x + self.attn(self.norm(x))
            return x + self.mlp(x)

    x = torch.randn(2, 50, 64)
    for variant, opts in [("full", {}), ("sliding_window", {"window": 8}), ("performer", {"num_features": 32})]:
        block = Block(variant, **opts)
        y = block(x)
        assert y.shape == x.shape
        y.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())

    # The layer computes the documented projections around the variant.
    layer = av.AttentionLayer(64, 4, "full", num_kv_heads=2)
    q = layer.q_proj(x).view(2, 50, 4, 16).transpose(1, 2)
    k = layer.k_proj(x).view(2, 50, 2, 16).transpose(1, 2)
    v = layer.v_proj(x).view(2, 50, 2, 16).transpose(1, 2)
    ref = av.FullAttention().reference(q, k, v).transpose(1, 2).reshape(2, 50, 64)
    assert max_err(layer(x), layer.out_proj(ref)) < 1e-5


def test_module_cross_attention_and_errors():
    layer = av.AttentionLayer(32, 2, "sliding_window", window=4)
    out = layer(torch.randn(1, 10, 32), torch.randn(1, 14, 32))
    assert out.shape == (1, 10, 32)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(10, 32))
    with pytest.raises(ValueError, match="divisible"):
        av.AttentionLayer(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        av.AttentionLayer(32, 4, num_kv_heads=3)
    with pytest.raises(TypeError, match="unknown option"):
        av.AttentionLayer(32, 4, "full", window=3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [2**63 - 1, 2**63, 2**64, (2**70, 3), (1, 2**80)])
def test_window_beyond_int64_is_clamped(window, causal):
    """A reach wider than the sequences sees every key: the same as a window of N, on every CPU
    backend and in flops(), however large the Python int (issue 14)."""
    q, k, v = make_qkv(1, 2, 2, 16, 12, 8, dtype=torch.float64)
    sw = av.SlidingWindowAttention(window)
    wide = av.SlidingWindowAttention(tuple(min(w, 16) for w in window) if isinstance(window, tuple) else 16)
    expected = wide.reference(q, k, v, causal=causal)
    for backend in CPU_BACKENDS:
        assert max_err(sw(q, k, v, causal=causal, backend=backend), expected) < 1e-12
    assert sw.flops(q, k, v, causal=causal) == wide.flops(q, k, v, causal=causal)
    assert int(sw.dense_mask(16, 12, causal).sum()) == int(wide.dense_mask(16, 12, causal).sum())


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize(
    ("variant", "opts"),
    [
        ("full", {}),
        ("sliding_window", {"window": 2}),
        ("sliding_window", {"window": (3, 1), "global_tokens": 1}),
        ("sliding_window", {"window": 2, "global_tokens": [0, 5]}),
        ("sliding_window", {"window": 2, "global_tokens": torch.tensor([True, False] * 4)}),
        ("performer", {"num_features": 8}),
    ],
)
def test_meta_tensors_give_shapes(variant, opts, backend):
    """Meta tensors (shape inference, no data) give a meta output of the right shape and dtype,
    and a backward pass (issue 16)."""
    for causal in (False, True):
        q = torch.empty(2, 4, 8, 16, device="meta", dtype=torch.float16, requires_grad=True)
        k = torch.empty(2, 2, 8, 16, device="meta", dtype=torch.float16)
        v = torch.empty(2, 2, 8, 12, device="meta", dtype=torch.float16)
        out = av.attention(q, k, v, variant, causal=causal, backend=backend, **opts)
        assert out.is_meta and out.shape == (2, 4, 8, 12) and out.dtype == torch.float16
        out.sum().backward()
        assert q.grad is not None and q.grad.shape == q.shape
