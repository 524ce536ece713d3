"""The peer adapters (bench/attn_bench/baselines/peer_*.py) against our float64 reference.

local-attention and performer-pytorch run here when installed (``pip install .[peers]``),
else their tests skip. flash-attn and xformers are CUDA only: their ``check`` reasons are
tested here, and their adapters' layout, grouped-query and mask mapping run on the CPU
against stand-ins written from the libraries' documented semantics (their docstrings),
independent of attention_variants.masks.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types

import pytest
import torch
from helpers import make_qkv, max_err
from torch import Tensor

import attention_variants as av
from attn_bench.baselines import peers
from attn_bench.baselines.peer import import_reason
from attn_bench.baselines.peer_local_attention import local_attention_params
from attn_bench.baselines.registry import make_target
from attn_bench.baselines.target import Unsupported
from attn_bench.core.numerics import check, check_target

DTYPES = [torch.float32, torch.float64]


def _check_peer(
    name: str,
    variant: av.AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float | None = None,
    grad: bool = False,
) -> None:
    """The peer's output (and gradients) against the float64 ground truth, through the harness's checker."""
    sc = av.checks.resolve_scale(scale, q.shape[-1])
    fn = peers.get_peer(name).make(variant, q, k, v, causal, sc)
    res = check(fn, variant, q, k, v, causal, scale=sc, grads=grad, approx=False)
    assert res.ok, res.message


# ---------------------------------------------------------------------------------------------
# check(): reasons that need no peer installed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_missing_package_gives_reason(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    peer = peers.PEERS[name]
    monkeypatch.setitem(sys.modules, peer.module, None)  # makes `import <module>` raise ImportError
    variant = av.get_variant(peer.variants[0], **({"window": 4} if peer.variants[0] == "sliding_window" else {}))
    device = torch.device(peer.devices[-1])
    reason = peer.check(variant, device, torch.float16, 64, False)
    assert reason is not None and "not installed" in reason and peer.install in reason


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_kvcache", "xformers"])
def test_cuda_peers_refuse_cpu(name: str) -> None:
    reason = peers.PEERS[name].check(av.FullAttention(), torch.device("cpu"), torch.float16, 64, False)
    assert reason is not None and "CUDA only" in reason


def test_variant_not_served() -> None:
    reason = peers.PEERS["local_attention"].check(av.get_variant("performer"), "cpu", torch.float32, 64, False)
    assert reason is not None and "sliding_window only" in reason
    reason = peers.PEERS["performer_pytorch"].check(av.FullAttention(), "cpu", torch.float32, 64, False)
    assert reason is not None and "performer only" in reason


def test_unknown_peer() -> None:
    with pytest.raises(ValueError, match="peers are"):
        peers.get_peer("nope")


@pytest.mark.parametrize(
    ("left", "right", "causal", "expected"),
    [
        (128, 128, False, (128, 1, 1)),
        (128, 0, True, (128, 1, 0)),
        (8, 4, False, (4, 2, 1)),
        (0, 6, False, (6, 0, 1)),
        (0, 0, False, (1, 0, 0)),
        (5, 3, False, (1, 5, 3)),
    ],
)
def test_local_attention_params(left: int, right: int, causal: bool, expected: tuple[int, int, int]) -> None:
    p = local_attention_params(left, right, causal)
    assert (p["window_size"], p["look_backward"], p["look_forward"]) == expected
    assert p["window_size"] * p["look_backward"] == left and p["window_size"] * p["look_forward"] == right
    assert p["exact_windowsize"] and p["causal"] == causal and not p["use_rotary_pos_emb"] and p["dropout"] == 0


def test_exact_peers_report_no_deviation() -> None:
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8)
    variant = av.get_variant("sliding_window", window=2)
    for name in ("local_attention", "flash_attn", "flash_attn_kvcache", "xformers"):
        assert peers.semantic_deviation(name, variant, q, k, v, True) == 0.0


# ---------------------------------------------------------------------------------------------
# local-attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    ("h", "hk", "n", "window"),
    [(2, 2, 64, 16), (4, 2, 77, 8), (4, 1, 37, (8, 4)), (2, 2, 45, (5, 3)), (2, 1, 33, (0, 6)), (2, 2, 20, 100)],
)
def test_local_attention_matches_reference(dtype, causal, h, hk, n, window) -> None:
    pytest.importorskip("local_attention")
    variant = av.get_variant("sliding_window", window=window)
    assert peers.PEERS["local_attention"].check(variant, "cpu", dtype, 16, True) is None
    q, k, v = make_qkv(2, h, hk, n, n, 16, 12, dtype=dtype)
    _check_peer("local_attention", variant, q, k, v, causal, scale=0.3 if n == 45 else None, grad=n == 77)


def test_local_attention_refusals() -> None:
    pytest.importorskip("local_attention")
    peer = peers.PEERS["local_attention"]
    reason = peer.check(av.get_variant("sliding_window", window=4, global_tokens=2), "cpu", torch.float32, 16, False)
    assert reason is not None and "global tokens" in reason
    variant = av.get_variant("sliding_window", window=4)
    q, k, v = make_qkv(1, 2, 2, 10, 12, 16)
    with pytest.raises(Unsupported, match="Nq == Nk"):
        peer.make(variant, q, k, v, False, 0.25)


# ---------------------------------------------------------------------------------------------
# performer-pytorch
# ---------------------------------------------------------------------------------------------


def _performer_eps(monkeypatch: pytest.MonkeyPatch, feature: float, causal: float) -> None:
    """Set performer-pytorch's two epsilons (its module functions are looked up at call / init time)."""
    pp = pytest.importorskip("performer_pytorch.performer_pytorch")
    monkeypatch.setattr(pp, "softmax_kernel", functools.partial(pp.softmax_kernel, eps=feature))
    noncuda = functools.partial(pp.causal_linear_attention_noncuda, eps=causal)
    noncuda.__name__ = "causal_linear_attention_noncuda"  # type: ignore[attr-defined]
    monkeypatch.setattr(pp, "causal_linear_attention_noncuda", noncuda)


PERFORMER_SHAPES = [(2, 2, 64, 64), (4, 2, 77, 77), (4, 1, 50, 77)]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("h", "hk", "nq", "nk"), PERFORMER_SHAPES)
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_mapping_is_exact_without_its_epsilons(monkeypatch, causal, h, hk, nq, nk, kernel) -> None:
    """With its 1e-4 and 1e-6 set to 0 the peer computes our FAVOR+ (same W, same scale) in float64."""
    if causal and nq != nk:
        pytest.skip("causal needs Nq == Nk (tested in test_performer_refusals_and_rng)")
    _performer_eps(monkeypatch, 0.0, 0.0)
    variant = av.get_variant("performer", num_features=48, kernel=kernel, seed=3)
    q, k, v = make_qkv(1, h, hk, nq, nk, 16, 8, dtype=torch.float64)
    for scale in (None, 0.07):
        assert peers.semantic_deviation("performer_pytorch", variant, q, k, v, causal, scale) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("h", "hk", "nq", "nk"), PERFORMER_SHAPES)
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_gated_on_its_own_math_with_the_deviation_reported(dtype, causal, h, hk, nq, nk, kernel) -> None:
    """As the sweep gates it: against its own math in float64 (its epsilons included), with the
    distance of that math from our float64 reference reported as ``semantic_dev``, recomputed
    here independently; a wrong output still fails."""
    pytest.importorskip("performer_pytorch")
    if causal and nq != nk:
        pytest.skip("causal needs Nq == Nk")
    variant = av.get_variant("performer", num_features=64, kernel=kernel)
    q, k, v = make_qkv(2, h, hk, nq, nk, 16, dtype=dtype)
    target = make_target(variant, "performer_pytorch", q, k, v, causal)
    assert target.ground_truth is not None
    res = check_target(target, q, k, v, causal)
    assert res.ok, res.message
    assert "semantic_dev" in res.message
    q64, k64, v64 = q.double(), k.double(), v.double()
    peer64 = peers.get_peer("performer_pytorch").make(variant, q64, k64, v64, causal, 16**-0.5)(q64, k64, v64)
    assert res.semantic_dev == pytest.approx(
        max_err(peer64, variant.reference(q64, k64, v64, causal=causal)), abs=1e-12
    )
    if kernel == "softmax" or causal:
        assert res.semantic_dev > 1e-9  # the epsilons show
    else:
        assert res.semantic_dev < 1e-12  # relu(W x') + 1e-3 is ours, and non-causal has no normaliser epsilon
    wrong = dataclasses.replace(target, fn=lambda a, b, c: target.fn(a, b, c) * 1.01)
    assert not check_target(wrong, q, k, v, causal).ok


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_performer_deviation_small_on_small_inputs(causal) -> None:
    """On inputs of small norm its features stay far above 1e-4 and the deviation is small."""
    pytest.importorskip("performer_pytorch")
    variant = av.get_variant("performer", num_features=64)
    q, k, v = make_qkv(1, 2, 2, 128, 128, 16, dtype=torch.float64)
    dev = peers.semantic_deviation("performer_pytorch", variant, q * 0.25, k * 0.25, v, causal)
    assert 0 < dev < 1e-2


def test_performer_refusals_and_rng() -> None:
    pytest.importorskip("performer_pytorch")
    peer = peers.PEERS["performer_pytorch"]
    variant = av.get_variant("performer", num_features=32)
    q, k, v = make_qkv(1, 2, 2, 10, 12, 16)
    with pytest.raises(Unsupported, match="Nq == Nk"):
        peer.make(variant, q, k, v, True, 0.25)
    state = torch.get_rng_state()
    peer.make(variant, q, k, v, False, 0.25)
    assert torch.equal(state, torch.get_rng_state()), "building the peer must not consume the caller's RNG"


# ---------------------------------------------------------------------------------------------
# flash-attn and xformers adapters, against stand-ins written from their documentation
# ---------------------------------------------------------------------------------------------


def _dense_bnhd(q, k, v, scale, keep) -> Tensor:
    """Softmax attention on (B, N, H, D) with k/v heads already matching; ``keep (Nq, Nk)``; empty rows NaN."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


def _fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """flash_attn_func as its docstring states it (bottom-right causal, window, GQA, empty rows 0)."""
    assert dropout_p == 0.0 and q.stride(-1) == 1
    nq, nk, h, hk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    left, right = window_size
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    if causal:
        keep &= j <= i
    rep = h // hk  # query head h reads kv head h // rep
    out = _dense_bnhd(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), softmax_scale, keep)
    return out.nan_to_num(0.0)


def _fake_flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None, causal=False, window_size=(-1, -1)
):
    """flash_attn_with_kvcache as its docstring states it, for a full cache (no new k/v, no
    cache_seqlens): the same mask and GQA as flash_attn_func; k_cache needs a unit last stride."""
    assert k is None and v is None and cache_seqlens is None
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    return _fake_flash_attn_func(
        q, k_cache, v_cache, softmax_scale=softmax_scale, causal=causal, window_size=window_size
    )


def _fake_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        flash_attn_func=_fake_flash_attn_func, flash_attn_with_kvcache=_fake_flash_attn_with_kvcache
    )
    monkeypatch.setitem(sys.modules, "flash_attn", fake)


def _fake_xformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """xformers.ops.memory_efficient_attention and the two bottom-right biases, as documented
    (their materialize() formulas); rows with no visible key come out NaN, as a softmax of -inf."""

    class LowerTriangularFromBottomRightMask:
        def keep(self, nq, nk):
            return torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)

    class LocalAttentionFromBottomRightMask:
        def __init__(self, window_left, window_right):
            self.window_left, self.window_right = window_left, window_right

        def keep(self, nq, nk):
            shift = nk - nq
            ones = torch.ones(nq, nk, dtype=torch.bool)
            return ones.triu(shift - self.window_left).tril(shift + self.window_right)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert p == 0.0 and query.ndim == 4 and key.shape[2] == query.shape[2]
        nq, nk = query.shape[1], key.shape[1]
        keep = torch.ones(nq, nk, dtype=torch.bool) if attn_bias is None else attn_bias.keep(nq, nk)
        return _dense_bnhd(query, key, value, scale, keep)

    bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    bias.LowerTriangularFromBottomRightMask = LowerTriangularFromBottomRightMask  # type: ignore[attr-defined]
    bias.LocalAttentionFromBottomRightMask = LocalAttentionFromBottomRightMask  # type: ignore[attr-defined]
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.attn_bias = bias  # type: ignore[attr-defined]
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha  # type: ignore[attr-defined]
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    root = types.ModuleType("xformers")
    root.ops = ops  # type: ignore[attr-defined]
    for name, mod in (("xformers", root), ("xformers.ops", ops), ("xformers.ops.fmha", fmha)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha.attn_bias", bias)


CUDA_PEER_CASES = [
    ("full", None, 2, 2, 33, 33),
    ("full", None, 4, 2, 20, 45),
    ("full", None, 4, 1, 45, 20),  # causal: the first 25 queries see no key
    ("sliding_window", 4, 4, 2, 37, 37),
    ("sliding_window", (6, 2), 2, 1, 30, 41),
    ("sliding_window", (3, 1), 2, 2, 41, 30),  # rows with no key, causal or not
    ("full", None, 8, 2, 1, 50),  # a decoding step: one query against the cache
    ("sliding_window", 7, 4, 1, 1, 50),
]


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_kvcache", "xformers"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("vname", "window", "h", "hk", "nq", "nk"), CUDA_PEER_CASES)
def test_cuda_peer_adapters_against_documented_semantics(monkeypatch, name, causal, vname, window, h, hk, nq, nk):
    if name.startswith("flash_attn"):
        _fake_flash_attn(monkeypatch)
    else:
        _fake_xformers(monkeypatch)
    variant = av.get_variant(vname, **({} if window is None else {"window": window}))
    q, k, v = make_qkv(2, h, hk, nq, nk, 16, dtype=torch.float64)
    scale = 0.2
    out = peers.get_peer(name).make(variant, q, k, v, causal, scale)(q, k, v)
    ref = variant.reference(q, k, v, causal=causal, scale=scale)
    assert out.shape == ref.shape
    assert max_err(out, ref) < 1e-12


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_kvcache"])
def test_flash_attn_refuses_value_dim(monkeypatch, name: str) -> None:
    _fake_flash_attn(monkeypatch)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 8)
    with pytest.raises(Unsupported, match="value head dim"):
        peers.get_peer(name).make(av.FullAttention(), q, k, v, False, 0.25)


def test_flash_attn_kvcache_is_forward_only() -> None:
    reason = peers.get_peer("flash_attn_kvcache").check_options(
        av.FullAttention(), torch.device("cuda"), torch.float16, 64, True
    )
    assert reason is not None and "forward only" in reason


def test_cuda_peer_checks_on_cuda_device_strings(monkeypatch) -> None:
    """dtype and global-token refusals come before any CUDA query (no GPU needed)."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace())
    _fake_xformers(monkeypatch)
    sw = av.get_variant("sliding_window", window=4, global_tokens=1)
    for name in ("flash_attn", "flash_attn_kvcache", "xformers"):
        peer = peers.get_peer(name)
        assert "global tokens" in (peer.check(sw, "cuda", torch.float16, 64, False) or "")
        assert "float64" in (peer.check(av.FullAttention(), "cuda", torch.float64, 64, False) or "")
    assert "float16 and bfloat16 only" in (
        peers.get_peer("flash_attn").check(av.FullAttention(), "cuda", torch.float32, 64, False) or ""
    )
    assert "256" in (peers.get_peer("flash_attn").check(av.FullAttention(), "cuda", torch.float16, 512, False) or "")


def test_broken_install_is_not_called_missing(monkeypatch) -> None:
    """A peer that is installed but fails to import says so, not "not installed"."""
    pytest.importorskip("performer_pytorch")
    for name in [m for m in sys.modules if m.split(".")[0] == "performer_pytorch"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "einops", None)
    reason = import_reason("performer_pytorch", peers.PEERS_EXTRA)
    assert reason is not None and "failed to import" in reason and "einops" in reason
