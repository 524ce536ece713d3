"""FAVOR+ Triton kernels on a CUDA device at real sizes (run with ``-m gpu``; skipped without CUDA).

- moderate lengths: forward and backward against the float64 dense reference, every dtype
  including bfloat16, causal and not, GQA, relu (the implementation the backend uses, the chunked
  kernels; the legacy kernels on a subset);
- long sequences (to 64k tokens): forward against the float64 ``torch`` backend (linear memory),
  finite gradients, peak memory far below one ``N x m x Dv`` tensor, time linear in N.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_backend, favor_impl, make_qkv

import attention_variants as av

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize(
    ("b", "h", "hk", "n", "d", "m", "causal", "kernel"),
    [
        (2, 8, 8, 1024, 64, 256, False, "softmax"),
        (2, 8, 8, 1024, 64, 256, True, "softmax"),
        (1, 8, 2, 2000, 128, 256, True, "softmax"),
        (1, 4, 4, 1537, 40, 64, False, "softmax"),
        (1, 4, 1, 1024, 64, 128, True, "relu"),
    ],
    ids=lambda x: str(x),
)
def test_matches_reference(b, h, hk, n, d, m, causal, kernel, dtype) -> None:
    variant = av.PerformerAttention(num_features=m, kernel=kernel)
    q, k, v = make_qkv(b, h, hk, n, n, d, dtype=dtype, device="cuda")
    check_backend(variant, "triton", q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_legacy_kernels_match_reference(causal: bool, dtype: torch.dtype) -> None:
    """The legacy FAVOR+ kernels, which the tuner's ``favor_impl`` switch may still pick."""
    variant = av.PerformerAttention(num_features=256)
    q, k, v = make_qkv(1, 8, 2, 2000, 128, dtype=dtype, device="cuda")
    with favor_impl("legacy"):
        check_backend(variant, "triton", q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("n", [16384, 65536], ids=lambda n: f"N{n}")
def test_long_sequences(n: int, causal: bool) -> None:
    b, h, d, m = 1, 4, 64, 256
    variant = av.PerformerAttention(num_features=m)
    q, k, v = make_qkv(b, h, h, n, n, d, dtype=torch.bfloat16, device="cuda")
    ref = variant(q.double(), k.double(), v.double(), causal=causal, backend="torch")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = variant(q, k, v, causal=causal, backend="triton")
    torch.cuda.synchronize()
    peak_fwd = torch.cuda.max_memory_allocated() - base
    err = (out.double() - ref).abs().max().item()
    assert err < 3e-2 * ref.abs().max().item(), f"max err {err:.3g}"
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    # One N x m x Dv float32 tensor per head would be n * m * d * 4 bytes; we stay far below.
    one_nmd = b * h * n * m * d * 4
    assert peak_fwd < one_nmd / 8, f"forward peak {peak_fwd / 2**20:.0f} MiB"


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_time_is_linear_in_n(causal: bool) -> None:
    from triton.testing import do_bench

    variant = av.PerformerAttention(num_features=256)
    times = {}
    for n in (8192, 32768):
        q, k, v = make_qkv(1, 8, 8, n, n, 64, dtype=torch.bfloat16, device="cuda")
        variant(q, k, v, causal=causal, backend="triton")  # autotune outside the timing
        times[n] = do_bench(lambda q=q, k=k, v=v: variant(q, k, v, causal=causal, backend="triton"))
    assert times[32768] < 6 * times[8192], times


def _every_config() -> list:
    from attn_kernels import favor_configs

    return [
        pytest.param(name, cfg, id=f"{name}-{cfg.name}") for name, cfgs in favor_configs.CONFIGS.items() for cfg in cfgs
    ]


def _relative_errors(variant, causal: bool, dtype: torch.dtype) -> dict[str, float]:
    """Relative Frobenius errors of the output and gradients against the float64 ``torch`` backend."""
    b, h, n, d = 1, 4, 1024, 64
    q, k, v = make_qkv(b, h, h, n, n, d, dtype=dtype, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = variant(q, k, v, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = variant(qd, kd, vd, causal=causal, backend="torch")
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    names = ("out", "dq", "dk", "dv")
    return {
        name: ((x.double() - r).norm() / r.norm()).item()
        for name, x, r in zip(names, (out, *grads), (ref, *ref_grads), strict=True)
    }


def _every_chunk_config() -> list:
    from attn_kernels import favor_chunk_configs

    return [
        pytest.param(name, cfg, id=f"{name}-{cfg.name}")
        for name, cfgs in favor_chunk_configs.CONFIGS.items()
        for cfg in cfgs
    ]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("kernel", "cfg"), _every_chunk_config())
def test_every_chunk_config(kernel: str, cfg, causal: bool) -> None:
    """Each candidate config of a chunked FAVOR+ kernel alone (the others at their defaults),
    bfloat16, forward and backward, against the float64 ``torch`` backend: the tuner may pick any."""
    from attn_kernels import favor_chunk_configs, tuning
    from attn_kernels.launch import LaunchShape

    shape = LaunchShape(64, 2, causal, m_pad=256)
    if cfg not in favor_chunk_configs.candidates(kernel, shape):
        pytest.skip(f"{cfg.name} is not a candidate for {shape}")
    with tuning.forced({"favor_" + kernel: cfg}):
        errors = _relative_errors(av.PerformerAttention(num_features=256), causal, torch.bfloat16)
    for name, rel in errors.items():
        assert rel < 1e-2, f"{name}: relative error {rel:.3g} (tolerance 1e-2)"


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize(("kernel", "cfg"), _every_config())
def test_every_config(kernel: str, cfg, dtype: torch.dtype, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shipped launch config of the legacy kernels alone (the others at their first kept one),
    forward and backward, against the float64 ``torch`` backend: the autotuner may pick any of them,
    and a miscompiled config (seen: out-of-bounds shared-memory reads, garbage gradients) must not ship."""
    from attn_kernels import favor, favor_configs
    from attn_kernels.launch import LaunchShape

    d, m = 64, 256  # the problem of _relative_errors
    shape = LaunchShape(d, dtype.itemsize, causal, m_pad=m)
    if not favor_configs.keep(kernel, cfg, shape):
        pytest.skip(f"{cfg.name} is not kept for {shape}")
    real = favor.kept_configs
    monkeypatch.setattr(favor, "kept_configs", lambda name, shp: [cfg] if name == kernel else real(name, shp)[:1])
    with favor_impl("legacy"):
        errors = _relative_errors(av.PerformerAttention(num_features=m), causal, dtype)
    # Relative Frobenius error; measured on an H200: about 2e-3 (bf16) and 1e-6 (fp32) for good configs.
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for name, rel in errors.items():
        assert rel < tol, f"{name}: relative error {rel:.3g} (tolerance {tol:g})"
