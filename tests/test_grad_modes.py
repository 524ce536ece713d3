"""Every variant, backend, ``AttentionLayer`` and decoding step runs under ``torch.inference_mode()``,
``torch.no_grad()`` and autograd alike, and whatever a variant caches (the Performer's projection,
the window's global positions, the kernels' prepared operands) in one mode serves the others.

Each call is checked against the float64 ground truth; autograd calls also against its gradients.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import check_backend, make_qkv, max_err

import attention_variants as av

MODES = {
    "autograd": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference": torch.inference_mode,
}
ORDERS = list(itertools.permutations(MODES, 2))  # the cache is built in the first mode, reused in the second
B, H, HK, N, D = 2, 4, 2, 13, 16


def _variants():
    """(name, factory): the factory runs inside the first mode, so a tensor option (a projection,
    global token positions) is made there too: an inference tensor under ``inference_mode``."""
    return {
        "full": lambda: av.FullAttention(),
        "window_global": lambda: av.SlidingWindowAttention((3, 2), global_tokens=torch.tensor([0, 7])),
        "performer": lambda: av.PerformerAttention(num_features=16, seed=1),
        "performer_given_w": lambda: av.PerformerAttention(
            num_features=16, projection=torch.randn(16, D, generator=torch.Generator().manual_seed(5))
        ),
    }


def _cases():
    for name in _variants():
        for backend in ("reference", "torch", "triton"):
            for first, second in ORDERS:
                if backend == "triton" and first == "no_grad":
                    continue  # keep the interpreter's share small: no_grad and inference share one host path
                yield pytest.param(name, backend, first, second, id=f"{name}-{backend}-{first}-then-{second}")


def _call_in_mode(mode: str, variant, backend: str, q, k, v) -> None:
    """One call in ``mode``, checked against float64 (gradients too under autograd)."""
    if mode == "autograd":
        check_backend(variant, backend, q, k, v, causal=True)
        return
    with MODES[mode]():
        out = variant(q, k, v, causal=True, backend=backend)
    assert not out.requires_grad
    with torch.no_grad():
        ref = variant(q.double(), k.double(), v.double(), causal=True, backend="reference")
    assert max_err(out, ref) < 2e-5, (mode, max_err(out, ref))


@pytest.mark.parametrize(("name", "backend", "first", "second"), list(_cases()))
def test_variant_in_every_mode(name, backend, first, second):
    with MODES[first]():
        variant = _variants()[name]()
    if not variant.supports(backend, "cpu", torch.float32, D):
        pytest.skip(variant.unsupported_reason(backend, "cpu", torch.float32, D))
    q, k, v = make_qkv(B, H, HK, N, N, D)
    _call_in_mode(first, variant, backend, q, k, v)
    _call_in_mode(second, variant, backend, q, k, v)


@pytest.mark.parametrize(("first", "second"), ORDERS, ids=[f"{a}-then-{b}" for a, b in ORDERS])
@pytest.mark.parametrize("name", ["full", "window_global", "performer"])
def test_attention_layer_in_every_mode(name, first, second):
    """The layer's output in each mode equals the same layer's float64 copy; autograd reaches every weight."""
    torch.manual_seed(0)
    with MODES[first]():
        variant = _variants()[name]()
    layer = av.AttentionLayer(32, 4, variant, num_kv_heads=2, causal=True, backend="torch")
    ref_layer = av.AttentionLayer(32, 4, _variants()[name](), num_kv_heads=2, causal=True, backend="reference")
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.double()
    x = torch.randn(2, N, 32)
    with torch.no_grad():
        ref = ref_layer(x.double())
    for mode in (first, second):
        with MODES[mode]():
            y = layer(x)
        assert max_err(y, ref) < 2e-5, mode
        if mode == "autograd":
            layer.zero_grad()
            y.square().sum().backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize(("first", "second"), ORDERS, ids=[f"{a}-then-{b}" for a, b in ORDERS])
@pytest.mark.parametrize("name", ["full", "window_global", "performer"])
def test_decoding_in_every_mode(name, first, second):
    """Prefill in one mode, step in another: equals the causal forward of the whole sequence."""
    with MODES[first]():
        variant = _variants()[name]()
    q, k, v = make_qkv(B, H, HK, N, N, D)
    with torch.no_grad():
        ref = variant(q.double(), k.double(), v.double(), causal=True, backend="reference")
    with MODES[first]():
        out1, state = variant.prefill(q[:, :, :9], k[:, :, :9], v[:, :, :9], backend="torch")
    with MODES[second]():
        out2, state = variant.step(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], state, backend="torch")
    assert max_err(torch.cat([out1, out2], dim=2), ref) < 2e-5
