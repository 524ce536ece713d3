"""The one table of baseline backends (:func:`register_baseline`) and the dispatch from a backend
name (registry backend or baseline) to what it computes (:func:`make_target`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import attention_variants as av
from attn_bench.baselines.target import Fn, Target, Unsupported

BaselineCheck = Callable[[av.AttentionVariant, torch.device, torch.dtype, int, bool], "str | None"]

BaselineMake = Callable[[av.AttentionVariant, Tensor, Tensor, bool], Fn]


@dataclass(frozen=True)
class Baseline:
    """A baseline backend: ``check(variant, device, dtype, head_dim, needs_grad)`` and ``make(variant,
    q, k, causal) -> fn``. ``exact``: it computes the exact variant (an approximation's baseline rows
    are copies of its exact variant's rows)."""

    name: str
    check: BaselineCheck
    make: Callable[..., Target]
    description: str
    exact: bool = True


_BASELINES: dict[str, Baseline] = {}


def register_baseline(baseline: Baseline) -> Baseline:
    if baseline.name in _BASELINES or baseline.name in (*av.list_backends(), "auto"):
        raise ValueError(f"backend name {baseline.name!r} is already taken")
    _BASELINES[baseline.name] = baseline
    return baseline


def baseline_names() -> list[str]:
    """Registered baselines and peers, in registration order."""
    return list(_BASELINES)


def get_baseline(name: str) -> Baseline | None:
    return _BASELINES.get(name)


def exact_baselines() -> set[str]:
    return {b.name for b in _BASELINES.values() if b.exact}


def unsupported_reason(
    variant: av.AttentionVariant,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    needs_grad: bool = False,
) -> str | None:
    """None if ``backend`` (registry or baseline) can run ``variant`` here, else why not."""
    baseline = get_baseline(backend)
    if baseline is not None:
        return baseline.check(variant, device, dtype, head_dim, needs_grad)
    return variant.unsupported_reason(backend, device, dtype, head_dim)


def make_target(variant: av.AttentionVariant, backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Target:
    """The callable ``fn(q, k, v) -> out`` of ``backend`` for ``variant`` and these input shapes."""
    head_dim = max(q.shape[-1], v.shape[-1])
    reason = unsupported_reason(variant, backend, q.device, q.dtype, head_dim, needs_grad=q.requires_grad)
    if reason is not None:
        raise Unsupported(reason)
    baseline = get_baseline(backend)
    if baseline is not None:
        return baseline.make(variant, q, k, v, causal)
    used = variant.resolve_backend(backend, q, v)
    fn = lambda a, b, c: variant(a, b, c, causal=causal, backend=used)
    return Target(fn, variant, used, used == "reference")


def dense_bytes(
    variant: av.AttentionVariant, backend: str, batch: int, heads: int, n: int, elem: int, grad: bool
) -> int:
    """Rough bytes of the N x N tensors a dense backend builds (0 for the ones that do not).

    ``reference``: scores, probabilities and a mask per (batch, head), twice with autograd.
    ``sdpa`` with a mask: the bool mask, which the CPU kernel also converts once to a float
    additive mask (shared by all heads; measured), plus its gradient-path copy.
    """
    if backend == "reference":
        per = batch * heads * n * n * max(elem, 4) * 3
        return per * (2 if grad else 1)
    if backend == "sdpa" and variant.exact().softmax:
        mod = variant.exact().mask_mod(n, n, False)
        if mod is not None:
            return n * n * (1 + 4 + (4 if grad else 0))
    return 0
