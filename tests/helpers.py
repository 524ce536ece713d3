"""Helpers of the numerics tests. The tolerance policy is the harness's own checker
(:mod:`attn_bench.core.numerics`): against a float64 ground truth, a backend's max error is at most
``factor`` times the error of a naive computation in the same dtype plus ``atol`` (``factor`` 2
for outputs, 3 for gradients), and fla's RMS criterion holds."""

from __future__ import annotations

import torch
from torch import Tensor

from attention_variants import AttentionVariant
from attn_bench.core.numerics import check


def shape_id(b: int, h: int, hk: int, nq: int, nk: int, d: int, causal: bool) -> str:
    kv = f"-Hk{hk}" if hk != h else ""
    n = f"N{nq}" if nq == nk else f"Nq{nq}-Nk{nk}"
    return f"B{b}-H{h}{kv}-{n}-D{d}" + ("-causal" if causal else "")


def make_qkv(
    b: int, h: int, hk: int, nq: int, nk: int, d: int, dv: int | None = None, *, dtype=torch.float32, device="cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    dv = d if dv is None else dv
    q = torch.randn(b, h, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, hk, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hk, nk, dv, device=device, dtype=dtype)
    return q, k, v


def max_err(x: Tensor, ref: Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def rms(x: Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item() if x.numel() else 0.0


def check_backend(
    variant: AttentionVariant,
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    grad: bool = True,
    key_padding_mask: Tensor | None = None,
) -> None:
    """``variant(..., backend=backend)`` against the float64 ground truth, output and gradients,
    through the harness's own checker (:func:`attn_bench.core.numerics.check`); ``q, k, v`` in the dtype
    under test; ``key_padding_mask (B, Nk)`` is passed to the backend and applied by the ground
    truth on its own."""

    def fn(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        out = variant(a, b, c, causal=causal, scale=scale, backend=backend, key_padding_mask=key_padding_mask)
        assert out.dtype == a.dtype and out.shape == (*a.shape[:3], c.shape[-1])
        return out

    res = check(fn, variant, q, k, v, causal, scale=scale, grads=grad, approx=False, key_padding_mask=key_padding_mask)
    assert res.ok, f"{variant!r} {backend}: {res.message}"


def favor_impl(name: str):
    """Within the block, the Triton Performer runs implementation ``name`` (``"chunk"``, the
    default, or ``"legacy"``), as the tuner times them."""
    from attn_kernels import tuning

    return tuning.forced({"favor_impl": tuning.ImplChoice(name)})


def tiny_configs(*lengths: int):
    """Harness tests: one-head, D=16 ``full``/``torch`` configs at these lengths."""
    from attn_bench.core.config import BenchConfig

    return [BenchConfig("full", "torch", n, heads=1, kv_heads=1, head_dim=16) for n in lengths]


def ok_result(cfg):
    """Harness tests: a made-up ``ok`` row of ``cfg``."""
    from attn_bench.core.config import BenchResult

    return BenchResult(cfg, "ok", backend_used="torch", time_ms=1.0, time_ms_p10=0.9, time_ms_p90=1.1, elapsed_s=0.5)


def aot_release() -> str:
    """``"3.6"`` under Triton 3.6 and older (the GPU machines' release), ``"newer"`` otherwise: the
    compile tests' spill bounds differ by release (ptxas 12.8 against 13.x)."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return "3.6" if (major, minor) <= (3, 6) else "newer"
