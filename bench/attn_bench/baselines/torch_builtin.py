"""The baselines PyTorch ships: ``sdpa`` (``scaled_dot_product_attention`` on the dense problem
with the dense mask) and ``flex`` (``torch.compile``-d FlexAttention with the block mask of the
variant's predicate; compiled kernels and block masks cached per shape in the process)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import attention_variants as av
from attention_variants import masks
from attn_bench.baselines.registry import Baseline, register_baseline
from attn_bench.baselines.target import Fn, Target, Unsupported


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
