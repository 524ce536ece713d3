"""The numerics gate: one backend's output (and gradients) against the float64 reference.

Shared by ``attn-bench verify`` and by every sweep row (measured before timing; a row that
fails gets ``status=wrong`` and no speed figures).

Criterion (FlashAttention's): ``max|out - ref64| <= factor * max|pt - ref64| + atol[dtype]``,
where ``pt`` is the naive dense PyTorch computation of the same variant on the same inputs
in the same dtype (with and without float32 accumulation; the larger finite error counts).
``factor`` is 2 for outputs and 3 for gradients.

Long sequences: the float64 reference needs ``B*H*rows*Nk`` elements. When the whole problem
does not fit in ``check_elems``, only the *last* ``rows`` queries are checked: with
bottom-right alignment the last rows of ``attention(q, k, v)`` equal
``attention(q[..., -rows:, :], k, v)``, so the slice is checked exactly (gradients are then
not checked, since dk and dv depend on every query).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

import attention_variants as av

from .baselines import Target, Unsupported, make_target, unsupported_reason

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
FWD_FACTOR = 2.0
BWD_FACTOR = 3.0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    max_err: float | None  # output, over the checked rows
    bound: float | None
    grad_err: float | None = None  # max over dq, dk, dv (None when not checked)
    grad_bound: float | None = None
    approx_err: float | None = None  # Performer output against exact softmax attention (float64)
    rows: int = 0  # query rows checked
    message: str = ""


def _max_abs(x: Tensor, ref: Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def run_with_grads(
    fn, q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """``fn(q, k, v)`` and, when ``dout`` is given, the gradients of q, k, v (zeros where unused)."""
    if dout is None:
        with torch.no_grad():
            return fn(q, k, v), None
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v), strict=True))
    return out.detach(), grads


def _bound(errs: list[float], factor: float, dtype: torch.dtype) -> float:
    finite = [e for e in errs if math.isfinite(e)]
    return factor * (max(finite) if finite else 0.0) + ATOL[dtype]


def check_target(
    target: Target,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    *,
    grads: bool = False,
    check_elems: int = 1 << 26,
    approx: bool = True,
) -> CheckResult:
    """Check ``target.fn`` on ``q, k, v`` against ``target.truth``'s float64 reference."""
    dtype = q.dtype
    nq, nk = q.shape[2], k.shape[2]
    bh = q.shape[0] * q.shape[1]
    rows = min(nq, max(1, check_elems // max(1, bh * nk)))
    truth = target.truth
    if rows < nq and getattr(truth, "global_tokens", None) not in (None, 0):
        return CheckResult(True, None, None, message="not checked: too long for the reference, and global tokens")
    grads = grads and rows == nq
    scale = q.shape[-1] ** -0.5
    gen = torch.Generator(device="cpu").manual_seed(1234)
    dout = torch.randn(q.shape[0], q.shape[1], nq, v.shape[-1], generator=gen).to(q.device, dtype) if grads else None

    out, g = run_with_grads(target.fn, q, k, v, dout)
    out_rows = out[:, :, nq - rows :]
    qs = q[:, :, nq - rows :]

    def ref_fn(a, b, c):
        return truth.reference(a, b, c, causal=causal)

    ref, ref_g = run_with_grads(ref_fn, qs.double(), k.double(), v.double(), None if dout is None else dout.double())
    pts = [
        run_with_grads(lambda a, b, c, up=up: truth.dense(a, b, c, causal, scale, upcast=up), qs, k, v, dout)
        for up in (False, True)
    ]

    approx_err = None
    if approx and truth.name == "performer":
        with torch.no_grad():
            exact = av.FullAttention().reference(qs.double(), k.double(), v.double(), causal=causal)
        approx_err = _max_abs(out_rows, exact)

    if not torch.isfinite(out_rows).all():
        return CheckResult(False, float("nan"), None, approx_err=approx_err, rows=rows, message="non-finite output")
    err = _max_abs(out_rows, ref)
    bound = _bound([_max_abs(p[0], ref) for p in pts], FWD_FACTOR, dtype)
    ok = err <= bound
    message = "" if ok else f"max err {err:.3g} > bound {bound:.3g} ({FWD_FACTOR:g} x same-dtype PyTorch err + atol)"
    grad_err = grad_bound = None
    if grads:
        assert g is not None and ref_g is not None
        grad_err, grad_bound = -1.0, 0.0
        for i, name in enumerate(("dq", "dk", "dv")):
            if not torch.isfinite(g[i]).all():
                ok, message = False, f"non-finite {name}"
                grad_err = float("nan")
                break
            e = _max_abs(g[i], ref_g[i])
            b = _bound([_max_abs(p[1][i], ref_g[i]) for p in pts if p[1] is not None], BWD_FACTOR, dtype)
            if e > grad_err:  # report the worst gradient and its own bound
                grad_err, grad_bound = e, b
            if e > b and ok:
                ok, message = False, f"{name} max err {e:.3g} > bound {b:.3g}"
    if rows < nq:
        message = message or f"checked the last {rows} of {nq} query rows (forward only)"
    return CheckResult(ok, err, bound, grad_err, grad_bound, approx_err, rows, message)


# ---------------------------------------------------------------------------------------------
# attn-bench verify: every variant x backend on fresh random inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyCase:
    variant: str
    options: tuple[tuple[str, object], ...]
    backend: str
    dtype: str
    batch: int
    heads: int
    kv_heads: int
    nq: int
    nk: int
    head_dim: int
    causal: bool

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        kv = f"-Hk{self.kv_heads}" if self.kv_heads != self.heads else ""
        n = f"N{self.nq}" if self.nq == self.nk else f"Nq{self.nq}-Nk{self.nk}"
        shape = f"B{self.batch}-H{self.heads}{kv}-{n}-D{self.head_dim}" + ("-causal" if self.causal else "")
        return f"{self.variant}({opts})" if opts else self.variant, shape


VERIFY_VARIANTS: tuple[tuple[str, dict], ...] = (
    ("full", {}),
    ("sliding_window", {"window": (5, 3)}),
    ("sliding_window", {"window": 16, "global_tokens": 2}),
    ("performer", {"num_features": 64}),
)
# (B, H, Hk, Nq, Nk, D)
VERIFY_SHAPES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (2, 4, 2, 113, 113, 64),
    (1, 2, 2, 17, 203, 40),
    (1, 2, 1, 257, 257, 128),
)


def verify_cases(
    backends: list[str], dtypes: list[str], quick: bool = False, variants: list[str] | None = None
) -> list[VerifyCase]:
    shapes = VERIFY_SHAPES[:1] if quick else VERIFY_SHAPES
    cases = []
    # Shape-major: a run stopped early (a time box) has covered every variant, backend and dtype once.
    grid = itertools.product(shapes, dtypes, VERIFY_VARIANTS, backends, (False, True))
    for shape, dtype, (name, opts), backend, causal in grid:
        if variants and name not in variants:
            continue
        b, h, hk, nq, nk, d = shape
        if "global_tokens" in opts and nq != nk:
            continue
        cases.append(VerifyCase(name, tuple(opts.items()), backend, dtype, b, h, hk, nq, nk, d, causal))
    return cases


@dataclass(frozen=True)
class VerifyResult:
    case: VerifyCase
    status: str  # ok / wrong / unsupported / error
    backend_used: str
    check: CheckResult | None
    message: str


def run_case(case: VerifyCase, device: str = "cpu", seed: int = 0, grads: bool = True) -> VerifyResult:
    """Fresh random inputs for ``case``; its backend against the float64 reference."""
    dtype = getattr(torch, case.dtype)
    dev = torch.device(device)
    try:
        variant = av.get_variant(case.variant, **dict(case.options))
        reason = unsupported_reason(variant, case.backend, dev, dtype, case.head_dim)
        if reason is not None:
            return VerifyResult(case, "unsupported", "", None, reason)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(case.batch, case.heads, case.nq, case.head_dim, generator=gen).to(dev, dtype)
        k = torch.randn(case.batch, case.kv_heads, case.nk, case.head_dim, generator=gen).to(dev, dtype)
        v = torch.randn(case.batch, case.kv_heads, case.nk, case.head_dim, generator=gen).to(dev, dtype)
        target = make_target(variant, case.backend, q, k, v, case.causal)
        # FlexAttention has no CPU backward: check its forward only there.
        want_grads = grads and not (case.backend == "flex" and dev.type == "cpu")
        res = check_target(target, q, k, v, case.causal, grads=want_grads, approx=False)
    except Unsupported as exc:
        return VerifyResult(case, "unsupported", "", None, str(exc))
    except Exception as exc:
        return VerifyResult(case, "error", "", None, f"{type(exc).__name__}: {exc}")
    return VerifyResult(case, "ok" if res.ok else "wrong", target.backend_used, res, res.message)
