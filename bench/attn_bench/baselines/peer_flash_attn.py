"""The flash-attn peers (FlashAttention 2, dense and with a KV cache): their checks, their adapters
onto our problem and their semantics."""

from __future__ import annotations

import torch
from torch import Tensor

import attention_variants as av
from attn_bench.baselines.peer import Fn, _global_tokens_reason, _refuse, _to_bnhd, _window

# ---------------------------------------------------------------------------------------------
# flash-attn (CUDA only)
# ---------------------------------------------------------------------------------------------

FLASH_ATTN_SEMANTICS = """\
flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal,
window_size=(left, right)) on (B, N, H, D) views of our tensors (a transpose, no copy).
It documents our semantics exactly: causal aligned bottom-right (since 2.1), query i sees keys
[i + Nk - Nq - left, i + Nk - Nq + right], rows that see no key give 0, and grouped-query
attention natively (query head h reads k/v head h // (H / Hk), as ours). (left, right) is our
window's reach with causal folded in; full attention passes (-1, -1). float16 and bfloat16
only, head dim <= 256, the value head dim equal to the query's, Ampere (sm80) or newer.
Not expressible: global tokens."""


def _flash_attn_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    reason = _global_tokens_reason(variant, "flash-attn")
    if reason:
        return reason
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16 and bfloat16 only, not {dtype}"
    if head_dim > 256:
        return f"flash-attn supports head dims up to 256, got {head_dim}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"flash-attn 2 needs an Ampere (sm80) or newer GPU, this one is sm{major}{minor}"
    return None


def _flash_attn_make(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Fn:
    from flash_attn import flash_attn_func

    if v.shape[-1] != q.shape[-1]:
        _refuse(f"flash-attn needs the value head dim equal to the query's, got {v.shape[-1]} and {q.shape[-1]}")
    window = _window(variant, causal) or (-1, -1)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_func(
            _to_bnhd(q), _to_bnhd(k), _to_bnhd(v), dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window
        )
        return out.transpose(1, 2)

    return fn


FLASH_ATTN_KVCACHE_SEMANTICS = """\
flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, softmax_scale=scale, causal=causal,
window_size=(left, right)) on (B, N, H, D) views of our tensors (a transpose, no copy): k and v
are the cache it reads, every position valid (no cache_seqlens), q the new queries. This is a
decoder's step after its new keys and values are in the cache (our decode rows: one query
against the cache that holds its own token). Causal is aligned bottom-right, query i sees keys
[i + Nk - Nq - left, i + Nk - Nq + right], grouped-query attention natively (query head h reads
k/v head h // (H / Hk)), rows that see no key give 0; it picks its own number of KV splits
(num_splits=0). (left, right) is our window's reach with causal folded in, (W, 0) for a causal
window W; full attention passes (-1, -1). Forward only (no gradients). float16 and bfloat16,
head dim <= 256, the value head dim equal to the query's, Ampere (sm80) or newer.
Not expressible: global tokens."""


def _flash_attn_kvcache_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    if needs_grad:
        return "flash_attn_with_kvcache is forward only (no gradients)"
    return _flash_attn_check(variant, device, dtype, head_dim, needs_grad)


def _flash_attn_kvcache_make(
    variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> Fn:
    from flash_attn import flash_attn_with_kvcache

    if v.shape[-1] != q.shape[-1]:
        _refuse(f"flash-attn needs the value head dim equal to the query's, got {v.shape[-1]} and {q.shape[-1]}")
    window = _window(variant, causal) or (-1, -1)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_with_kvcache(
            _to_bnhd(q), _to_bnhd(k), _to_bnhd(v), softmax_scale=scale, causal=causal, window_size=window
        )
        return out.transpose(1, 2)

    return fn
