"""The Triton decoding steps (kernels/attn_kernels/decode.py): a step of T new tokens equals the last T rows
of the whole sequence's causal attention, computed here independently in float64 (dense masks
and explicit Performer features built from their definitions), within FlashAttention's
tolerance (twice the error of the same dense computation in the input dtype, plus rounding of
the output). CPU tests run the kernels under TRITON_INTERPRET=1; the GPU tests take long caches
and compare with the PyTorch step."""

from __future__ import annotations

import math

import pytest
import torch

import attention_variants as av
from attn_kernels.decode import MAX_STEP_TOKENS, softmax_step, split_plan

pytestmark = pytest.mark.interpreter


# ---------------------------------------------------------------------------------------------
# Independent ground truth: the causal forward of the whole sequence, dense
# ---------------------------------------------------------------------------------------------


def visible(n: int, left: int | None, global_pos: list[int]) -> torch.Tensor:
    """``(n, n)`` bool: query ``i`` sees key ``j <= i`` within ``left`` back (None: all), any
    earlier global key, and a global query sees every earlier key (Longformer)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    vis = j <= i
    if left is not None:
        band = j >= i - left
        glob = torch.zeros(n, dtype=torch.bool)
        glob[global_pos] = True
        vis = vis & (band | glob[None, :] | glob[:, None])
    return vis


def softmax_truth(q, k, v, vis, dtype=torch.float64) -> torch.Tensor:
    """Dense masked softmax attention in ``dtype``, k/v heads repeated for GQA."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~vis, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def favor_truth(q, k, v, w: torch.Tensor, kernel: str, dtype=torch.float64) -> torch.Tensor:
    """Causal FAVOR+ from its definition: ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` (or
    ``relu(W x') + 1e-3``), ``x' = x * D^(-1/4)``, no stabiliser (the inputs are small)."""
    groups = q.shape[1] // k.shape[1]
    q, k, v, w = (x.to(dtype) for x in (q, k, v, w))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    r = q.shape[-1] ** -0.25

    def phi(x):
        x = x * r
        if kernel == "relu":
            return torch.relu(x @ w.T) + 1e-3
        return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    a = (phi(q) @ phi(k).transpose(-1, -2)).tril()
    return (a @ v) / a.sum(-1, keepdim=True)


def assert_within_tolerance(out, ref64, naive, what: str) -> None:
    """FlashAttention's rule: error <= 2 x the naive same-dtype error + the output's rounding."""
    err = (out.double() - ref64).abs().max().item()
    naive_err = (naive.double() - ref64).abs().max().item()
    atol = 2 * (ref64.to(out.dtype).double() + 0.3 - 0.3 - ref64).abs().max().item() + 1e-7
    assert err <= 2 * naive_err + atol, f"{what}: max error {err:.3g} > 2 * {naive_err:.3g} + {atol:.3g}"


def run_steps(variant, q, k, v, prompt: int, t: int, steps: int = 2):
    """Prefill ``prompt`` tokens (PyTorch), then ``steps`` Triton steps of ``t`` tokens; returns the
    steps' outputs (concatenated) and the state."""
    _, state = variant.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], backend="torch")
    outs = []
    for s in range(prompt, prompt + steps * t, t):
        sl = slice(s, s + t)
        out, state = variant.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, backend="triton")
        assert out.dtype == q.dtype and out.shape == (*q.shape[:2], t, v.shape[-1])
        outs.append(out)
    return torch.cat(outs, dim=2), state


def skip_unless_supported(variant, dtype, d) -> None:
    if not variant.supports("triton", "cpu", dtype, d):
        pytest.skip(variant.unsupported_reason("triton", "cpu", dtype, d))


# (id, variant options, left reach or None, global positions)
SOFTMAX_CASES = [
    ("full", "full", {}, None, []),
    ("window7-wrapped", "sliding_window", {"window": 7}, 7, []),
    ("window64", "sliding_window", {"window": 64}, 64, []),
    ("window5-globals", "sliding_window", {"window": 5, "global_tokens": [0, 3, 20]}, 5, [0, 3, 20]),
]
# (prompt, T, D, Dv, H, Hk, dtype)
SHAPES = [
    (1, 1, 16, 16, 2, 2, torch.float32),
    (37, 3, 32, 16, 4, 2, torch.float32),
    (97, 3, 32, 32, 4, 1, torch.float16),
]


def shape_id(s) -> str:
    prompt, t, d, dv, h, hk, dtype = s
    return f"L{prompt}-T{t}-D{d}-Dv{dv}-H{h}-Hk{hk}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[c[0] for c in SOFTMAX_CASES])
def test_softmax_step_equals_causal_forward(case, shape) -> None:
    _, name, opts, left, gpos = case
    prompt, t, d, dv, h, hk, dtype = shape
    gpos = [p for p in gpos if p < prompt]  # globals must lie in the prefill
    if "global_tokens" in opts:
        opts = {**opts, "global_tokens": gpos or None}
    variant = av.get_variant(name, **opts)
    skip_unless_supported(variant, dtype, max(d, dv))
    n = prompt + 2 * t
    q, k, v = torch.randn(2, h, n, d, dtype=dtype), torch.randn(2, hk, n, d, dtype=dtype), torch.randn(2, hk, n, dv)
    v = v.to(dtype)
    out, state = run_steps(variant, q, k, v, prompt, t)
    vis = visible(n, left, gpos)
    rows = slice(prompt, n)
    ref = softmax_truth(q, k, v, vis)[:, :, rows]
    naive = softmax_truth(q, k, v, vis, dtype=dtype)[:, :, rows]
    assert_within_tolerance(out, ref, naive, f"{name} {opts}")
    assert state.length == n


def test_many_splits_and_the_combine() -> None:
    """A cache cut into many chunks (one key tile each) gives the same as the dense truth."""
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    c = 197  # cached keys: 4 chunks of 64, the last one partial
    out = softmax_step(q, k[:, :, :c], v[:, :, :c], k[:, :, c:], v[:, :, c:], start=c, lo=0, scale=0.25, chunk=64)
    vis = visible(200, None, [])[c:]
    assert_within_tolerance(out, softmax_truth(q, k, v, vis), softmax_truth(q, k, v, vis, torch.float32), "chunked")
    with pytest.raises(ValueError, match="chunk"):
        softmax_step(q, k, v, k[:, :, :3], v[:, :, :3], start=200, lo=0, scale=0.25, chunk=10)


def test_many_query_rows_take_several_row_blocks() -> None:
    """More query rows per key head (heads of the group x new tokens) than one program takes:
    float32 at D = 128 (16 rows a program) and the Performer (64), whose state every row block
    reads before it is updated."""
    q, k, v = torch.randn(1, 8, 23, 128), torch.randn(1, 1, 23, 128), torch.randn(1, 1, 23, 128)
    out, _ = run_steps(av.FullAttention(), q, k, v, 20, 3, steps=1)  # 24 rows: 2 row blocks
    vis = visible(23, None, [])[20:]
    q3 = q[:, :, 20:]
    assert_within_tolerance(out, softmax_truth(q3, k, v, vis), softmax_truth(q3, k, v, vis, torch.float32), "rows")

    perf = av.PerformerAttention(num_features=16)
    q, k, v = torch.randn(1, 24, 9, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16)
    out, state = run_steps(perf, q, k, v, 6, 3, steps=1)  # 72 rows: 2 row blocks
    w = perf.projection_matrix(16, "cpu", torch.float64)
    ref = favor_truth(q, k, v, w, "softmax")[:, :, 6:]
    assert_within_tolerance(out, ref, favor_truth(q, k, v, w, "softmax", torch.float32)[:, :, 6:], "rows")
    torch.testing.assert_close(state.kv, perf.prefill(q, k, v, backend="torch")[1].kv, rtol=1e-5, atol=1e-6)


def test_split_plan_covers_the_cache() -> None:
    cpu = torch.device("cpu")
    assert split_plan(0, 4, 32, cpu) == (32, 0)
    for n in (1, 31, 32, 33, 1000):
        chunk, splits = split_plan(n, 1, 32, cpu)
        assert chunk % 32 == 0 and (splits - 1) * chunk < n <= splits * chunk


@pytest.mark.parametrize(
    ("kernel", "prompt", "t", "h", "hk", "dtype"),
    [
        ("softmax", 1, 1, 2, 2, torch.float32),
        ("softmax", 40, 3, 4, 2, torch.float32),
        ("softmax", 25, 3, 4, 2, torch.float16),
        ("relu", 30, 1, 4, 1, torch.float32),
        ("relu", 12, 3, 2, 2, torch.float16),
    ],
    ids=["softmax-L1-T1", "softmax-L40-T3-gqa", "softmax-L25-T3-f16", "relu-L30-T1-mqa", "relu-L12-T3-f16"],
)
def test_performer_step_equals_causal_forward(kernel: str, prompt: int, t: int, h: int, hk: int, dtype) -> None:
    variant = av.PerformerAttention(num_features=40, kernel=kernel)  # 3 feature blocks, the last partial
    d, dv = 16, 8
    skip_unless_supported(variant, dtype, d)
    n = prompt + 2 * t
    q, k, v = torch.randn(2, h, n, d, dtype=dtype), torch.randn(2, hk, n, d, dtype=dtype), torch.randn(2, hk, n, dv)
    v = v.to(dtype)
    out, state = run_steps(variant, q, k, v, prompt, t)
    w = variant.projection_matrix(d, "cpu", torch.float64)
    ref = favor_truth(q, k, v, w, kernel)[:, :, prompt:]
    naive = favor_truth(q, k, v, w, kernel, dtype=torch.float32)[:, :, prompt:].to(dtype)
    assert_within_tolerance(out, ref, naive, f"performer {kernel}")

    # The state after the Triton steps is the PyTorch recurrence's (same stabiliser, same sums).
    _, torch_state = variant.prefill(q, k, v, backend="torch")
    torch.testing.assert_close(state.kv, torch_state.kv, rtol=1e-5, atol=1e-6)
    if kernel == "softmax":
        torch.testing.assert_close(state.shift, torch_state.shift, rtol=1e-6, atol=1e-6)
    else:
        assert state.shift is None


def test_performer_growing_key_norms_rescale_the_state() -> None:
    """Later keys with larger norms raise the running shift at every step: the kernel rescales
    its rows of the state, as the PyTorch step does."""
    variant = av.PerformerAttention(num_features=32)
    q, k, v = torch.randn(1, 2, 14, 16), torch.randn(1, 2, 14, 16), torch.randn(1, 2, 14, 16)
    k = k * torch.linspace(0.3, 2.0, 14)[:, None]
    out, state = run_steps(variant, q, k, v, 2, 3, steps=4)
    w = variant.projection_matrix(16, "cpu", torch.float64)
    ref = favor_truth(q, k, v, w, "softmax")[:, :, 2:]
    assert_within_tolerance(out, ref, favor_truth(q, k, v, w, "softmax", torch.float32)[:, :, 2:], "growing")
    assert torch.isfinite(state.kv).all()


def test_long_steps_and_other_backends_fall_back() -> None:
    """Steps longer than MAX_STEP_TOKENS run the forward kernels (softmax) or the PyTorch
    recurrence (Performer); the reference backend still has no Performer step."""
    t = MAX_STEP_TOKENS + 1
    full, perf = av.FullAttention(), av.PerformerAttention(num_features=16)
    q, k, v = torch.randn(1, 2, t + 2, 16), torch.randn(1, 2, t + 2, 16), torch.randn(1, 2, t + 2, 16)
    _, state = full.prefill(q[:, :, :2], k[:, :, :2], v[:, :, :2], backend="triton")
    out, _ = full.step(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], state, backend="triton")
    vis = visible(t + 2, None, [])[2:]
    q2 = q[:, :, 2:]
    assert_within_tolerance(out, softmax_truth(q2, k, v, vis), softmax_truth(q2, k, v, vis, torch.float32), "long")
    out, _ = perf.prefill(q, k, v, backend="triton")
    ref = favor_truth(q, k, v, perf.projection_matrix(16, "cpu", torch.float64), "softmax")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert "triton" in av.PerformerAttention.decode_backends
    with pytest.raises(ValueError, match="no decoding step"):
        perf.prefill(q, k, v, backend="reference")


# ---------------------------------------------------------------------------------------------
# GPU: long caches in bfloat16, against the PyTorch step
# ---------------------------------------------------------------------------------------------


def _decode_both(variant, q, k, v, prompt: int, t: int):
    outs = {}
    for backend in ("torch", "triton"):
        _, state = variant.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], backend="torch")
        steps = []
        for s in range(prompt, q.shape[2], t):
            sl = slice(s, s + t)
            steps.append(variant.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, backend=backend)[0])
        outs[backend] = (torch.cat(steps, dim=2), state)
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("length", [16384, 65536], ids=["16k", "64k"])
@pytest.mark.parametrize(
    "case",
    [("full", {}, None, []), ("window", {"window": 1024, "global_tokens": 4}, 1024, [0, 1, 2, 3])],
    ids=["full", "window1024-global4"],
)
@pytest.mark.parametrize("t", [1, 4], ids=["T1", "T4"])
def test_gpu_long_cache_bf16(case, length: int, t: int) -> None:
    name, opts, left, gpos = case
    variant = av.get_variant("full" if name == "full" else "sliding_window", **opts)
    n = length + 2 * t
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(2, 8, n, 128, device=dev, dtype=dt)
    k, v = torch.randn(2, 2, n, 128, device=dev, dtype=dt), torch.randn(2, 2, n, 128, device=dev, dtype=dt)
    outs = _decode_both(variant, q, k, v, length, t)
    rows = slice(length, n)
    i = torch.arange(length, n, device=dev)[:, None]
    j = torch.arange(n, device=dev)[None, :]
    vis = j <= i
    if left is not None:
        glob = torch.zeros(n, dtype=torch.bool, device=dev)
        glob[gpos] = True
        vis = vis & ((j >= i - left) | glob[None, :])
    ref = softmax_truth(q[:, :, rows], k, v, vis)
    torch_err = (outs["torch"][0].double() - ref).abs().max().item()
    err = (outs["triton"][0].double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gpu_performer_long_prefill_bf16(kernel: str) -> None:
    variant = av.PerformerAttention(num_features=256, kernel=kernel)
    n, t = 16384 + 8, 4
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(2, 8, n, 128, device=dev, dtype=dt)
    k, v = torch.randn(2, 2, n, 128, device=dev, dtype=dt), torch.randn(2, 2, n, 128, device=dev, dtype=dt)
    outs = _decode_both(variant, q, k, v, n - 2 * t, t)
    (a, sa), (b, sb) = outs["triton"], outs["torch"]
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sa.kv, sb.kv, rtol=1e-4, atol=1e-4)
