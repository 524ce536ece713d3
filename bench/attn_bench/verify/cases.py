"""The cases of ``attn-bench verify`` (every variant x backend x dtype on a few shapes, quick or
full) and one case run through the numerics gate, forward and gradients."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import attention_variants as av
from attn_bench.baselines.registry import make_target, unsupported_reason
from attn_bench.baselines.target import Unsupported
from attn_bench.core.numerics import CheckResult, check_target

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


def verify_variants(names: list[str] | None = None) -> list[tuple[str, dict]]:
    """``(variant, options)`` pairs verify checks: each variant's declared ``verify_options``."""
    return [
        (name, opts)
        for name in av.list_variants()
        if not names or name in names
        for opts in av.variant_class(name).verify_options
    ]


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
    grid = itertools.product(shapes, dtypes, verify_variants(variants), backends, (False, True))
    for shape, dtype, (name, opts), backend, causal in grid:
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
        try:
            variant.check_call(q, k, v, case.causal)
        except ValueError as exc:  # the variant does not define this call (e.g. it needs Nq == Nk)
            return VerifyResult(case, "unsupported", "", None, f"the variant refuses this shape: {exc}")
        target = make_target(variant, case.backend, q, k, v, case.causal)
        # FlexAttention has no CPU backward: check its forward only there.
        want_grads = grads and not (case.backend == "flex" and dev.type == "cpu")
        res = check_target(target, q, k, v, case.causal, grads=want_grads, approx=False)
    except Unsupported as exc:
        return VerifyResult(case, "unsupported", "", None, str(exc))
    except Exception as exc:
        return VerifyResult(case, "error", "", None, f"{type(exc).__name__}: {exc}")
    return VerifyResult(case, "ok" if res.ok else "wrong", target.backend_used, res, res.message)
