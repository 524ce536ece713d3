"""Incremental decoding: every variant's state, split any way, equals the causal forward of the
whole sequence (against the float64 ground truth, through the harness's checker); the states'
memory; input validation."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_variants as av
from attn_bench.core.numerics import check
from tests.helpers import make_qkv

PROMPT = 5
N = 17  # 5 prompt tokens, then 12 decoded

# (id, variant, options): windows narrower and wider than the prompt, global tokens in the prompt.
CASES = [
    ("full", "full", {}),
    ("window3", "sliding_window", {"window": 3}),
    ("window12-right4", "sliding_window", {"window": (12, 4)}),  # right is ignored: decoding is causal
    ("window0", "sliding_window", {"window": 0}),
    ("window2-globals", "sliding_window", {"window": 2, "global_tokens": [0, 3]}),
    ("window3-global2", "sliding_window", {"window": (3, 1), "global_tokens": 2}),
    ("performer", "performer", {"num_features": 32}),
    ("performer-relu", "performer", {"num_features": 32, "kernel": "relu"}),
]
IDS = [c[0] for c in CASES]


def decode(variant: av.AttentionVariant, q, k, v, schedule: list[int], **kw) -> torch.Tensor:
    """Outputs of decoding ``q, k, v`` in steps of the lengths in ``schedule`` (the first from
    an empty state, as ``prefill``), concatenated."""
    assert sum(schedule) == q.shape[2]
    out, state = variant.prefill(q[:, :, : schedule[0]], k[:, :, : schedule[0]], v[:, :, : schedule[0]], **kw)
    outs, start = [out], schedule[0]
    for t in schedule[1:]:
        sl = slice(start, start + t)
        out, state = variant.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, **kw)
        outs.append(out)
        start += t
    assert state.length == q.shape[2]
    return torch.cat(outs, dim=2)


SCHEDULES = {
    "prefill-tokens": [PROMPT] + [1] * (N - PROMPT),
    "prefill-chunks3": [PROMPT] + [3] * ((N - PROMPT) // 3),
    "mixed": [PROMPT, 1, 3, 1, 4, 2, 1],
}


def check_decode(variant, q, k, v, schedule, **kw) -> None:
    res = check(lambda a, b, c: decode(variant, a, b, c, schedule, **kw), variant, q, k, v, True, approx=False)
    assert res.ok, f"{variant!r} {schedule}: {res.message}"


@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_decode_equals_causal_forward(case, schedule: str, dtype: torch.dtype) -> None:
    _, name, opts = case
    variant = av.get_variant(name, **opts)
    q, k, v = make_qkv(2, 4, 2, N, N, 16, 8, dtype=dtype)  # batch 2, GQA, Dv != D
    check_decode(variant, q, k, v, SCHEDULES[schedule])


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_decode_half_precision(case, dtype: torch.dtype) -> None:
    _, name, opts = case
    q, k, v = make_qkv(2, 4, 2, N, N, 16, dtype=dtype)
    check_decode(av.get_variant(name, **opts), q, k, v, SCHEDULES["mixed"])


@pytest.mark.parametrize("case", [c for c in CASES if c[1] != "performer"], ids=[c[0] for c in CASES[:6]])
def test_decode_reference_backend(case) -> None:
    _, name, opts = case
    q, k, v = make_qkv(2, 4, 2, N, N, 16, dtype=torch.float32)
    check_decode(av.get_variant(name, **opts), q, k, v, SCHEDULES["mixed"], backend="reference")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["full", "window3"])
def test_decode_triton_backend(case) -> None:
    _, name, opts = case
    variant = av.get_variant(name, **opts)
    if not variant.supports("triton", "cpu", torch.float32, 16):
        pytest.skip(variant.unsupported_reason("triton", "cpu", torch.float32, 16))
    q, k, v = make_qkv(1, 2, 1, 9, 9, 16, dtype=torch.float32)
    check_decode(variant, q, k, v, [4, 1, 3, 1], backend="triton")


@pytest.mark.parametrize(
    "case", [c for c in CASES if "global" not in c[0]], ids=[c[0] for c in CASES if "global" not in c[0]]
)
def test_decode_from_empty_state(case) -> None:
    """No prefill: the first step is a single token, into a state from ``init_state``."""
    _, name, opts = case
    variant = av.get_variant(name, **opts)
    q, k, v = make_qkv(1, 2, 1, 11, 11, 8, dtype=torch.float64)
    state = variant.init_state(1, 1, 8, dtype=torch.float64, capacity=1)
    outs = []
    for i in range(11):
        out, state = variant.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state)
        outs.append(out)
    ref = variant.reference(q, k, v, causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, rtol=1e-12, atol=1e-12)


def test_performer_running_stabiliser_grows() -> None:
    """Keys whose norms grow along the sequence raise the running maximum at every step: the
    rescaled state still gives the forward (whose shift is the maximum over all keys)."""
    variant = av.PerformerAttention(num_features=64)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, dtype=torch.float32)
    k = k * torch.linspace(0.3, 2.5, 40)[:, None]
    check_decode(variant, q, k, v, [4] + [1] * 36)
    state = variant.prefill(q, k, v)[1]
    ws = variant.projection_matrix(16, "cpu", torch.float32) * 16**-0.25
    shift = av.performer.key_shift(k, ws, 16**-0.5, "softmax")
    torch.testing.assert_close(state.shift, shift)


# ---------------------------------------------------------------------------------------------
# Memory of the states
# ---------------------------------------------------------------------------------------------


def run_tokens(variant, n: int, b=1, hk=2, d=8, dtype=torch.float32):
    state = variant.init_state(b, hk, d, dtype=dtype, capacity=4)
    sizes = []
    for _ in range(n):
        q, k, v = make_qkv(b, hk, hk, 1, 1, d, dtype=dtype)
        state = variant.step(q, k, v, state)[1]
        sizes.append(state.nbytes)
    return state, sizes


def test_ring_buffer_stops_growing_at_the_window() -> None:
    left = 6
    state, sizes = run_tokens(av.SlidingWindowAttention(window=left), 40)
    full = 2 * 1 * 2 * (left + 1) * 8 * 4  # keys and values, left + 1 slots
    assert max(sizes) == full
    assert all(s == full for s in sizes[left:])
    assert state.ring_k.shape[2] == left + 1


def windowed_causal_float64(q, k, v, left: int) -> torch.Tensor:
    """Causal sliding-window attention written out per query in float64: query ``i`` sees keys
    ``max(0, i - left) .. i`` (GQA: query head ``h`` reads key head ``h // (H // Hk)``)."""
    q, k, v = q.double(), k.double(), v.double()
    h, hk, n = q.shape[1], k.shape[1], q.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    scale = q.shape[-1] ** -0.5
    for hh in range(h):
        kh = hh // (h // hk)
        for i in range(n):
            lo = max(0, i - left)
            s = (q[:, hh, i : i + 1] @ k[:, kh, lo : i + 1].transpose(-1, -2)) * scale
            out[:, hh, i] = (torch.softmax(s, dim=-1) @ v[:, kh, lo : i + 1])[:, 0]
    return out


@pytest.mark.parametrize("schedule", [[1] * 30, [2, 1, 3, 1, 9, 1, 1, 4, 1, 1, 1, 5]], ids=["tokens", "mixed"])
def test_full_ring_is_written_in_place(schedule: list[int]) -> None:
    """Once the ring holds ``left + 1`` slots, steps write into the same storage (no regrowth,
    no copy of the ring), and the outputs stay those of windowed causal attention."""
    left, n = 4, sum(schedule)
    variant = av.SlidingWindowAttention(window=left)
    q, k, v = make_qkv(2, 4, 2, n, n, 8, 6, dtype=torch.float32)
    state = variant.init_state(2, 2, 8, 6, capacity=2)
    outs, start, ptrs = [], 0, set()
    for t in schedule:
        sl = slice(start, start + t)
        out, state = variant.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state)
        outs.append(out)
        start += t
        if start > left + 1:
            assert state.ring_k.shape[2] == left + 1
            ptrs.add((state.ring_k.data_ptr(), state.ring_v.data_ptr()))
    assert len(ptrs) == 1, f"the full ring was reallocated {len(ptrs) - 1} times"
    ref = windowed_causal_float64(q, k, v, left)
    torch.testing.assert_close(torch.cat(outs, dim=2).double(), ref, rtol=2e-5, atol=2e-5)


def test_window_wider_than_text_costs_only_the_text() -> None:
    state, sizes = run_tokens(av.SlidingWindowAttention(window=10**9), 20)
    assert state.ring_k.shape[2] < 64 and sizes[-1] < 64 * 2 * 2 * 8 * 4


def test_kv_cache_grows_by_doubling() -> None:
    state, sizes = run_tokens(av.FullAttention(), 40)
    assert state.capacity >= 40 and state.capacity == 64  # 4 -> 8 -> 16 -> 32 -> 64
    assert len(set(sizes)) == 5


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_state_is_independent_of_length(kernel: str) -> None:
    state, sizes = run_tokens(av.PerformerAttention(num_features=16, kernel=kernel), 30)
    assert len(set(sizes)) == 1
    assert state.S.shape == (1, 2, 16, 8) and state.z.shape == (1, 2, 16)


def test_state_in_half_precision_keeps_float32_sums() -> None:
    state = av.PerformerAttention(num_features=8).init_state(1, 1, 4, dtype=torch.float16)
    assert state.kv.dtype == torch.float32
    cache = av.FullAttention().init_state(1, 1, 4, dtype=torch.float16)
    assert cache.k.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Global tokens, empty steps, bad input
# ---------------------------------------------------------------------------------------------


def test_global_position_after_the_prefill_is_refused() -> None:
    variant = av.SlidingWindowAttention(window=2, global_tokens=[1, 7])
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8)
    _, state = variant.prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    state = variant.step(q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6], state)[1]
    with pytest.raises(ValueError, match="global position 7"):
        variant.step(q[:, :, 6:8], k[:, :, 6:8], v[:, :, 6:8], state)
    assert state.length == 6  # nothing was written


def test_empty_step_changes_nothing() -> None:
    variant = av.FullAttention()
    q, k, v = make_qkv(1, 2, 2, 3, 3, 8)
    _, state = variant.prefill(q, k, v)
    out, state = variant.step(q[:, :, :0], k[:, :, :0], v[:, :, :0], state)
    assert out.shape == (1, 2, 0, 8) and state.length == 3


def test_bad_inputs_raise_clearly() -> None:
    full = av.FullAttention()
    q, k, v = make_qkv(2, 4, 2, 1, 1, 8)
    state = full.init_state(2, 2, 8)
    with pytest.raises(ValueError, match="batch size"):
        full.step(q[:1], k[:1], v[:1], state)
    with pytest.raises(ValueError, match="k/v heads"):
        full.step(q, k[:, :1], v[:, :1], state)
    q3, k3, v3 = make_qkv(2, 4, 2, 1, 1, 4)
    with pytest.raises(ValueError, match="head dim"):
        full.step(q3, k3, v3, state)
    with pytest.raises(ValueError, match="value dim"):
        full.step(q, k, v[..., :4], state)
    with pytest.raises(TypeError, match="dtype"):
        full.step(q.double(), k.double(), v.double(), state)
    with pytest.raises(ValueError, match="new tokens"):
        full.step(torch.cat([q, q], dim=2), k, v, state)
    with pytest.raises(TypeError, match="DecodeState"):
        full.step(q, k, v, {"k": k})
    with pytest.raises(TypeError, match="made by variant 'performer'"):
        full.step(q, k, v, av.PerformerAttention(num_features=4).init_state(2, 2, 8))
    full.step(q, k, v, state)
    with pytest.raises(ValueError, match="scale"):
        full.step(q, k, v, state, scale=0.3)
    with pytest.raises(ValueError, match="backend"):
        full.step(q, k, v, state, backend="nope")
    assert state.length == 1
    with pytest.raises(ValueError, match="batch"):
        full.init_state(0, 2, 8)
    with pytest.raises(TypeError, match="kv_heads"):
        full.init_state(1, 2.0, 8)
    with pytest.raises(TypeError, match="dtype"):
        full.init_state(1, 2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="capacity"):
        full.init_state(1, 2, 8, capacity=0)


def _prefill_then_step(made_by, stepped_by, n: int = 6, d: int = 8):
    """Prefill ``n - 1`` tokens with ``made_by``, then step the last one with ``stepped_by``."""
    q, k, v = make_qkv(1, 2, 2, n, n, d, dtype=torch.float64)
    _, state = made_by.prefill(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1])
    out, state = stepped_by.step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
    return (q, k, v), out, state


@pytest.mark.parametrize(
    "made, stepped, option",
    [
        (av.SlidingWindowAttention(window=4), av.SlidingWindowAttention(window=8), "window"),
        (av.SlidingWindowAttention(window=4), av.SlidingWindowAttention(window=(3, 4)), "window"),
        (av.SlidingWindowAttention(2, global_tokens=1), av.SlidingWindowAttention(2, global_tokens=2), "global_tokens"),
        (av.SlidingWindowAttention(2, global_tokens=1), av.SlidingWindowAttention(2), "global_tokens"),
        (av.PerformerAttention(num_features=16), av.PerformerAttention(num_features=8), "num_features"),
        (av.PerformerAttention(16, seed=0), av.PerformerAttention(16, seed=1), "seed"),
        (av.PerformerAttention(16), av.PerformerAttention(16, ortho=False), "ortho"),
        (av.PerformerAttention(16), av.PerformerAttention(16, kernel="relu"), "kernel"),
        (av.PerformerAttention(projection=torch.ones(16, 8)), av.PerformerAttention(16), "projection"),
        (
            av.PerformerAttention(projection=torch.ones(16, 8)),
            av.PerformerAttention(projection=torch.full((16, 8), 2.0)),
            "projection",
        ),
    ],
    ids=["window", "window-pair", "globals", "no-globals", "features", "seed", "ortho", "kernel", "given-w", "other-w"],
)
def test_step_with_other_options_is_refused(made, stepped, option: str) -> None:
    """A state records the options it was made with; another variant's step names the option
    that differs and writes nothing."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, dtype=torch.float64)
    _, state = made.prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match=rf"^{option}=.* differs from the state's {option}="):
        stepped.step(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], state)
    assert state.length == 5


def test_redraw_after_prefill_is_refused() -> None:
    variant = av.PerformerAttention(num_features=16)
    q, k, v = make_qkv(1, 2, 2, 3, 3, 8)
    _, state = variant.prefill(q[:, :, :2], k[:, :, :2], v[:, :, :2])
    variant.redraw()
    with pytest.raises(ValueError, match=r"seed=1 .* state's seed=0"):
        variant.step(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], state)


@pytest.mark.parametrize(
    "made, stepped",
    [
        (av.SlidingWindowAttention(window=4), av.SlidingWindowAttention(window=(4, 2))),  # right: not used
        (av.SlidingWindowAttention(2, global_tokens=2), av.SlidingWindowAttention(2, global_tokens=[1, 0])),
        (av.PerformerAttention(16, seed=3), av.PerformerAttention(16, seed=3)),
        (av.PerformerAttention(projection=torch.ones(16, 8)), av.PerformerAttention(projection=torch.ones(16, 8))),
    ],
    ids=["window-reach", "globals", "performer-seed", "performer-given-w"],
)
def test_step_by_an_equivalent_variant_continues(made, stepped) -> None:
    """Another instance with the same options continues the state: the outputs equal the float64
    causal forward of the whole sequence."""
    (q, k, v), out, _ = _prefill_then_step(made, stepped)
    ref = made.reference(q, k, v, causal=True)[:, :, -1:]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_performer_step_backends() -> None:
    perf = av.PerformerAttention(num_features=8)
    q, k, v = make_qkv(1, 2, 2, 2, 2, 8)
    with pytest.raises(ValueError, match="no decoding step"):
        perf.prefill(q, k, v, backend="reference")
    with pytest.raises(ValueError, match="projection has 4 columns"):
        av.PerformerAttention(projection=torch.randn(8, 4)).init_state(1, 2, 8)
    assert perf.prefill(q, k, v, backend="torch")[0].shape == (1, 2, 2, 8)


def test_plugin_variant_without_state_says_so() -> None:
    class NoState(av.AttentionVariant):
        name = "nostate"

    with pytest.raises(NotImplementedError, match="no incremental decoding state"):
        NoState().init_state(1, 1, 4)


# ---------------------------------------------------------------------------------------------
# AttentionLayer, TinyDecoder and the sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES[:2] + CASES[6:7], ids=["full", "window3", "performer"])
def test_layer_and_decoder_steps_equal_forward(case) -> None:
    _, name, opts = case
    layer = av.AttentionLayer(32, 4, name, num_kv_heads=2, causal=True, **opts).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    state = layer.init_state(2)
    ys = [layer.step(x[:, :4], state)[0]] + [layer.step(x[:, i : i + 1], state)[0] for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(ys, dim=1), layer(x), rtol=1e-12, atol=1e-12)

    model = av.TinyDecoder(23, 32, 4, 2, name, num_kv_heads=2, **opts).double().eval()
    tokens = torch.randint(0, 23, (2, 10))
    with torch.no_grad():
        states = model.init_state(2)
        logits = [model.step(tokens[:, :6], states)[0], model.step(tokens[:, 6:], states)[0]]
        torch.testing.assert_close(torch.cat(logits, dim=1), model(tokens), rtol=1e-11, atol=1e-11)


def test_generate_greedy_matches_recomputation_and_seeds_reproduce() -> None:
    model = av.TinyDecoder(17, 16, 2, 1, "sliding_window", window=4).eval()
    prompt = torch.randint(0, 17, (2, 3))
    out = av.generate(model, prompt, 6, temperature=0.0)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], prompt)
    with torch.no_grad():
        for i in range(3, 9):
            assert torch.equal(out[:, i], model(out[:, :i])[:, -1].argmax(dim=-1))
    runs = [av.generate(model, prompt, 6, top_p=0.9, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*runs)


P = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)


@pytest.mark.parametrize(("top_p", "kept"), [(1.0, 4), (0.95, 4), (0.85, 3), (0.7, 2), (0.3, 1), (1e-9, 1)], ids=str)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p: float, kept: int) -> None:
    probs = av.top_p_probs(P.log(), top_p=top_p)
    want = torch.zeros(4, dtype=torch.float64)
    want[:kept] = P[:kept] / P[:kept].sum()
    torch.testing.assert_close(probs, want)


def test_top_p_order_does_not_depend_on_position() -> None:
    perm = torch.tensor([2, 0, 3, 1])
    probs = av.top_p_probs(P[perm].log().float(), top_p=0.7)
    torch.testing.assert_close(probs, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3], dtype=torch.float64))


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (1.0, 0.85), (2.0, 1.0), (0.5, 0.9)], ids=str)
def test_sampled_frequencies_match_the_distribution(temperature: float, top_p: float) -> None:
    n = 40_000
    logits = P.log().float().expand(n, 4)
    draws = av.top_p_sample(logits, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n,) and draws.dtype == torch.int64
    freq = torch.bincount(draws, minlength=4).double() / n
    want = av.top_p_probs(P.log(), temperature=temperature, top_p=top_p)
    sigma = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)
    assert (freq[want == 0] == 0).all()


def test_temperature_to_zero_is_argmax() -> None:
    logits = torch.randn(8, 50)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(av.top_p_sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(av.top_p_sample(logits, temperature=1e-3, generator=gen), logits.argmax(-1))
    cold = av.top_p_probs(logits, temperature=0.05).amax(-1)
    warm = av.top_p_probs(logits, temperature=1.0).amax(-1)
    assert (cold > warm).all()


def test_sampler_bad_arguments() -> None:
    logits = torch.zeros(3)
    with pytest.raises(ValueError, match="top_p"):
        av.top_p_sample(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        av.top_p_sample(logits, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        av.top_p_sample(logits, temperature=-1.0)
    with pytest.raises(TypeError, match="floating"):
        av.top_p_sample(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt"):
        av.generate(av.TinyDecoder(5, 8, 2, 1), torch.zeros(1, 0, dtype=torch.long), 2)


# ---------------------------------------------------------------------------------------------
# SDPA backends of small-query calls (decoding steps) on CUDA
# ---------------------------------------------------------------------------------------------

FLASH, EFFICIENT, MATH, CUDNN = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
    SDPBackend.CUDNN_ATTENTION,
)


def test_small_query_calls_on_cuda_avoid_cudnn() -> None:
    pick = av.full.small_query_sdpa_backends
    with sdpa_kernel([CUDNN, FLASH, EFFICIENT, MATH]):
        assert pick("cuda", 1) == [FLASH, EFFICIENT, MATH]
        assert pick("cuda", av.full.SMALL_QUERY_SDPA_MAX) == [FLASH, EFFICIENT, MATH]
        assert pick("cuda", av.full.SMALL_QUERY_SDPA_MAX + 1) is None  # a prompt: SDPA chooses
        assert pick("cpu", 1) is None
    with sdpa_kernel([CUDNN, EFFICIENT, MATH]):  # an outer choice is kept
        assert pick("cuda", 1) == [EFFICIENT, MATH]
    with sdpa_kernel([FLASH, MATH]):  # cuDNN already off: nothing to pin
        assert pick("cuda", 1) is None


def test_cpu_decode_step_leaves_sdpa_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a step calls SDPA as before (no backend context), and still equals the
    float64 causal forward."""

    def refuse(*args, **kwargs):
        raise AssertionError("sdpa_kernel entered on the CPU")

    monkeypatch.setattr(av.full, "sdpa_kernel", refuse)
    variant = av.FullAttention()
    q, k, v = make_qkv(1, 4, 2, 9, 9, 8, dtype=torch.float32)
    out = decode(variant, q, k, v, [5, 1, 1, 2])
    ref = variant.reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
