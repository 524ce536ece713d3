"""Callables for every backend a sweep can name: the project's registry backends and the baselines.

- ``reference`` / ``torch`` / ``triton`` / ``auto`` (and a plug-in's own backends): the variant
  itself, through the registry.
- Baselines compute the *exact* computation a variant stands for (``variant.exact()``: itself,
  or for the Performer the full softmax attention it approximates), with the variant's mask
  predicate (``variant.mask_mod``):
  - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the dense problem, with the
    dense mask (``is_causal`` when the mask is plain causal);
  - ``flex``: ``torch.compile``-d FlexAttention with the block mask of the same predicate.
    Compiled kernels and block masks are cached per shape in the process.
- Peers (other libraries, :mod:`attn_bench.peers`) register here too, with their own checks.

A baseline is registered with :func:`register_baseline`: a ``check`` (None when it can run a
variant here, else why not) and a ``make`` that builds ``fn(q, k, v) -> out``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import attention_variants as av
from attention_variants import masks

Fn = Callable[[Tensor, Tensor, Tensor], Tensor]
BaselineCheck = Callable[[av.AttentionVariant, torch.device, torch.dtype, int, bool], "str | None"]
BaselineMake = Callable[[av.AttentionVariant, Tensor, Tensor, bool], Fn]


class Unsupported(Exception):
    """The backend cannot run this configuration here (the message says why)."""


@dataclass(frozen=True)
class Target:
    """What a backend computes for a variant: the callable, the variant whose math it computes
    (``truth``: its float64 ground truth is what ``max_err`` is measured against), the backend that
    actually runs, whether it materialises N x N (scores or mask), and a note on its semantics
    (a peer's documented deviation, recorded with the row)."""

    fn: Fn
    truth: av.AttentionVariant
    backend_used: str
    builds_dense: bool
    note: str = ""
    ground_truth: Fn | None = None
    """float64 ground truth of ``fn`` on the full inputs, when it is not the truth variant's own (a
    peer whose documented semantics differ, e.g. performer-pytorch's epsilons). The checker then
    measures, and reports, how far that ground truth is from the truth variant's."""


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
    _load_peers()
    return list(_BASELINES)


def get_baseline(name: str) -> Baseline | None:
    _load_peers()
    return _BASELINES.get(name)


_PEERS_LOADED: list[bool] = []


def _load_peers() -> None:
    """Register every peer library of :mod:`attn_bench.peers` as a baseline (once)."""
    if _PEERS_LOADED:
        return
    _PEERS_LOADED.append(True)
    from .peers import PEERS

    for peer in PEERS.values():
        kind = "same semantics" if peer.exact else "documented deviation, measured"
        what = f"peer {peer.module} ({', '.join(peer.variants)}; {'/'.join(peer.devices)}; {kind}; {peer.install})"
        register_baseline(Baseline(peer.name, peer.check, functools.partial(_peer_target, peer), what, exact=False))


def _peer_target(peer, variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Target:
    scale = q.shape[-1] ** -0.5
    fn = peer.make(variant, q, k, v, causal, scale)
    truth = None
    if not peer.exact:
        # Its own math in float64: the gate checks its rounding against that, and reports how
        # far that math is from ours (its documented deviation) instead of hiding it.
        def truth(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
            return peer.make(variant, a, b, c, causal, scale)(a, b, c)

    return Target(fn, variant, peer.name, False, ground_truth=truth)


def exact_baselines() -> set[str]:
    return {b.name for b in _BASELINES.values() if b.exact}


def _flex_available() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"FlexAttention is not in this PyTorch ({torch.__version__}): {exc}"
    return None


def _softmax_exact(variant: av.AttentionVariant) -> av.AttentionVariant:
    exact = variant.exact()
    if not exact.softmax:
        raise Unsupported(f"{variant.name} is not a masked softmax and approximates none; there is no exact baseline")
    return exact


def _sdpa_check(variant, device, dtype, head_dim, needs_grad) -> str | None:
    if not variant.exact().softmax:
        return f"{variant.name} is not a masked softmax and approximates none; SDPA has nothing to compute"
    return None


def _flex_check(variant, device, dtype, head_dim, needs_grad) -> str | None:
    reason = _flex_available() or _sdpa_check(variant, device, dtype, head_dim, needs_grad)
    if reason:
        return reason
    if dtype == torch.float64:
        return "FlexAttention's compiled kernels do not take float64 (CPU nor CUDA)"
    if needs_grad and device.type == "cpu":
        return f"FlexAttention has no backward on CPU in PyTorch {torch.__version__}"
    return None


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


def _sdpa_target(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Target:
    exact = _softmax_exact(variant)
    fn, dense = sdpa_fn(exact, q, k, causal)
    return Target(fn, exact, "sdpa", dense)


def sdpa_fn(variant: av.AttentionVariant, q: Tensor, k: Tensor, causal: bool) -> tuple[Fn, bool]:
    """Dense SDPA with ``variant``'s mask: ``is_causal`` when the mask is plain causal over a square
    problem, else the dense mask as a 4-D bool tensor (the fused CPU kernel takes that; 2-D masks
    fall back to the slow path). Returns ``(fn, builds_dense_mask)``."""
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    mod = variant.mask_mod(nq, nk, causal, q.device)
    if mod is None or (causal and nq == nk and variant.mask_mod(nq, nk, False, q.device) is None):
        is_causal = mod is not None
        return lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=is_causal, enable_gqa=gqa), False
    mask4 = masks.dense_from_mod(mod, nq, nk, q.device)[None, None]
    return lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask4, enable_gqa=gqa), True


def _flex_target(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Target:
    exact = _softmax_exact(variant)
    return Target(flex_fn(exact, q, k, causal), exact, "flex", False)


_FLEX_COMPILED: dict[str, Callable] = {}
_BLOCK_MASKS: dict[tuple, object] = {}


def _compiled_flex() -> Callable:
    if "fn" not in _FLEX_COMPILED:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled graph per shape; a sweep visits a few dozen shapes.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED["fn"]


def flex_block_mask(variant: av.AttentionVariant, nq: int, nk: int, causal: bool, device: torch.device):
    """FlexAttention block mask of the variant's mask predicate (None when every key is visible)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (variant.name, repr(variant.options()), nq, nk, causal, str(device))
    if key not in _BLOCK_MASKS:
        mod = variant.mask_mod(nq, nk, causal, device)
        bm = None
        if mod is not None:
            bm = create_block_mask(lambda b, h, qi, ki: mod(qi, ki), None, None, nq, nk, device=str(device))
        _BLOCK_MASKS[key] = bm
    return _BLOCK_MASKS[key]


def flex_fn(variant: av.AttentionVariant, q: Tensor, k: Tensor, causal: bool) -> Fn:
    flex = _compiled_flex()
    bm = flex_block_mask(variant, q.shape[2], k.shape[2], causal, q.device)
    gqa = q.shape[1] != k.shape[1]
    return lambda a, b, c: flex(a, b, c, block_mask=bm, enable_gqa=gqa)


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


register_baseline(
    Baseline(
        "sdpa",
        _sdpa_check,
        _sdpa_target,
        "dense SDPA with the variant's mask (for an approximation: the exact attention it approximates)",
    )
)
register_baseline(
    Baseline("flex", _flex_check, _flex_target, "compiled FlexAttention with the block mask of the variant's predicate")
)
