"""Tolerance policy shared by every numerics test.

FlashAttention's criterion: compared with a float64 reference, a backend's max error is at
most ``factor`` times the error of the naive PyTorch computation in the same dtype, plus a
small floor ``atol`` (``factor`` 2 for outputs, 3 for gradients). fla's RMS criterion is
checked as well: ``rms(out - ref) <= ratio * rms(ref) + atol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attention_variants import AttentionVariant
from bench.numerics import ATOL, BWD_FACTOR, FWD_FACTOR, run_with_grads  # one tolerance policy: the harness's gate

# Relative RMS ceiling, per dtype.
RMS_RATIO = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


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


def assert_close(name: str, out: Tensor, ref: Tensor, pts: list[Tensor], dtype: torch.dtype, factor: float) -> None:
    """``out`` (backend) against the float64 ``ref``, bounded by the PyTorch baselines ``pts``.

    The baseline error is the largest finite one among ``pts`` (a naive computation that
    overflows in float16 gives no bound, so the float32-accumulated one is used instead).
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref)
    pt_errs = [max_err(pt, ref) for pt in pts if torch.isfinite(pt).all()]
    assert pt_errs, f"{name}: no finite PyTorch baseline"
    pt_err = max(pt_errs)
    bound = factor * pt_err + ATOL[dtype]
    assert err <= bound, f"{name}: max err {err:.3g} > {factor} * pytorch err {pt_err:.3g} + {ATOL[dtype]:.1g}"
    diff_rms, ref_rms = rms(out.double() - ref.double()), rms(ref)
    assert diff_rms <= RMS_RATIO[dtype] * ref_rms + ATOL[dtype], (
        f"{name}: rms err {diff_rms:.3g} > {RMS_RATIO[dtype]:.1g} * rms(ref) {ref_rms:.3g} + {ATOL[dtype]:.1g}"
    )


@dataclass
class Run:
    out: Tensor
    grads: tuple[Tensor, Tensor, Tensor] | None


def run(fn, q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None) -> Run:
    out, grads = run_with_grads(fn, q, k, v, dout)
    return Run(out, grads)  # type: ignore[arg-type]


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
    fwd_factor: float = FWD_FACTOR,
    bwd_factor: float = BWD_FACTOR,
) -> None:
    """Compare ``variant(..., backend=backend)`` with the float64 reference, output and gradients.

    ``q, k, v`` are in the dtype under test. The same-dtype PyTorch baselines are the dense
    computation on the same inputs without and with float32 accumulation (``variant.dense``).
    """
    dtype = q.dtype
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=dtype, device=q.device) if grad else None

    ours = run(lambda a, b, c: variant(a, b, c, causal=causal, scale=scale, backend=backend), q, k, v, dout)
    ref = run(
        lambda a, b, c: variant(a, b, c, causal=causal, scale=scale, backend="reference"),
        q.double(),
        k.double(),
        v.double(),
        None if dout is None else dout.double(),
    )
    # PyTorch in the same dtype: naive (no upcast) and float32-accumulated, both on these inputs.
    pts = [
        run(lambda a, b, c, up=up: variant.dense(a, b, c, causal, sc, upcast=up), q, k, v, dout) for up in (False, True)
    ]
    assert ours.out.dtype == dtype
    assert_close("out", ours.out, ref.out, [p.out for p in pts], dtype, fwd_factor)
    if grad:
        assert ours.grads is not None and ref.grads is not None
        for i, name in enumerate(("dq", "dk", "dv")):
            assert_close(name, ours.grads[i], ref.grads[i], [p.grads[i] for p in pts if p.grads], dtype, bwd_factor)
