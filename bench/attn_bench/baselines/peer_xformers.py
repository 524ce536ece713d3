"""The xformers (memory_efficient_attention) peer: its check, its adapter onto our problem and its semantics."""

from __future__ import annotations

import torch
from torch import Tensor

import attention_variants as av
from attention_variants.dense import repeat_kv
from attn_bench.baselines.peer import Fn, _global_tokens_reason, _refuse, _to_bnhd, _window

# ---------------------------------------------------------------------------------------------
# xformers (CUDA only)
# ---------------------------------------------------------------------------------------------

XFORMERS_SEMANTICS = """\
xformers.ops.memory_efficient_attention(q, k, v, attn_bias, p=0.0, scale=scale) on
(B, N, H, D) views of our tensors, k/v heads repeated (its grouped-query form is a 5-D
stride-0 layout that not every operator takes; repeating is always accepted). attn_bias:
full non-causal: None; full causal: LowerTriangularFromBottomRightMask(); sliding window:
LocalAttentionFromBottomRightMask(window_left=left, window_right=right), (left, right) our
reach with causal folded in (right = 0): it keeps key k for query q iff
q - left <= k + Nq - Nk <= q + right, our bottom-right band (and with right = 0, causal too).
Rows that see no key (only when Nq > Nk) are set to 0, our convention (xformers does not
document their value). float16, bfloat16 and float32; its dispatcher picks the operator:
make() runs one (1 batch, 1 kv-head group) call and reports "no operator" as unsupported.
Not expressible: global tokens."""


def _xformers_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    reason = _global_tokens_reason(variant, "xformers")
    if reason:
        return reason
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers takes float16, bfloat16 and float32 only, not {dtype}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    return None


def _empty_rows(nq: int, nk: int, window: tuple[int, int] | None, causal: bool) -> int:
    """How many leading queries see no key (bottom-right alignment): ``max(0, Nq - Nk - right)``."""
    if window is not None:
        right = window[1]
    elif causal:
        right = 0
    else:
        return 0
    return max(0, min(nq, nq - nk - right))


def xformers_bias(variant: av.AttentionVariant, causal: bool):
    """The xformers attention bias with our semantics (None for full non-causal attention)."""
    from xformers.ops.fmha import attn_bias

    window = _window(variant, causal)
    if window is not None:
        return attn_bias.LocalAttentionFromBottomRightMask(window_left=window[0], window_right=window[1])
    return attn_bias.LowerTriangularFromBottomRightMask() if causal else None


def _xformers_make(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Fn:
    import xformers.ops as xops

    bias = xformers_bias(variant, causal)
    groups = q.shape[1] // k.shape[1]
    empty = _empty_rows(q.shape[2], k.shape[2], _window(variant, causal), causal)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        out = xops.memory_efficient_attention(_to_bnhd(q), _to_bnhd(k), _to_bnhd(v), attn_bias=bias, p=0.0, scale=scale)
        out = out.transpose(1, 2)
        if empty:
            keep = torch.arange(out.shape[2], device=out.device) >= empty
            out = out.where(keep[:, None], out.new_zeros(()))
        return out

    try:
        with torch.no_grad():
            fn(q[:1, :groups].detach(), k[:1, :1].detach(), v[:1, :1].detach())
    except NotImplementedError as exc:
        _refuse(f"xformers has no operator for this configuration: {str(exc).splitlines()[0]}")
    return fn
