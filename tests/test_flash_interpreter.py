"""The fused softmax kernels, forward and backward, run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` is set by ``conftest.py``; outputs and gradients are compared with the
float64 reference under the shared tolerance policy (:func:`helpers.check_backend`). bfloat16
is not tested here: ``tl.dot`` on bfloat16 is wrong under the interpreter (see the compile and
GPU tests instead).
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_backend, make_qkv, shape_id

import attention_variants as av
from attention_variants import masks
from attn_kernels import tuning
from attn_kernels.flash_configs import FlashConfig

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
CAUSAL = [pytest.param(False, id="noncausal"), pytest.param(True, id="causal")]

# (B, H, Hk, Nq, Nk, D): N in {1, 17, 64, 113, 200}, Nq != Nk both ways, GQA, head dims 16/40/64.
FULL_SHAPES = [
    (1, 2, 2, 1, 1, 16),
    (2, 4, 2, 17, 17, 40),
    (1, 2, 2, 64, 113, 64),
    (1, 4, 1, 113, 17, 16),
    (1, 1, 1, 200, 200, 40),
]


def _sid(shape) -> str:
    b, h, hk, nq, nk, d = shape
    return shape_id(b, h, hk, nq, nk, d, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=_sid)
def test_full(shape, causal: bool, dtype: torch.dtype) -> None:
    b, h, hk, nq, nk, d = shape
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype)
    check_backend(av.FullAttention(), "triton", q, k, v, causal=causal)


# (shape, window, global_tokens); the interpreter tiles are 32 queries x 16 keys.
WINDOW_CASES = [
    ((1, 2, 1, 113, 113, 16), 3, None),  # window narrower than a block
    ((1, 2, 2, 113, 200, 40), (40, 25), None),  # spans several blocks, Nq != Nk
    ((1, 2, 2, 200, 64, 16), (5, 70), None),  # Nq > Nk: some rows see nothing
    ((1, 1, 1, 64, 64, 64), 500, None),  # wider than N
    ((1, 4, 2, 113, 113, 16), 4, 2),  # global tokens: the first two positions, GQA
    ((1, 2, 1, 200, 200, 40), (10, 3), [0, 50, 51, 199]),  # scattered global positions
]


def _wid(case) -> str:
    (b, h, hk, nq, nk, d), window, glob = case
    w = f"W{window}" if isinstance(window, int) else f"W{window[0]}-{window[1]}"
    g = "" if glob is None else f"-G{glob if isinstance(glob, int) else len(glob)}"
    return f"{shape_id(b, h, hk, nq, nk, d, False)}-{w}{g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=_wid)
def test_sliding_window(case, causal: bool, dtype: torch.dtype) -> None:
    (b, h, hk, nq, nk, d), window, glob = case
    variant = av.SlidingWindowAttention(window=window, global_tokens=glob)
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype)
    check_backend(variant, "triton", q, k, v, causal=causal)


def test_value_head_dim_differs_and_custom_scale() -> None:
    q, k, v = make_qkv(1, 2, 1, 50, 70, 40, dv=16)
    check_backend(av.FullAttention(), "triton", q, k, v, causal=True, scale=0.3)
    check_backend(av.SlidingWindowAttention(window=(9, 2)), "triton", q, k, v, causal=False, scale=0.3)


def test_non_contiguous_inputs() -> None:
    """(B, N, H, D) storage viewed as (B, H, N, D), and a last dim with stride 2."""
    b, h, n, d = 1, 2, 45, 32
    q = torch.randn(b, n, h, d).transpose(1, 2)
    k = torch.randn(b, n, h, d).transpose(1, 2)
    v = torch.randn(b, n, h, 2 * d)[..., ::2].transpose(1, 2)
    assert not q.is_contiguous() and v.stride(-1) == 2
    check_backend(av.FullAttention(), "triton", q, k, v, causal=True)
    check_backend(av.SlidingWindowAttention(window=7, global_tokens=1), "triton", q, k, v, causal=False)


def test_forward_without_autograd() -> None:
    """No gradient wanted (inputs without grad, or under ``no_grad``): the forward runs without the
    autograd function, a last dim of stride 2 included, and equals the float64 reference."""
    q, k, v = make_qkv(1, 2, 1, 33, 33, 16)
    v = torch.randn(1, 1, 33, 32)[..., ::2]
    for variant in (av.FullAttention(), av.SlidingWindowAttention(window=(5, 2))):
        check_backend(variant, "triton", q, k, v, causal=True, grad=False)
        ref = variant.reference(q.double(), k.double(), v.double(), causal=True)
        with torch.no_grad():
            out = variant(q.requires_grad_(True), k, v, causal=True, backend="triton")
        q.requires_grad_(False)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_rows_without_keys_are_zero_with_zero_grads() -> None:
    """Causal, Nq > Nk, window (0, 0): the first Nq - Nk rows see no key."""
    q, k, v = make_qkv(1, 2, 2, 40, 10, 16)
    q.requires_grad_(True)
    out = av.SlidingWindowAttention(window=(0, 0))(q, k, v, causal=True, backend="triton")
    assert torch.isfinite(out).all()
    assert (out[:, :, :30] == 0).all()
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(gq).all() and (gq[:, :, :30] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_propagates() -> None:
    q, k, v = make_qkv(1, 1, 1, 20, 20, 16)
    q[0, 0, 3, 0] = float("nan")
    out = av.FullAttention()(q, k, v, backend="triton")
    assert torch.isnan(out[0, 0, 3]).all()
    assert torch.isfinite(out[0, 0, :3]).all()


def test_window_matches_dense_mask_semantics() -> None:
    """The kernel's mask agrees with masks.dense_mask row by row (probe with one-hot values)."""
    nq = nk = 40
    gm = torch.zeros(nq, dtype=torch.bool)
    gm[[0, 25]] = True
    q = torch.zeros(1, 1, nq, 16)
    k = torch.zeros(1, 1, nk, 16)
    v = torch.eye(nk).reshape(1, 1, nk, nk)
    for causal in (False, True):
        out = av.SlidingWindowAttention(window=(6, 2), global_tokens=gm)(q, k, v, causal=causal, backend="triton")
        window = masks.window_bounds((6, 2), causal)
        dense = masks.dense_mask(nq, nk, causal=causal, window=window, global_mask=gm)
        assert torch.equal(out[0, 0] > 0, dense)


def test_unsupported_configs_say_why() -> None:
    from attn_kernels import softmax_unsupported_reason

    full = av.FullAttention()
    cpu = torch.device("cpu")
    assert softmax_unsupported_reason(full, cpu, torch.float16, 64) is None
    assert "float64" in softmax_unsupported_reason(full, cpu, torch.float64, 64)
    assert "256" in softmax_unsupported_reason(full, cpu, torch.float32, 320)
    assert "interpreter" in softmax_unsupported_reason(full, cpu, torch.bfloat16, 64)
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="triton"):
        full(q, k, v, backend="triton")


def test_interpreter_range_walks_like_range() -> None:
    """The loop the kernels run under the interpreter (bounds from schedules, groups, globals)."""
    from attn_kernels import interpreter_range

    for args in [(5,), (0, 0), (3, 17, 4), (16, 48, 16), (7, 3, 2), (-5, 6, 3)]:
        assert list(interpreter_range(*args)) == list(range(*args)), args


# The sm_90 paths, forced at small tiles: the forward's TMA descriptors (three passes for full
# attention, one predicated loop for a band; the gathered global rows through pointers) and the
# backward modes (dq at transposed tiles; dQ summed with float32 atomics by the dk/dv programs).
PATHS = {
    "tma-split": (FlashConfig(32, 16, 4, 1, tma=True), FlashConfig(16, 32, 4, 1, bwd="split")),
    "tma-atomic": (FlashConfig(16, 32, 4, 1, tma=True), FlashConfig(16, 32, 4, 1, bwd="atomic")),
}
PATH_CASES = [
    (av.FullAttention(), (2, 4, 2, 70, 150, 40), True, torch.float16),  # GQA, Nq < Nk, head dim padded
    (av.FullAttention(), (1, 2, 1, 150, 70, 16), False, torch.float32),  # Nq > Nk
    # GQA with global tokens: the band programs leave their global keys to the gathered ones
    (av.SlidingWindowAttention((20, 7), global_tokens=[0, 33, 100]), (1, 4, 2, 120, 120, 64), True, torch.float16),
]


@pytest.mark.parametrize("case", PATH_CASES, ids=["full-gqa", "full-nq-gt-nk", "window-global-gqa"])
@pytest.mark.parametrize("path", list(PATHS))
def test_hopper_paths(path: str, case) -> None:
    variant, (b, h, hk, nq, nk, d), causal, dtype = case
    fwd, bwd = PATHS[path]
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype)
    with tuning.forced({"flash_fwd": fwd, "flash_bwd": bwd}) as seen:
        check_backend(variant, "triton", q, k, v, causal=causal)
    assert {kernel for kernel, _ in seen} == {"flash_fwd", "flash_bwd"}


def test_atomic_backward_is_deterministic_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.use_deterministic_algorithms the atomic mode launches the split kernels."""
    from attn_kernels import flash_attention

    cfg = FlashConfig(16, 32, 4, 1, bwd="atomic")
    assert flash_attention.backward_mode(cfg, has_pad=False) == "atomic"
    assert flash_attention.backward_mode(cfg, has_pad=True) == "split"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert flash_attention.backward_mode(cfg, has_pad=False) == "split"
    q, k, v = make_qkv(1, 2, 1, 50, 50, 16)
    with tuning.forced({"flash_bwd": cfg}):
        check_backend(av.FullAttention(), "triton", q, k, v, causal=True)


def test_tensors_no_descriptor_fits_take_pointer_loads() -> None:
    """A row stride of 50 bytes cannot be a TMA descriptor's: the launch takes a pointer config."""
    from attn_kernels import flash_attention

    q, k, v = (torch.randn(1, 2, 40, 25, dtype=torch.float16)[..., :24] for _ in range(3))
    opts = flash_attention.FlashOptions(False, 0.2)
    with tuning.forced({"flash_fwd": FlashConfig(32, 16, 4, 1, tma=True)}):
        cfg = flash_attention._config(q, k, v, opts, backward=False)
        assert not cfg.tma
        check_backend(av.FullAttention(), "triton", q, k, v, causal=False, grad=False)
