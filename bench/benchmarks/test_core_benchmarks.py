"""pytest-benchmark suite of the core calls on CPU (not part of the default test run).

Run: ``pytest bench/benchmarks --benchmark-only`` (add ``--benchmark-autosave`` to keep a run and
``--benchmark-compare`` to compare with the last one). B=1, H=4, D=64, float32; the SDPA rows
are the baselines of the same run. ``-k 4096`` or ``-k performer`` select a subset.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attention_variants as av

B, H, D = 1, 4, 64
LENGTHS = (1024, 4096)
VARIANTS = {
    "full": lambda: av.FullAttention(),
    "sliding_window-w128": lambda: av.SlidingWindowAttention(window=128),
    "performer-m128": lambda: av.PerformerAttention(num_features=128),
}


def _qkv(n: int, grad: bool = False):
    gen = torch.Generator().manual_seed(n)
    return tuple(torch.randn(B, H, n, D, generator=gen).requires_grad_(grad) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward(benchmark, name: str, n: int, causal: bool) -> None:
    variant = VARIANTS[name]()
    q, k, v = _qkv(n)
    benchmark.group = f"fwd N={n} {'causal' if causal else 'non-causal'}"
    with torch.no_grad():
        out = benchmark(variant, q, k, v, causal=causal, backend="torch")
    assert out.shape == q.shape


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_backward(benchmark, name: str, n: int) -> None:
    variant = VARIANTS[name]()
    q, k, v = _qkv(n, grad=True)
    dout = torch.randn_like(q)
    benchmark.group = f"fwd_bwd N={n}"

    def step():
        return torch.autograd.grad(variant(q, k, v, backend="torch"), (q, k, v), dout)

    grads = benchmark(step)
    assert grads[0].shape == q.shape


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_sdpa_baseline(benchmark, n: int, causal: bool) -> None:
    q, k, v = _qkv(n)
    benchmark.group = f"fwd N={n} {'causal' if causal else 'non-causal'}"
    with torch.no_grad():
        benchmark(F.scaled_dot_product_attention, q, k, v, is_causal=causal)


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_band_mask_sdpa_baseline(benchmark, n: int) -> None:
    """Dense SDPA with the window-128 band mask: the baseline the sliding window replaces."""
    q, k, v = _qkv(n)
    mask = av.SlidingWindowAttention(window=128).dense_mask(n, n, False)[None, None]
    benchmark.group = f"fwd N={n} non-causal"
    with torch.no_grad():
        benchmark(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
