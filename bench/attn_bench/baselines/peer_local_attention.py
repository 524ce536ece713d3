"""The local-attention peer: its check, its adapter onto our problem and its semantics."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import attention_variants as av
from attention_variants.dense import repeat_kv
from attn_bench.baselines.peer import Fn, _global_tokens_reason, _refuse, _window

# ---------------------------------------------------------------------------------------------
# local-attention (lucidrains)
# ---------------------------------------------------------------------------------------------

LOCAL_ATTENTION_SEMANTICS = """\
local_attention.LocalAttention(window_size=b, causal=causal, look_backward=left // b,
look_forward=right // b, exact_windowsize=True, autopad=True, scale=scale, dropout=0,
shared_qk=False, use_rotary_pos_emb=False), called on (B, H, N, D) with k/v heads repeated
(it has no grouped-query attention).

(left, right) is our window's reach with causal folded in (right = 0), each clipped to N - 1
(no position is further away), and b = gcd(left, right) (1 when both are 0), so that
left = b * look_backward and right = b * look_forward exactly. With exact_windowsize=True
query t sees keys [t - b * look_backward, t + b * look_forward] (and causal: <= t): our band.
Without it the reach would depend on where t sits in its bucket of b positions. A small gcd
(e.g. (128, 127) -> b = 1) is exact but runs as many tiny buckets.

Its buckets put query i and key i at the same position, which is our bottom-right alignment
only when Nq == Nk: other shapes are refused. autopad pads N to a multiple of b with zero
keys, which its exact mask does not hide from the last queries when non-causal: an all-true
key mask is passed then (its padding becomes False). It multiplies q by scale before q k^T
and takes the softmax in the input dtype (no float32 upcast for float16/bfloat16).
Not expressible: global tokens. Rotary embeddings, dropout and shared-qk are off."""


def _local_attention_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    return _global_tokens_reason(variant, "local-attention")


def local_attention_params(left: int, right: int, causal: bool) -> dict[str, Any]:
    """``LocalAttention`` arguments for our clipped ``(left, right)`` reach (see the semantics)."""
    bucket = math.gcd(left, right) or 1
    return dict(
        window_size=bucket,
        causal=causal,
        look_backward=left // bucket,
        look_forward=right // bucket,
        exact_windowsize=True,
        autopad=True,
        dropout=0.0,
        shared_qk=False,
        use_rotary_pos_emb=False,
    )


def _local_attention_make(
    variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> Fn:
    from local_attention import LocalAttention

    n, nk = q.shape[2], k.shape[2]
    if n != nk:
        _refuse(f"local-attention needs Nq == Nk (its buckets align query i with key i), got Nq={n}, Nk={nk}")
    window = _window(variant, causal)
    assert window is not None
    left, right = (min(w, max(n - 1, 0)) for w in window)
    params = local_attention_params(left, right, causal)
    module = LocalAttention(**params, scale=scale).eval()
    bucket = params["window_size"]
    key_mask = None
    if not causal and right > 0 and n % bucket:
        key_mask = torch.ones(1, n, dtype=torch.bool, device=q.device)
    groups = q.shape[1] // k.shape[1]

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return module(q, repeat_kv(k, groups), repeat_kv(v, groups), mask=key_mask)

    return fn
