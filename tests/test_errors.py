"""Error policy: bad input raises ValueError/TypeError naming the argument; nothing crashes."""

from __future__ import annotations

import re

import pytest
import torch

import attention_variants as av


def qkv(b=1, h=4, hk=2, nq=8, nk=8, d=16, dv=16, dtype=torch.float32):
    return (
        torch.randn(b, h, nq, d, dtype=dtype),
        torch.randn(b, hk, nk, d, dtype=dtype),
        torch.randn(b, hk, nk, dv, dtype=dtype),
    )


def raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=re.escape(pattern) if not pattern.startswith("re:") else pattern[3:]):
        fn(*args, **kwargs)


@pytest.mark.parametrize("variant", ["full", "sliding_window", "performer"])
def test_shape_and_type_errors(variant):
    opts = {"window": 2} if variant == "sliding_window" else {}
    f = av.get_variant(variant, **opts)
    q, k, v = qkv()
    raises(ValueError, "q must have 4 dims", f, q[0], k, v)
    raises(ValueError, "k must have 4 dims", f, q, k[0], v)
    raises(ValueError, "v must have 4 dims", f, q, k, v[None])
    raises(ValueError, "batch sizes differ", f, q, k.expand(2, -1, -1, -1), v)
    raises(ValueError, "same number of heads", f, q, k, v[:, :1])
    raises(ValueError, "multiple of k/v heads", f, q[:, :3], k, v)
    raises(ValueError, "same sequence length", f, q, k, v[:, :, :5])
    raises(ValueError, "same head dim", f, q, k[..., :8], v)
    raises(TypeError, "q must be float16, bfloat16, float32 or float64", f, q.long(), k, v)
    raises(TypeError, "k must be float16", f, q, k.int(), v)
    raises(TypeError, "k has dtype torch.float64 but q has torch.float32", f, q, k.double(), v)
    raises(TypeError, "v must be a torch.Tensor", f, q, k, v.tolist())
    raises(TypeError, "causal must be a bool", f, q, k, v, causal=1)
    raises(TypeError, "scale must be a float", f, q, k, v, scale="0.1")
    raises(ValueError, "scale must be a positive finite", f, q, k, v, scale=-1.0)
    raises(ValueError, "scale must be a positive finite", f, q, k, v, scale=float("nan"))
    raises(ValueError, "unknown backend 'cuda'", f, q, k, v, backend="cuda")
    raises(TypeError, "backend must be a str", f, q, k, v, backend=None)


def test_mixed_devices():
    q, k, v = qkv()
    k = k.to("meta")
    raises(ValueError, "k is on meta but q is on cpu", av.attention, q, k, v)


def test_unknown_variant_and_options():
    q, k, v = qkv()
    raises(
        ValueError,
        "unknown variant 'linear'; variants are full, sliding_window, performer",
        av.attention,
        q,
        k,
        v,
        "linear",
    )
    raises(TypeError, "unknown option(s) window for variant 'full'", av.attention, q, k, v, "full", window=3)
    raises(TypeError, "unknown option(s) foo for variant 'performer'", av.get_variant, "performer", foo=1)
    raises(TypeError, "variant must be a str", av.get_variant, 3)


@pytest.mark.parametrize(
    ("window", "exc", "pattern"),
    [
        (-1, ValueError, "window must be a non-negative int, got -1"),
        (2.5, TypeError, "window must be a non-negative int, got 2.5"),
        (True, TypeError, "window must be a non-negative int, got True"),
        ("4", TypeError, "window must be a non-negative int"),
        ((1, 2, 3), ValueError, "window must be an int or a pair"),
        ((1, -2), ValueError, "window[1] (right) must be a non-negative int, got -2"),
        ((1.0, 2), TypeError, "window[0] (left) must be a non-negative int"),
    ],
)
def test_bad_window(window, exc, pattern):
    raises(exc, pattern, av.SlidingWindowAttention, window)
    q, k, v = qkv()
    raises(exc, pattern, av.attention, q, k, v, "sliding_window", window=window)


def test_bad_global_tokens():
    q, k, v = qkv(nq=8, nk=8)
    raises(
        ValueError, "global_tokens need Nq == Nk, got Nq=8, Nk=9", av.SlidingWindowAttention(2, 1), q, *qkv(nk=9)[1:]
    )
    raises(ValueError, "global_tokens must be a non-negative int, got -1", av.SlidingWindowAttention, 2, -1)
    raises(ValueError, "out of range for sequence length 8", av.SlidingWindowAttention(2, [3, 9]), q, k, v)
    raises(
        ValueError,
        "bool mask has length 5, expected the sequence length 8",
        av.SlidingWindowAttention(2, torch.zeros(5, dtype=torch.bool)),
        q,
        k,
        v,
    )
    raises(ValueError, "must be 1-D", av.SlidingWindowAttention, 2, torch.zeros(2, 2, dtype=torch.bool))
    raises(TypeError, "bool mask or integer positions", av.SlidingWindowAttention, 2, torch.zeros(3))
    raises(ValueError, "positions must be non-negative", av.SlidingWindowAttention, 2, torch.tensor([-1]))


def test_bad_performer_options():
    raises(ValueError, "num_features must be >= 1, got 0", av.PerformerAttention, 0)
    raises(TypeError, "num_features must be an int", av.PerformerAttention, 2.0)
    raises(ValueError, "kernel must be one of softmax, relu, got 'gelu'", av.PerformerAttention, 16, "gelu")
    raises(TypeError, "ortho must be a bool", av.PerformerAttention, 16, ortho=1)
    raises(TypeError, "seed must be an int", av.PerformerAttention, 16, seed="0")
    raises(ValueError, "projection must have shape", av.PerformerAttention, projection=torch.randn(4))
    raises(
        TypeError,
        "projection must be floating point",
        av.PerformerAttention,
        projection=torch.ones(4, 4, dtype=torch.long),
    )
    raises(
        ValueError,
        "num_features=8 disagrees with projection rows (4)",
        av.PerformerAttention,
        8,
        projection=torch.randn(4, 16),
    )
    q, k, v = qkv(d=16)
    raises(
        ValueError,
        "projection has 8 columns but the head dim of q is 16",
        av.PerformerAttention(projection=torch.randn(4, 8)),
        q,
        k,
        v,
    )
    raises(ValueError, "fixed projection", av.PerformerAttention(projection=torch.randn(4, 8)).redraw)


def test_triton_backend_without_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    for variant, opts in [("full", {}), ("sliding_window", {"window": 2}), ("performer", {})]:
        raises(
            ValueError,
            "re:backend='triton' cannot run .*: Triton kernels need a CUDA device, got cpu",
            av.attention,
            q,
            k,
            v,
            variant,
            backend="triton",
            **opts,
        )


def test_triton_backend_without_triton(monkeypatch):
    import attn_kernels.env as kernels

    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setattr(kernels, "_TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    q, k, v = qkv()
    raises(ValueError, "Triton is not importable", av.attention, q, k, v, backend="triton")


def test_reference_and_torch_take_float64():
    q, k, v = qkv(dtype=torch.float64)
    for backend in ("reference", "torch"):
        assert av.attention(q, k, v, backend=backend).dtype == torch.float64


def test_global_token_count_beyond_the_sequence():
    """An int count of global tokens beyond N raises, as a position beyond N does (issue 17)."""
    q, k, v = qkv(nq=16, nk=16)
    sw = av.SlidingWindowAttention(2, 100)
    raises(ValueError, "global_tokens=100 is more than the sequence length 16", sw, q, k, v)
    raises(ValueError, "global_tokens=100 is more than the sequence length 16", sw.flops, q, k, v)
    raises(ValueError, "out of range for sequence length 16", av.SlidingWindowAttention(2, [100]), q, k, v)
    assert av.SlidingWindowAttention(2, 16)(q, k, v).shape == (1, 4, 16, 16)  # every token: still valid


def test_global_tokens_as_meta_tensor():
    raises(ValueError, "global_tokens must hold values", av.SlidingWindowAttention, 2, torch.empty(4, device="meta"))


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_seed_out_of_range_at_construction(seed):
    """A seed torch.Generator cannot take is refused when built, naming seed (issue 18)."""
    raises(
        ValueError,
        f"seed must be an int in [-2**63, 2**64 - 1] (torch.Generator's range), got {seed}",
        av.PerformerAttention,
        16,
        seed=seed,
    )
    raises(ValueError, "seed must be an int in", av.get_variant, "performer", seed=seed)
    raises(ValueError, "seed must be an int in", av.PerformerAttention(16).redraw, seed)
    raises(TypeError, "seed must be an int", av.PerformerAttention(16).redraw, "1")


def test_seed_extremes_still_work():
    q, k, v = qkv(d=16)
    for seed in (2**64 - 1, -(2**63)):
        assert torch.isfinite(av.PerformerAttention(8, seed=seed)(q, k, v)).all()
    raises(ValueError, "seed must be an int in", av.PerformerAttention(8, seed=2**64 - 1).redraw)


def test_num_features_bounded(monkeypatch):
    """More features than can be drawn and held is refused at once, naming num_features (issue 19)."""
    from attention_variants import performer

    raises(ValueError, "num_features must be at most 1048576 (2**20), got 100000000", av.PerformerAttention, 10**8)
    assert av.PerformerAttention(2**20).num_features == 2**20
    # The float64 projection m * D * 8 bytes must fit in memory: checked before the draw.
    monkeypatch.setattr(performer, "_host_memory", lambda: 2**30)
    monkeypatch.setattr(performer, "draw_projection", lambda *a, **kw: pytest.fail("drew the projection"))
    q, k, v = qkv(d=256)
    raises(
        ValueError,
        "num_features=1048576 with head dim 256 needs a 2.0 GiB float64 projection, more than this machine's 1.0 GiB",
        av.PerformerAttention(2**20),
        q,
        k,
        v,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks about CUDA where there is none")
def test_triton_on_cuda_without_cuda_is_a_reason():
    """Without CUDA, whether the Triton backend runs on "cuda" is False with a reason, not a crash
    in the capability query."""
    for variant in (av.SlidingWindowAttention(window=16), av.PerformerAttention(num_features=16)):
        assert variant.supports("triton", "cuda", torch.bfloat16, 128) is False
        assert "CUDA" in variant.unsupported_reason("triton", "cuda", torch.bfloat16, 128)
