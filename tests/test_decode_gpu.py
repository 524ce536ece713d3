"""PyTorch decoding steps on a CUDA device (``pytest -m gpu``; skipped without CUDA).

A step of at most ``SMALL_QUERY_SDPA_MAX`` queries runs SDPA pinned to flash / memory-efficient /
math attention (no cuDNN plan per cache length). Each step's output is checked against a float64
softmax over the visible keys, with FlashAttention's rule: the error is at most twice that of the
same computation in the input dtype plus the output's rounding. Nothing here is timed.
"""

from __future__ import annotations

import pytest
import torch

import attention_variants as av

pytestmark = pytest.mark.gpu


def softmax_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Queries at positions ``start ..`` attending causally to keys ``0 ..`` (GQA by repetition),
    the score matrix formed explicitly in ``dtype``."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.repeat_interleave(groups, 1).to(dtype), v.repeat_interleave(groups, 1).to(dtype)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    i = torch.arange(start, start + q.shape[2], device=q.device)[:, None]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype) @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("t", [1, 3], ids=["T1", "T3"])
def test_gpu_torch_decode_steps_equal_float64(dtype: torch.dtype, t: int) -> None:
    variant = av.FullAttention()
    prompt, steps = 300, 6
    n = prompt + steps * t
    q = torch.randn(2, 8, n, 128, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, n, 128, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, n, 128, device="cuda", dtype=dtype)
    _, state = variant.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], backend="torch", capacity=64)
    for s in range(prompt, n, t):
        sl = slice(s, s + t)
        out, state = variant.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, backend="torch")
        assert out.shape == (2, 8, t, 128) and out.dtype == dtype
        ref = softmax_rows(q[:, :, sl], k[:, :, : s + t], v[:, :, : s + t], s, torch.float64)
        naive = softmax_rows(q[:, :, sl], k[:, :, : s + t], v[:, :, : s + t], s, dtype)
        err = (out.double() - ref).abs().max().item()
        naive_err = (naive.double() - ref).abs().max().item()
        atol = (ref.to(dtype).double() - ref).abs().max().item() + 1e-6
        assert err <= 2 * naive_err + atol, f"step at {s}: max error {err:.3g} > 2 * {naive_err:.3g} + {atol:.3g}"
    assert state.length == n
