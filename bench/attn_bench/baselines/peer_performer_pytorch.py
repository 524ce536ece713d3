"""The performer-pytorch peer: its check, its adapter onto our problem and its semantics."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import Tensor

import attention_variants as av
from attention_variants.dense import repeat_kv
from attn_bench.baselines.peer import Fn, _refuse

# ---------------------------------------------------------------------------------------------
# performer-pytorch (lucidrains)
# ---------------------------------------------------------------------------------------------

PERFORMER_FEATURE_EPS = 1e-4  # added inside its softmax-kernel features

PERFORMER_CAUSAL_EPS = 1e-6  # added to its causal normaliser (k cumsum)

PERFORMER_SEMANTICS = """\
performer_pytorch.FastAttention(dim_heads=D, nb_features=m, causal=causal,
generalized_attention=(kernel == "relu"), kernel_fn=ReLU()) with its projection_matrix
buffer replaced by OUR W (variant.projection_matrix in float64; it casts W to the input
dtype, as we do), so both draw the same random features. Called on (B, H, N, D) with k/v
heads repeated (no grouped-query attention); computes in the input dtype (we upcast float16
and bfloat16 to float32): in float16 its key features (about 1e-4 / sqrt(m)) and normaliser
underflow, and standard normal inputs give NaN rows, which the numerics gate reports.

Scale: it always feeds D**-0.25 * x to the features; q and k are multiplied by
(scale * sqrt(D)) ** 0.5 first (exactly 1 for the default scale), so it sees our x' = x * sqrt(scale).

Softmax kernel, where it differs from ours (documented, measured by semantic_deviation):
  phi(x) = m**-0.5 * (exp(W x' - |x'|^2 / 2 - c) + 1e-4), c = max of W x' over the row (queries)
  or over all keys and features of a (batch, head) (keys). Ours has no + 1e-4, drops |x'|^2/2
  with the row max for queries, and takes c = max of (W x' - |x'|^2 / 2) for keys. Without the
  1e-4 all these constants cancel in the ratio; with it they set how much the 1e-4 weighs. On
  standard normal inputs with D = 64 (|x'|^2 / 2 about 4, max of W k' about 12), over 99% of its
  key features fall below the 1e-4, so its output is close to a mean of v and differs from ours
  by about the output's own size; with inputs of a quarter of that norm, by about 1e-4.
ReLU kernel: relu(W x') + 1e-3, the same as ours.
Causal (both kernels): normaliser q . (cumsum(k) + 1e-6) instead of q . cumsum(k). Its prefix
sums pair query i with key i, so causal needs Nq == Nk (refused otherwise); non-causal takes
any Nk. Without fast_transformers' CUDA extension (always on CPU) causal runs its
causal_linear_attention_noncuda: 128 chunks along N, each materialising (N/128, m, Dv) states;
with the extension, CausalDotProduct (float16 then needs apex: refused without it).
FastAttention prints a notice when it falls back; it is silenced here. The projection draw in
its constructor runs under a forked RNG, so the caller's random stream is untouched."""


def _performer_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    return None


def _performer_module(variant: av.PerformerAttention, head_dim: int, causal: bool, device: torch.device):
    from performer_pytorch import FastAttention

    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        module = FastAttention(
            dim_heads=head_dim,
            nb_features=variant.num_features,
            causal=causal,
            generalized_attention=variant.kernel == "relu",
            kernel_fn=torch.nn.ReLU(),
        )
    module.projection_matrix = variant.projection_matrix(head_dim, device, torch.float64)
    return module.eval()


def performer_causal_path(module: Any) -> str:
    """Which causal routine a causal ``FastAttention`` runs: ``"noncuda"`` (chunked PyTorch) or ``"cuda"``."""
    fn = getattr(module, "causal_linear_fn", None)
    return "noncuda" if getattr(fn, "__name__", "") == "causal_linear_attention_noncuda" else "cuda"


def _performer_make(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Fn:
    assert isinstance(variant, av.PerformerAttention)
    nq, nk, d = q.shape[2], k.shape[2], q.shape[-1]
    if causal and nq != nk:
        _refuse(f"performer-pytorch's causal prefix sums pair query i with key i: needs Nq == Nk, got {nq}, {nk}")
    module = _performer_module(variant, d, causal, q.device)
    if causal and performer_causal_path(module) == "cuda" and q.dtype == torch.float16:
        from performer_pytorch import performer_pytorch as pp

        if not pp.APEX_AVAILABLE:
            _refuse("performer-pytorch's CUDA causal product takes float16 only with nvidia apex installed")
    factor = (scale * d**0.5) ** 0.5
    groups = q.shape[1] // k.shape[1]

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if factor != 1.0:
            q, k = q * factor, k * factor
        return module(q, repeat_kv(k, groups), repeat_kv(v, groups))

    return fn
