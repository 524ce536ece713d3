"""The fused softmax kernels as custom operators: ``torch.library.opcheck`` of both operators (schema,
fake implementation, autograd registration, AOT dispatch) under the Triton interpreter, and
``torch.compile(fullgraph=True)`` of calls through the public API, checked against float64."""

from __future__ import annotations

import pytest
import torch
from helpers import make_qkv

import attention_variants as av
from attn_bench.core.numerics import check
from attn_kernels.flash_attention import flash_bwd, flash_fwd, padding_args

B, H, HK, N, D = 1, 4, 2, 40, 16
# Dynamo notes once that it traces through the kernels' cached environment probes (constant here).
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


def _padding(nk: int) -> torch.Tensor:
    mask = torch.ones(B, nk, dtype=torch.bool)
    mask[0, :5] = False
    return mask


@pytest.mark.parametrize(
    ("causal", "window", "positions", "padded"),
    [(True, None, [], False), (False, (5, 3), [0, 17], True)],
    ids=["full-causal", "window-global-padded"],
)
def test_opcheck(causal, window, positions, padded) -> None:
    torch.manual_seed(0)
    q, k, v = make_qkv(B, H, HK, N, N, D)
    kv, kr = padding_args(_padding(N)) if padded else (None, None)
    left, right = window or (0, 0)
    scalars = (causal, D**-0.5, left, right, window is not None, positions)
    torch.library.opcheck(flash_fwd, (q, k, v, *scalars, kv, kr))
    out, lse = flash_fwd(q, k, v, *scalars, kv, kr)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        flash_bwd, (q, k, v, out, lse, dout, *scalars, kv, kr), test_utils=("test_schema", "test_faketensor")
    )


CASES = {
    "full-causal-padded": (lambda: av.FullAttention(), True, True),
    "window-global": (lambda: av.SlidingWindowAttention((4, 2), global_tokens=[0, 21]), False, False),
    "window-causal-padded": (lambda: av.SlidingWindowAttention(6), True, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_call_has_no_graph_break(name: str) -> None:
    """``fullgraph=True`` fails on any graph break; the compiled call and its gradients pass the
    float64 gate."""
    torch._dynamo.reset()
    make, causal, padded = CASES[name]
    variant = make()
    mask = _padding(N) if padded else None

    def call(q, k, v):
        return variant(q, k, v, causal=causal, backend="triton", key_padding_mask=mask)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    q, k, v = make_qkv(B, H, HK, N, N, D)
    res = check(compiled, variant, q, k, v, causal, grads=True, approx=False, key_padding_mask=mask)
    assert res.ok, res.message


@pytest.mark.gpu
def test_compiled_call_is_captured_in_a_cuda_graph() -> None:
    """On a GPU: a compiled forward runs inside a CUDA graph and replays to the float64 answer."""
    q, k, v = make_qkv(2, 8, 2, 1024, 1024, 128, dtype=torch.bfloat16, device="cuda")
    variant = av.FullAttention()
    compiled = torch.compile(lambda a, b, c: variant(a, b, c, causal=True, backend="triton"), fullgraph=True)
    compiled(q, k, v)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(q, k, v)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        res = check(lambda a, b, c: out.clone(), variant, q, k, v, True, approx=False)
        assert res.ok, res.message
