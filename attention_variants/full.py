"""Exact softmax attention: reference, PyTorch (SDPA) and Triton backends side by side."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import masks
from .base import AttentionVariant, register_backend, register_variant
from .decode import DecodeState, KVCache, StateLayout, triton_step
from .dense import repeat_kv


@register_variant("full")
class FullAttention(AttentionVariant):
    """Exact softmax attention ``softmax(q k^T * scale) v``, optionally causal (bottom-right).

    O(N^2 d) time; the ``torch`` and ``triton`` backends use O(N) extra memory.
    """

    softmax = True
    compare_with = None
    context_parallel = "ring"
    kernel_family = "flash"

    def mask_mod(self, nq: int, nk: int, causal: bool, device: torch.device | str = "cpu") -> masks.MaskMod | None:
        return masks.mask_mod(nq, nk, causal=causal)

    def visible_pairs(self, nq: int, nk: int, causal: bool) -> int:
        return masks.visible_pairs(nq, nk, causal=causal)

    def decode_state(self, layout: StateLayout, *, capacity: int) -> KVCache:
        return KVCache(layout, capacity=capacity)

    def decode_step(self, q: Tensor, k: Tensor, v: Tensor, state: DecodeState, scale: float, backend: str) -> Tensor:
        assert isinstance(state, KVCache)
        if triton_step(backend, q):
            from attn_kernels.decode import softmax_step

            # Split-KV kernel over the cached keys, plus the new tokens read from k and v.
            out = softmax_step(q, state.k, state.v, k, v, start=state.length, lo=0, scale=scale)
            state.append(k, v)
            return out
        state.append(k, v)
        end = state.length + k.shape[2]
        # Bottom-right alignment puts the T new queries on the last T cached positions.
        return self(q, state.keys(end), state.values(end), causal=True, scale=scale, backend=backend)


SMALL_QUERY_SDPA_MAX = 16
"""CUDA calls with at most this many queries (decoding steps) keep SDPA off cuDNN; see
:func:`small_query_sdpa_backends`."""

# In order of preference; each is used only if enabled (an outer ``sdpa_kernel`` is respected).
_SMALL_QUERY_SDPA = (
    (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
    (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
    (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
)


def small_query_sdpa_backends(device_type: str, nq: int) -> list[SDPBackend] | None:
    """The SDPA backends a call with ``nq`` queries on ``device_type`` is pinned to, or None (SDPA
    chooses, as on the CPU and for long query blocks).

    A decoding step's key length grows by one each step, and cuDNN attention builds a new
    execution plan for every new shape (tens of milliseconds each), so on CUDA a call with at
    most :data:`SMALL_QUERY_SDPA_MAX` queries runs flash, memory-efficient or math attention
    (SDPA picks the first that takes the inputs), among those currently enabled. Nothing is
    pinned when cuDNN attention is already disabled.
    """
    if device_type != "cuda" or nq > SMALL_QUERY_SDPA_MAX or not torch.backends.cuda.cudnn_sdp_enabled():
        return None
    backends = [backend for backend, enabled in _SMALL_QUERY_SDPA if enabled()]
    return backends or None


@register_backend(FullAttention, "torch", padding=True)
def _full_torch(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    backends = small_query_sdpa_backends(q.device.type, q.shape[2])
    if backends is None:
        return _full_sdpa(q, k, v, causal, scale, key_padding_mask)
    with sdpa_kernel(backends):
        return _full_sdpa(q, k, v, causal, scale, key_padding_mask)


def _full_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, key_padding_mask: Tensor | None) -> Tensor:
    if key_padding_mask is not None:
        return _full_torch_padded(q, k, v, causal, scale, key_padding_mask)
    gqa = q.shape[1] != k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    if not causal or nq == 1:  # one query sits at the last position (bottom-right): it sees every key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if nq > nk:
        # The first nq - nk queries see no key (bottom-right alignment): their rows are 0.
        tail = F.scaled_dot_product_attention(q[:, :, nq - nk :], k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        head = tail.new_zeros(q.shape[0], q.shape[1], nq - nk, v.shape[-1])
        return torch.cat([head, tail], dim=2)
    if gqa:  # CausalBias does not forward enable_gqa on every PyTorch release
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    # Imported here: torch.nn.attention.bias imports torch._dynamo, as long as torch itself to import.
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk), scale=scale)


def _full_torch_padded(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, key_padding_mask: Tensor) -> Tensor:
    """SDPA with a per-key ``(B, 1, 1, Nk)`` padding bias; rows with no visible real key are set to 0.

    Causal with ``Nq == Nk`` needs causality and the bias together, which public SDPA does not
    take without an Nq x Nk mask: on the CPU, PyTorch's fused kernel that takes both is used
    when present (it needs ``Dv == D``). Otherwise (and for causal ``Nq < Nk``, where PyTorch's own
    lower-right causal bias is expanded to an Nq x Nk mask on the CPU anyway) the causal part is a
    dense mask.
    """
    nq, nk = q.shape[2], k.shape[2]
    if causal and nq > nk:
        # The first nq - nk queries see no key (bottom-right alignment): their rows are 0.
        tail = _full_torch_padded(q[:, :, nq - nk :], k, v, True, scale, key_padding_mask)
        head = tail.new_zeros(q.shape[0], q.shape[1], nq - nk, v.shape[-1])
        return torch.cat([head, tail], dim=2)
    groups = q.shape[1] // k.shape[1]
    bias = masks.padding_bias(key_padding_mask, q.dtype)[:, None, None, :]
    if not causal or nq == 1:  # one query sits at the last position (bottom-right): it sees every key
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=groups > 1)
    elif nq == nk and _FUSED_CPU_CAUSAL_WITH_MASK is not None and q.device.type == "cpu" and v.shape[-1] == q.shape[-1]:
        out = _FUSED_CPU_CAUSAL_WITH_MASK(
            q, repeat_kv(k, groups), repeat_kv(v, groups), 0.0, True, attn_mask=bias, scale=scale
        )[0]
    else:
        causal_bias = torch.zeros(nq, nk, dtype=q.dtype, device=q.device).masked_fill_(
            ~masks.dense_mask(nq, nk, causal=True, device=q.device), float("-inf")
        )
        out = F.scaled_dot_product_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=bias + causal_bias, scale=scale
        )
    seen = masks.keys_seen(key_padding_mask, nq, causal)
    return torch.where(seen[:, None, :, None], out, out.new_zeros(()))


# PyTorch's fused CPU attention that takes a causal flag and an additive mask together (a private
# op: absent on some releases, hence the dense-mask path above).
_FUSED_CPU_CAUSAL_WITH_MASK = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _softmax_triton_check(
    variant: AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int
) -> str | None:
    from attn_kernels import softmax_unsupported_reason

    return softmax_unsupported_reason(variant, device, dtype, head_dim)


@register_backend(FullAttention, "triton", check=_softmax_triton_check, padding=True)
def _full_triton(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    from attn_kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
