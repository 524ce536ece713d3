"""Fused Triton FAVOR+ kernels under the interpreter (``TRITON_INTERPRET=1``) on CPU tensors.

Forward and backward against the float64 dense FAVOR+ formula with the same projection, through
the shared tolerance policy. The cases run the implementation the backend uses (the chunked
kernels, :mod:`attn_kernels.favor_chunk`); the legacy kernels (:mod:`attn_kernels.favor`), which
the tuner may still pick, run a subset and each of their configs. Both work in chunks of 64
positions, so the lengths put chunk boundaries inside the sequence (113, 200) and at its end (64);
the non-causal key states of the chunked kernels are summed over two splits of N here (the
combine kernel) as soon as N has two chunks. bfloat16 is left to the compile and GPU tests:
``tl.dot`` on bfloat16 is wrong under the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import check_backend, favor_impl, make_qkv

import attention_variants as av
from attn_kernels import favor, favor_chunk, favor_chunk_configs, favor_configs, favor_kernels, launch, tuning

pytestmark = pytest.mark.interpreter


@dataclass(frozen=True)
class Case:
    b: int
    h: int
    hk: int
    nq: int
    nk: int
    d: int
    m: int
    causal: bool
    kernel: str = "softmax"
    dtype: torch.dtype = torch.float32
    dv: int | None = None

    @property
    def id(self) -> str:
        kv = f"-Hk{self.hk}" if self.hk != self.h else ""
        n = f"N{self.nq}" if self.nq == self.nk else f"Nq{self.nq}-Nk{self.nk}"
        dv = f"-Dv{self.dv}" if self.dv is not None else ""
        parts = [f"B{self.b}-H{self.h}{kv}-{n}-D{self.d}{dv}-m{self.m}"]
        if self.causal:
            parts.append("causal")
        if self.kernel != "softmax":
            parts.append(self.kernel)
        parts.append(str(self.dtype).removeprefix("torch."))
        return "-".join(parts)


CASES = [
    # every length, both forms
    Case(1, 2, 2, 1, 1, 16, 16, causal=False),
    Case(1, 2, 2, 1, 1, 16, 16, causal=True),
    Case(1, 2, 2, 17, 17, 16, 64, causal=True),
    Case(2, 2, 2, 17, 17, 40, 16, causal=False),
    Case(1, 2, 2, 64, 64, 64, 64, causal=True),  # chunk boundary at the end
    Case(1, 2, 2, 64, 64, 40, 256, causal=False),
    Case(2, 2, 2, 113, 113, 64, 64, causal=True),  # boundary inside
    Case(1, 2, 2, 113, 113, 16, 256, causal=False),
    Case(1, 2, 2, 200, 200, 40, 64, causal=True),  # three boundaries inside
    Case(1, 1, 1, 200, 200, 64, 16, causal=False),
    # grouped-query attention
    Case(1, 4, 2, 113, 113, 64, 64, causal=True),
    Case(1, 4, 1, 64, 64, 16, 64, causal=False),
    # bottom-right alignment: more keys than queries, and more queries than keys (empty rows)
    Case(1, 2, 1, 17, 113, 40, 64, causal=True),
    Case(1, 2, 2, 113, 64, 16, 16, causal=True),
    Case(1, 2, 2, 64, 200, 16, 64, causal=False),
    # relu features
    Case(1, 2, 2, 113, 113, 40, 64, causal=True, kernel="relu"),
    Case(1, 4, 2, 64, 64, 64, 16, causal=False, kernel="relu"),
    # value head dim different from the key head dim
    Case(1, 2, 2, 113, 113, 64, 64, causal=True, dv=16),
    # float16
    Case(1, 2, 2, 113, 113, 64, 64, causal=True, dtype=torch.float16),
    Case(1, 2, 1, 200, 200, 40, 256, causal=False, dtype=torch.float16),
    Case(1, 2, 1, 17, 17, 16, 16, causal=True, kernel="relu", dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_matches_reference(case: Case) -> None:
    variant = av.PerformerAttention(num_features=case.m, kernel=case.kernel, seed=1)
    q, k, v = make_qkv(case.b, case.h, case.hk, case.nq, case.nk, case.d, case.dv, dtype=case.dtype)
    check_backend(variant, "triton", q, k, v, causal=case.causal)


LEGACY_CASES = [
    Case(1, 4, 2, 70, 70, 32, 32, causal=True),
    Case(1, 2, 2, 64, 200, 16, 64, causal=False),
    Case(1, 2, 2, 113, 64, 16, 16, causal=True, kernel="relu"),
    Case(1, 2, 1, 200, 200, 40, 256, causal=False, dtype=torch.float16),
]


@pytest.mark.parametrize("case", LEGACY_CASES, ids=lambda c: c.id)
def test_legacy_kernels_match_reference(case: Case) -> None:
    """The legacy FAVOR+ kernels, a candidate of the tuner's ``favor_impl`` switch."""
    variant = av.PerformerAttention(num_features=case.m, kernel=case.kernel, seed=1)
    q, k, v = make_qkv(case.b, case.h, case.hk, case.nq, case.nk, case.d, case.dv, dtype=case.dtype)
    with favor_impl("legacy"):
        check_backend(variant, "triton", q, k, v, causal=case.causal)


CHUNK_KERNELS = list(favor_chunk_configs.CONFIGS)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel", CHUNK_KERNELS)
def test_every_chunk_config(kernel: str, causal: bool) -> None:
    """Each candidate config of a chunked kernel alone (the others at their defaults), on a shape
    with a chunk boundary inside, GQA and Dv != D; what the tuner may pick must be right."""
    variant = av.PerformerAttention(num_features=64, seed=3)
    q, k, v = make_qkv(1, 2, 1, 100, 100, 32, 16)
    shape = launch.LaunchShape(32, 4, causal, m_pad=64)
    for cfg in favor_chunk_configs.candidates(kernel, shape):
        with tuning.forced({"favor_" + kernel: cfg}) as seen:
            check_backend(variant, "triton", q, k, v, causal=causal)
        assert ("favor_" + kernel, shape) in seen, f"{kernel} {cfg} never launched"


def test_chunk_forward_projects_each_token_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One feature pass over the keys and one query pass per forward (each token projected once),
    no autograd function without a gradient to compute, float16 features unless a float16
    gradient is wanted (then the float32 path)."""
    launched: list[tuple[str, torch.dtype]] = []
    real = favor_chunk._launch

    def spy(fn, grid, cfg, args, **kw):
        launched.append((fn.__name__, args[2].dtype))  # the feature pass's third argument: its output
        return real(fn, grid, cfg, args, **kw)

    monkeypatch.setattr(favor_chunk, "_launch", spy)
    variant = av.PerformerAttention(num_features=32, seed=4)
    q, k, v = make_qkv(1, 2, 2, 100, 100, 16, dtype=torch.float16)
    out = variant(q, k, v, causal=True, backend="triton")
    assert [name for name, _ in launched] == ["_key_features_kernel", "_state_kernel", "_fwd_kernel"]
    assert out.grad_fn is None and launched[0][1] == torch.float16
    launched.clear()
    variant(q, k, v, causal=False, backend="triton")
    assert [name for name, _ in launched] == ["_key_features_kernel", "_state_kernel", "_combine_kernel", "_fwd_kernel"]
    launched.clear()
    out = variant(q.requires_grad_(), k, v, causal=True, backend="triton")
    assert out.grad_fn is not None and launched[0][1] == torch.float32
    out.sum().backward()
    names = [name for name, _ in launched[3:]]
    assert names == ["_key_features_kernel", "_state_kernel", "_dq_kernel", "_state_kernel", "_dk_kernel", "_dv_kernel"]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_explicit_scale_and_given_projection(causal: bool) -> None:
    w = torch.randn(48, 40)
    variant = av.PerformerAttention(projection=w)
    q, k, v = make_qkv(1, 2, 2, 70, 70, 40)
    check_backend(variant, "triton", q, k, v, causal=causal, scale=0.3)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_fp16_large_norms_stay_finite(causal: bool) -> None:
    """fp16 inputs scaled by 5: logits of order -100 must not overflow, underflow to NaN or inf."""
    variant = av.PerformerAttention(num_features=64, seed=2)
    q, k, v = (t * 5 for t in make_qkv(1, 2, 2, 113, 113, 64, dtype=torch.float16))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = variant(q, k, v, causal=causal, backend="triton")
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"d{name} is not finite"
    # The output is still the FAVOR+ average (up to float16 rounding).
    ref = variant(q.detach().double(), k.detach().double(), v.detach().double(), causal=causal, backend="reference")
    assert (out.double() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_rows_without_keys_are_zero_with_zero_gradient() -> None:
    variant = av.PerformerAttention(num_features=32)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 90, 20, 16))
    out = variant(q, k, v, causal=True, backend="triton")
    assert torch.equal(out[:, :, :70], torch.zeros_like(out[:, :, :70]))
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad[:, :, :70], torch.zeros_like(q.grad[:, :, :70]))
    assert torch.isfinite(out).all() and torch.isfinite(k.grad).all()


def test_non_contiguous_inputs() -> None:
    variant = av.PerformerAttention(num_features=32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(1, 3, 3, 40, 40, 16))
    assert not q.is_contiguous()
    check_backend(variant, "triton", q, k, v, causal=True)


def test_supports_reasons() -> None:
    cpu = torch.device("cpu")
    variant = av.PerformerAttention(num_features=64)
    assert favor.unsupported_reason(variant, cpu, torch.float16, 64) is None
    assert "float64" in favor.unsupported_reason(variant, cpu, torch.float64, 64)
    assert "head dim" in favor.unsupported_reason(variant, cpu, torch.float32, favor_configs.MAX_HEAD_DIM + 1)
    too_many = av.PerformerAttention(num_features=favor_configs.MAX_FEATURES + 1)
    assert "random features" in favor.unsupported_reason(too_many, cpu, torch.float32, 64)
    # Through the public API: the reason reaches the error message.
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, dtype=torch.float64)
    assert not variant.supports("triton", cpu, torch.float64, 16)
    with pytest.raises(ValueError, match="float64"):
        variant(q, k, v, backend="triton")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_keys_with_a_large_common_offset(causal: bool) -> None:
    """Keys far from the origin: large negative logits, a key stabiliser far from zero."""
    variant = av.PerformerAttention(num_features=32)
    q, k, v = make_qkv(1, 2, 2, 70, 70, 16, dtype=torch.float64)
    shifted = k + 4.0
    out = variant(q.float(), shifted.float(), v.float(), causal=causal, backend="triton")
    ref = variant(q, shifted, v, causal=causal, backend="reference")
    assert (out.double() - ref).abs().max().item() < 1e-4


KERNEL_FNS = {
    "key_max": favor_kernels._key_max_kernel,
    "state": favor_kernels._state_kernel,
    "fwd": favor_kernels._fwd_kernel,
    "bwd_dq": favor_kernels._bwd_dq_kernel,
    "bwd_dkv": favor_kernels._bwd_dkv_kernel,
}


@pytest.mark.parametrize(
    ("kernel", "causal"),
    [
        (kernel, causal)
        for kernel in favor_configs.CONFIGS
        for causal in (False, True)
        if (kernel, causal) != ("key_max", True)
    ],
    ids=lambda x: x if isinstance(x, str) else ("causal" if x else "noncausal"),
)
def test_every_shipped_config(kernel: str, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each config of a legacy ``kernel`` alone (the others' first kept config) on a shape with boundaries."""
    variant = av.PerformerAttention(num_features=64, seed=3)
    q, k, v = make_qkv(1, 2, 1, 100, 100, 32)
    for cfg in favor_configs.CONFIGS[kernel]:
        if causal and kernel in ("fwd", "bwd_dq", "bwd_dkv") and favor_configs.CHUNK % cfg.block_m:
            continue
        monkeypatch.setitem(favor_configs.CONFIGS, kernel, (cfg,))
        with favor_impl("legacy"):
            check_backend(variant, "triton", q, k, v, causal=causal)


@pytest.mark.parametrize("kernel", list(favor_configs.CONFIGS))
def test_autotuner_builds(kernel: str) -> None:
    """The GPU path wraps each kernel in ``triton.autotune`` with keys that are its arguments."""
    shape = launch.LaunchShape(64, 2, causal=False, m_pad=256)
    configs = favor_configs.CONFIGS[kernel]
    row, keys = favor_configs.ROW_BLOCK.get(kernel), favor_configs.TUNE_KEYS
    tuned = launch.autotuner(KERNEL_FNS[kernel], configs, {"test": True}, row=row, inner="BLOCK_F", tune_keys=keys)
    assert len(tuned.configs) == len(favor_configs.CONFIGS[kernel])
    assert favor_configs.kept_configs(kernel, shape)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_buffers_stay_linear_in_n(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """No buffer the kernels allocate approaches ``N x m x Dv``: the largest are ``O(N (m + Dv))``
    (the chunk states and a feature buffer ``N x m`` share one allocation)."""
    b, h, n, d, dv, m = 1, 2, 256, 32, 32, 64
    sizes: list[int] = []
    for name in ("empty", "zeros", "empty_like", "zeros_like"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **kw: _record(sizes, _real(*a, **kw)))
    variant = av.PerformerAttention(num_features=m)
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, h, n, n, d, dv))
    variant(q, k, v, causal=causal, backend="triton").sum().backward()
    chunk_states = b * h * (n // favor_configs.CHUNK + 1) * m * dv
    assert max(sizes) <= chunk_states + b * h * (n + favor_configs.CHUNK) * max(d, dv, m), max(sizes)
    assert max(sizes) * 8 <= b * h * n * m * dv


def _record(sizes: list[int], t: torch.Tensor) -> torch.Tensor:
    sizes.append(t.numel())
    return t
