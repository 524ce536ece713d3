"""Key padding (``key_padding_mask``) in the fused Triton kernels, under the interpreter.

The kernels see no dense mask: an int8 key-valid vector ``(B, Nk)`` is folded into the masks of
each key tile (softmax kernels, plus the per-batch range of real keys that clips their block
schedule) and into the key rows of the FAVOR+ kernels. Outputs and gradients are checked against
the float64 ground truth of :mod:`attn_bench.core.numerics`, which applies the padding on its own. The
interpreter tiles are 32 queries x 16 keys (softmax) and chunks of 64 positions (FAVOR+ causal),
so the masks below leave whole key blocks padded, cut blocks in the middle and leave holes.
bfloat16 and long sequences run in tests/test_flash_gpu.py and tests/test_favor_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_backend, favor_impl, make_qkv

import attention_variants as av
from attn_kernels import favor, favor_chunk, flash_attention, tuning
from attn_kernels.flash_configs import FlashConfig

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

FP32 = pytest.param(torch.float32, id="fp32")
FP16 = pytest.param(torch.float16, id="fp16")
CAUSAL = [pytest.param(False, id="noncausal"), pytest.param(True, id="causal")]


def padding_mask(b: int, nk: int) -> torch.Tensor:
    """Element 0 left-padded, 1 right-padded, 2 all padded, 3 real keys in the middle only with a
    hole (whole key blocks padded on both sides), 4 and more unpadded."""
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[0, : nk // 3 + 1] = False
    mask[1, nk - nk // 4 :] = False
    mask[2] = False
    if b > 3:
        mask[3] = False
        mask[3, nk // 2 - 12 : nk // 2 + 11] = True
        mask[3, nk // 2 : nk // 2 + 3] = False
    return mask


# (name, variant, (B, H, Hk, Nq, Nk, D), causal, dtype)
SOFTMAX_CASES = [
    ("full", av.FullAttention(), (4, 2, 1, 61, 61, 32), False, FP32),
    ("full", av.FullAttention(), (4, 2, 1, 61, 61, 32), True, FP32),
    ("full", av.FullAttention(), (4, 2, 1, 61, 61, 32), True, FP16),
    ("full", av.FullAttention(), (4, 2, 2, 23, 70, 16), True, FP32),  # Nq < Nk
    ("full", av.FullAttention(), (4, 2, 2, 70, 33, 16), True, FP16),  # Nq > Nk: leading rows see nothing
    ("window", av.SlidingWindowAttention(3), (4, 2, 1, 77, 77, 16), True, FP32),  # rows that see only padding
    ("window", av.SlidingWindowAttention((20, 9)), (4, 2, 2, 80, 80, 32), False, FP16),
    # Global positions 0 and 41 are padded in some elements: a padded global key is invisible.
    ("global", av.SlidingWindowAttention((9, 4), global_tokens=[0, 5, 41]), (4, 2, 1, 80, 80, 16), True, FP32),
    ("global", av.SlidingWindowAttention((9, 4), global_tokens=[0, 5, 41]), (4, 2, 1, 72, 72, 16), False, FP16),
]


def _softmax_id(case) -> str:
    name, _, (b, h, hk, nq, nk, d), causal, dtype = case
    return f"{name}-B{b}-H{h}-Hk{hk}-Nq{nq}-Nk{nk}-D{d}-{'causal' if causal else 'noncausal'}-{dtype.id}"


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_softmax_id)
def test_softmax_kernels_with_padding(case) -> None:
    _, variant, (b, h, hk, nq, nk, d), causal, dtype = case
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype.values[0])
    check_backend(variant, "triton", q, k, v, causal=causal, key_padding_mask=padding_mask(b, nk))


HOPPER_CASES = [
    ("full", av.FullAttention(), (4, 2, 1, 61, 61, 32), True, FP16),
    ("global", av.SlidingWindowAttention((9, 4), global_tokens=[0, 5, 41]), (4, 2, 1, 80, 80, 16), True, FP32),
]


@pytest.mark.parametrize("case", HOPPER_CASES, ids=_softmax_id)
def test_hopper_paths_with_padding(case) -> None:
    """The sm_90 paths, forced at small tiles: key and value tiles by TMA descriptors (interior
    tiles load the key-valid flags unmasked), and the atomic backward config, which padding
    turns into the split launches."""
    _, variant, (b, h, hk, nq, nk, d), causal, dtype = case
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype.values[0])
    fwd, bwd = FlashConfig(16, 16, 4, 1, tma=True), FlashConfig(16, 32, 4, 1, bwd="atomic")
    with tuning.forced({"flash_fwd": fwd, "flash_bwd": bwd}):
        check_backend(variant, "triton", q, k, v, causal=causal, key_padding_mask=padding_mask(b, nk))


# (kernel, (B, H, Hk, Nq, Nk, D), m, causal, dtype, implementation); causal chunks are 64 positions.
FAVOR_CASES = [
    ("softmax", (4, 2, 1, 70, 70, 16), 32, False, FP32, "chunk"),
    ("softmax", (4, 2, 1, 70, 70, 16), 32, True, FP32, "chunk"),
    ("softmax", (4, 1, 1, 50, 75, 32), 16, True, FP16, "chunk"),  # Nq != Nk
    ("relu", (4, 2, 1, 66, 66, 16), 16, True, FP32, "chunk"),
    ("relu", (4, 2, 1, 70, 70, 16), 16, False, FP16, "chunk"),
    ("softmax", (4, 2, 1, 70, 70, 16), 32, True, FP32, "legacy"),
    ("relu", (4, 2, 1, 70, 70, 16), 16, False, FP16, "legacy"),
]


def _favor_id(case) -> str:
    kernel, (b, h, hk, nq, nk, d), m, causal, dtype, impl = case
    form = "causal" if causal else "noncausal"
    return f"{impl}-{kernel}-B{b}-H{h}-Hk{hk}-Nq{nq}-Nk{nk}-D{d}-m{m}-{form}-{dtype.id}"


@pytest.mark.parametrize("case", FAVOR_CASES, ids=_favor_id)
def test_favor_kernels_with_padding(case) -> None:
    kernel, (b, h, hk, nq, nk, d), m, causal, dtype, impl = case
    variant = av.PerformerAttention(num_features=m, kernel=kernel, seed=5)
    q, k, v = make_qkv(b, h, hk, nq, nk, d, dtype=dtype.values[0])
    with favor_impl(impl):
        check_backend(variant, "triton", q, k, v, causal=causal, key_padding_mask=padding_mask(b, nk))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(
    "variant",
    [av.FullAttention(), av.SlidingWindowAttention(4, global_tokens=2), av.PerformerAttention(num_features=16)],
    ids=["full", "global", "performer"],
)
def test_rows_without_a_real_key_are_zero_with_zero_gradients(variant, causal: bool) -> None:
    """Element 1 is all padding: its output and every gradient are exactly 0, nothing is NaN."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 1, 40, 40, 16))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1] = False
    out = variant(q, k, v, causal=causal, backend="triton", key_padding_mask=mask)
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
        assert (t[1] == 0).all()
    assert out[0].abs().sum() > 0 and k.grad[0].abs().sum() > 0


@pytest.mark.parametrize("causal", CAUSAL)
def test_favor_stabiliser_ignores_padded_keys(causal: bool) -> None:
    """Padded keys whose exponents dwarf the real ones (about 200 against -2 +- 25): were they in
    the key maximum, every real key's float32 feature would underflow and the rows would be 0."""
    b, h, n, d = 4, 1, 70, 16
    w = torch.randn(8, d, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True) * 20.0
    variant = av.PerformerAttention(projection=w)
    q, k, v = make_qkv(b, h, h, n, n, d)
    mask = padding_mask(b, n)
    exciting = (w * d**0.25).float()[torch.arange(n) % w.shape[0]]  # k' = k * scale ** 0.5 = w_f
    k = torch.where(mask[:, None, :, None], k, exciting)
    check_backend(variant, "triton", q, k, v, causal=causal, key_padding_mask=mask)


def _recorded_flags(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[tuple[bool, object]]:
    """Spy on ``module.name``: ``(HAS_PAD, STAB)`` of every launch."""
    flags: list[tuple[bool, object]] = []
    inner = getattr(module, name)

    def spy(*args, **kwargs):
        flags.append((kwargs.get("HAS_PAD"), kwargs.get("STAB")))
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return flags


@pytest.mark.parametrize(
    ("variant", "module", "name", "impl"),
    [
        (av.SlidingWindowAttention(5, global_tokens=1), flash_attention, "launch", "chunk"),
        (av.PerformerAttention(num_features=16), favor_chunk, "_launch", "chunk"),
        (av.PerformerAttention(num_features=16), favor, "_launch", "legacy"),
    ],
    ids=["softmax", "favor", "favor-legacy"],
)
def test_no_mask_launches_the_unpadded_specialisation(variant, module, name, impl, monkeypatch) -> None:
    """Without a mask every launch is the ``HAS_PAD=False`` specialisation (today's kernels);
    with one, every launch that reads keys takes it (all but the backward's delta kernel and
    the FAVOR+ query-side states, ``STAB=2``; the chunked FAVOR+ kernels: the key features, in
    the forward and the backward, and dK/dV)."""
    flags = _recorded_flags(monkeypatch, module, name)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 1, 20, 20, 16))
    with favor_impl(impl):
        variant(q, k, v, causal=True, backend="triton").sum().backward()
    assert flags and all(pad is False or pad is None for pad, _ in flags)
    flags.clear()
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :3] = False
    with favor_impl(impl):
        variant(q, k, v, causal=True, backend="triton", key_padding_mask=mask).sum().backward()
    key_launches = [pad for pad, stab in flags if pad is not None and stab != 2]
    assert len(key_launches) >= 3 and all(key_launches)


def test_padding_args_ranges() -> None:
    """The per-batch ``(first, last + 1)`` range of real keys, ``(0, 0)`` when there is none."""
    mask = padding_mask(4, 20)
    valid, key_range = flash_attention.padding_args(mask)
    assert valid.dtype == torch.int8 and torch.equal(valid.bool(), mask)
    for row, (first, end) in zip(mask, key_range.tolist(), strict=True):
        real = row.nonzero().flatten().tolist()
        assert (first, end) == ((real[0], real[-1] + 1) if real else (0, 0))
