"""Callables for every backend a sweep can name: the project's registry backends and the baselines.

- ``reference`` / ``torch`` / ``triton`` / ``auto``: the variant itself, through the registry.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the dense problem: plain
  (causal via ``is_causal``) for ``full``, with the dense band mask for ``sliding_window``,
  and full softmax attention for ``performer`` (the computation it replaces).
- ``flex``: ``torch.compile``-d FlexAttention with the matching block mask (``full`` and
  ``sliding_window``; Performer has no block-sparse softmax equivalent). Compiled kernels and
  block masks are cached per shape in the process, so only the first call of a shape compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import attention_variants as av
from attention_variants import masks

Fn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Unsupported(Exception):
    """The backend cannot run this configuration here (the message says why)."""


@dataclass(frozen=True)
class Target:
    """What a backend computes for a variant: the callable, the variant whose math it computes
    (``truth``: its float64 reference is the ground truth for ``max_err``) and the backend
    that actually runs."""

    fn: Fn
    truth: av.AttentionVariant
    backend_used: str
    builds_dense: bool  # materialises N x N (scores or mask)


def _flex_available() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"FlexAttention is not in this PyTorch ({torch.__version__}): {exc}"
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
    if backend == "sdpa":
        return None
    if backend == "flex":
        reason = _flex_available()
        if reason:
            return reason
        if variant.name == "performer":
            return "FlexAttention computes exact softmax attention; a Performer has no block-mask equivalent"
        if getattr(variant, "global_tokens", None) not in (None, 0):
            return "the flex baseline does not model global tokens"
        if dtype == torch.float64 and device.type == "cuda":
            return "FlexAttention's CUDA kernels do not take float64"
        if needs_grad and device.type == "cpu":
            return f"FlexAttention has no backward on CPU in PyTorch {torch.__version__}"
        return None
    return variant.unsupported_reason(backend, device, dtype, head_dim)


def make_target(variant: av.AttentionVariant, backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Target:
    """The callable ``fn(q, k, v) -> out`` of ``backend`` for ``variant`` and these input shapes."""
    head_dim = max(q.shape[-1], v.shape[-1])
    reason = unsupported_reason(variant, backend, q.device, q.dtype, head_dim, needs_grad=q.requires_grad)
    if reason is not None:
        raise Unsupported(reason)
    full = av.FullAttention()
    if backend == "sdpa":
        softmax_variant = variant if variant.name == "sliding_window" else full
        return Target(sdpa_fn(softmax_variant, q, k, causal), softmax_variant, "sdpa", variant.name == "sliding_window")
    if backend == "flex":
        return Target(flex_fn(variant, q, k, causal), variant, "flex", False)
    used = variant.resolve_backend(backend, q, v)
    fn = lambda a, b, c: variant(a, b, c, causal=causal, backend=used)
    return Target(fn, variant, used, used == "reference")


def sdpa_fn(variant: av.AttentionVariant, q: Tensor, k: Tensor, causal: bool) -> Fn:
    """Dense SDPA: ``is_causal`` for square causal full attention, else the variant's dense mask
    (a 4-D bool mask, which the fused CPU kernel takes; 2-D masks fall back to the slow path)."""
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if variant.name == "full" and (not causal or nq == nk):
        return lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=gqa)
    if variant.name == "full":
        mask = masks.dense_mask(nq, nk, causal=True, device=q.device)
    else:
        mask = variant.dense_mask(nq, nk, causal, q.device)  # type: ignore[attr-defined]
    mask4 = mask[None, None]
    return lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask4, enable_gqa=gqa)


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
    """FlexAttention block mask with the variant's semantics (bottom-right causal, window band)."""
    from torch.nn.attention.flex_attention import create_block_mask

    window = getattr(variant, "window", None)
    bounds = masks.window_bounds(window, causal) if window is not None else None
    key = (nq, nk, causal, bounds, str(device))
    if key in _BLOCK_MASKS:
        return _BLOCK_MASKS[key]
    off = nk - nq
    if bounds is None and not causal:
        bm = None
    else:
        left, right = bounds if bounds is not None else (nk, nk)

        def mask_mod(b, h, qi, ki):
            p = qi + off
            keep = (ki >= p - left) & (ki <= p + right)
            if causal:
                keep = keep & (ki <= p)
            return keep

        bm = create_block_mask(mask_mod, None, None, nq, nk, device=str(device))
    _BLOCK_MASKS[key] = bm
    return bm


def flex_fn(variant: av.AttentionVariant, q: Tensor, k: Tensor, causal: bool) -> Fn:
    flex = _compiled_flex()
    bm = flex_block_mask(variant, q.shape[2], k.shape[2], causal, q.device)
    gqa = q.shape[1] != k.shape[1]
    return lambda a, b, c: flex(a, b, c, block_mask=bm, enable_gqa=gqa)


def dense_bytes(variant: str, backend: str, batch: int, heads: int, nq: int, nk: int, elem: int, grad: bool) -> int:
    """Rough bytes of the N x N tensors a dense backend builds (0 for the ones that do not).

    ``reference``: scores, probabilities and a mask per (batch, head), twice with autograd.
    ``sdpa`` with the band mask: the bool mask, which the CPU kernel also converts once to a
    float additive mask (shared by all heads; measured), plus its gradient-path copy.
    """
    if backend == "reference":
        per = batch * heads * nq * nk * max(elem, 4) * 3
        return per * (2 if grad else 1)
    if backend == "sdpa" and variant == "sliding_window":
        return nq * nk * (1 + 4 + (4 if grad else 0))
    return 0
