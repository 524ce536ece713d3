"""Key padding in the fused Triton kernels on a CUDA device (``pytest -m gpu``; skipped without CUDA).

What the interpreter tests (tests/test_padding_triton.py) cannot cover: bfloat16, the shipped
launch configurations and long sequences, where whole runs of key blocks are padded (skipped by
the softmax query programs, stored as zeros by the key programs). Outputs and gradients against
the float64 ground truth, which applies the padding on its own.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_backend, make_qkv

import attention_variants as av

pytestmark = pytest.mark.gpu

DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]
CAUSAL = [pytest.param(False, id="noncausal"), pytest.param(True, id="causal")]


def padding_mask(b: int, n: int) -> torch.Tensor:
    """Element 0 left-padded (a third), 1 right-padded (a quarter) with a hole of 100 keys, 2 all padded."""
    mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
    mask[0, : n // 3 + 5] = False
    if b > 1:
        mask[1, n - n // 4 :] = False
        mask[1, n // 2 : n // 2 + 100] = False
    if b > 2:
        mask[2] = False
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_full_padded_gpu(causal: bool, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(2, 2, 1, 4096, 4096, 128, dtype=dtype, device="cuda")
    check_backend(av.FullAttention(), "triton", q, k, v, causal=causal, key_padding_mask=padding_mask(2, 4096))


@pytest.mark.parametrize("causal", CAUSAL)
def test_full_padded_gqa_empty_element_gpu(causal: bool) -> None:
    q, k, v = make_qkv(3, 4, 2, 1500, 2000, 64, dtype=torch.bfloat16, device="cuda")
    check_backend(av.FullAttention(), "triton", q, k, v, causal=causal, key_padding_mask=padding_mask(3, 2000))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(
    "opts",
    [
        pytest.param(dict(window=128, global_tokens=16), id="W128-G16"),
        pytest.param(dict(window=(100, 30)), id="W100-30"),
    ],
)
def test_sliding_window_padded_gpu(opts, causal: bool) -> None:
    q, k, v = make_qkv(2, 2, 1, 4096, 4096, 64, dtype=torch.bfloat16, device="cuda")
    variant = av.SlidingWindowAttention(**opts)
    check_backend(variant, "triton", q, k, v, causal=causal, key_padding_mask=padding_mask(2, 4096))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_padded_gpu(kernel: str, causal: bool) -> None:
    variant = av.PerformerAttention(num_features=256, kernel=kernel)
    q, k, v = make_qkv(3, 2, 1, 2048, 2048, 64, dtype=torch.bfloat16, device="cuda")
    check_backend(variant, "triton", q, k, v, causal=causal, key_padding_mask=padding_mask(3, 2048))


def test_padding_does_not_slow_the_kernels_down() -> None:
    """Half the keys of every element padded on the left: the padded call skips their blocks, so it
    must not take longer than the unpadded one (a generous 1.2x, timing noise)."""
    q, k, v = make_qkv(4, 8, 8, 8192, 8192, 64, dtype=torch.bfloat16, device="cuda")
    mask = torch.ones(4, 8192, dtype=torch.bool, device="cuda")
    mask[:, :4096] = False
    variant = av.FullAttention()

    def timed(m) -> float:
        for _ in range(3):
            variant(q, k, v, causal=True, backend="triton", key_padding_mask=m)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            variant(q, k, v, causal=True, backend="triton", key_padding_mask=m)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    assert timed(mask) <= 1.2 * timed(None)
