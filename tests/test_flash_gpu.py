"""The fused softmax kernels on a CUDA device at real sizes (``pytest -m gpu``).

Skipped cleanly without CUDA (``conftest.py``). Covers what the interpreter cannot: bfloat16,
long sequences, the shipped launch configurations, run-to-run determinism and offsets beyond
2^31 elements.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_backend, make_qkv, shape_id

import attention_variants as av

pytestmark = pytest.mark.gpu

DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]
CAUSAL = [pytest.param(False, id="noncausal"), pytest.param(True, id="causal")]

SHAPES = [
    (2, 8, 8, 1024, 1024, 64),
    (1, 8, 2, 1000, 3000, 128),
    (1, 4, 4, 4096, 4096, 80),
    (2, 4, 4, 2048, 2048, 96),
    (1, 4, 2, 777, 777, 40),
    (1, 2, 1, 4096, 4096, 256),
    (1, 1, 1, 16384, 16384, 64),
]


def _sid(shape) -> str:
    b, h, hk, nq, nk, d = shape
    return shape_id(b, h, hk, nq, nk, d, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_full_gpu(shape, causal: bool, dtype: torch.dtype) -> None:
    b, h, hk, nq, nk, d = shape
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype, device="cuda")
    check_backend(av.FullAttention(), "triton", q, k, v, causal=causal)


WINDOWS = [
    pytest.param(dict(window=256), id="W256"),
    pytest.param(dict(window=(100, 30)), id="W100-30"),
    pytest.param(dict(window=128, global_tokens=16), id="W128-G16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("opts", WINDOWS)
@pytest.mark.parametrize("shape", [(1, 4, 2, 4096, 4096, 64), (1, 2, 2, 16384, 16384, 128)], ids=_sid)
def test_sliding_window_gpu(shape, opts, causal: bool, dtype: torch.dtype) -> None:
    b, h, hk, nq, nk, d = shape
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype, device="cuda")
    check_backend(av.SlidingWindowAttention(**opts), "triton", q, k, v, causal=causal)


@pytest.mark.parametrize("variant", [av.FullAttention(), av.SlidingWindowAttention(window=64, global_tokens=3)])
def test_forward_is_deterministic(variant) -> None:
    q, k, v = make_qkv(2, 8, 4, 3000, 3000, 64, dtype=torch.bfloat16, device="cuda")
    first = variant(q, k, v, causal=True, backend="triton")
    for _ in range(3):
        assert torch.equal(variant(q, k, v, causal=True, backend="triton"), first)


def test_large_offsets_do_not_overflow() -> None:
    """B * H * N * D > 2^31 elements: the last (batch, head) slice must still be right."""
    b, h, n, d = 128, 16, 8192 + 256, 128  # 2^31 + 2^26 elements per tensor (4.4 GB in bfloat16)
    assert b * h * n * d > 2**31
    q, k, v = make_qkv(b, h, h, n, n, d, dtype=torch.bfloat16, device="cuda")
    q.requires_grad_(True)
    k.requires_grad_(True)
    variant = av.SlidingWindowAttention(window=64)
    out = variant(q, k, v, causal=True, backend="triton")
    dout = torch.randn_like(out)
    gq, gk = torch.autograd.grad(out, (q, k), dout)
    qs, ks, vs = (t[-1:, -1:].detach().float().requires_grad_(True) for t in (q, k, v))
    ref = variant(qs, ks, vs, causal=True, backend="reference")
    rgq, rgk = torch.autograd.grad(ref, (qs, ks), dout[-1:, -1:].float())
    torch.testing.assert_close(out[-1:, -1:].float(), ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gq[-1:, -1:].float(), rgq, atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(gk[-1:, -1:].float(), rgk, atol=6e-2, rtol=6e-2)


def _candidate_params() -> list:
    """The sm_90 softmax configs ``attn-bench tune`` would time on this GPU at D=128 in 16 bits
    (TMA forwards, split and atomic backwards; the others run in the tests above)."""
    from attn_kernels import flash_configs
    from attn_kernels.launch import LaunchShape

    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    out = []
    for window in (None, 129):
        shape = LaunchShape(128, 2, True, n=2048, window=window)
        for backward in (False, True):
            for cfg in flash_configs.tune_candidates(shape, backward, cap):
                if not (cfg.tma or cfg.bwd):
                    continue
                kernel = "flash_bwd" if backward else "flash_fwd"
                out.append(pytest.param(kernel, cfg, window, id=f"{kernel}-{cfg}-w{window}"))
    return out


@pytest.mark.parametrize(("kernel", "cfg", "window"), _candidate_params())
def test_every_candidate_config(kernel: str, cfg, window: int | None) -> None:
    """Each config alone (the other kernel at its default), bfloat16, against float64."""
    from attn_kernels import tuning

    variant = av.FullAttention() if window is None else av.SlidingWindowAttention(window=128, global_tokens=5)
    q, k, v = make_qkv(1, 4, 2, 1500, 1500, 128, dtype=torch.bfloat16, device="cuda")
    with tuning.forced({kernel: cfg}) as seen:
        check_backend(variant, "triton", q, k, v, causal=True)
    assert kernel in {name for name, _ in seen}


def test_default_backward_is_deterministic() -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 8, 4, 3000, 3000, 128, dtype=torch.bfloat16, device="cuda"))
    out = av.FullAttention()(q, k, v, causal=True, backend="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize(
    "variant",
    [av.FullAttention(), av.SlidingWindowAttention(window=64, global_tokens=[0, 300])],
    ids=["full", "window-global"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_launches_match_the_reference(variant, dtype: torch.dtype) -> None:
    """After the first call of a shape, forward and backward launch the cached compiled kernels
    directly (no JIT binder): each later call, on fresh inputs, still matches the float64
    reference, output and gradients; and the handles were made (so the direct path is what ran)."""
    import attn_kernels.flash_attention as flash

    flash._FWD_PLANS.clear()
    flash._BWD_PLANS.clear()
    for _ in range(3):
        q, k, v = make_qkv(1, 4, 2, 1000, 1000, 128, dtype=dtype, device="cuda")
        check_backend(variant, "triton", q, k, v, causal=True)  # output and gradients
    if flash.direct_launch_enabled():
        assert any(one.handle is not None for plan in flash._FWD_PLANS.values() for one in plan.launches)
        assert any(one.handle is not None for plan in flash._BWD_PLANS.values() for one in plan.dkdv)
