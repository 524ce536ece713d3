"""The host side of the Triton calls, measured on the CPU with the kernel launches stubbed out.

A forward's host work is counted as the ATen ops it issues (a ``TorchDispatchMode`` sees every
one): a forward allocates its output and log-sum-exp and nothing else (no placeholder tensors, no
fills, casts or copies), launches one kernel, and reads the device capability and the
environment once per process. The decoding steps are held to one workspace allocation besides
their outputs. Stubbing the launches keeps these tests fast and independent of the interpreter;
what the kernels compute is tested elsewhere (tests/test_flash_interpreter.py,
tests/test_decode_triton.py).

``test_forward_host_time`` times the Python cost of a stubbed forward with pytest-benchmark; it
runs only when benchmarks are asked for (``pytest tests/test_host_overhead.py --benchmark-only``
or ``--benchmark-enable``).
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attention_variants as av
import attn_kernels
import attn_kernels.decode as kdecode
import attn_kernels.flash_attention as flash
import attn_kernels.launch as launch_mod
from tests.helpers import favor_impl, make_qkv

POISON_FRESH_ALLOCATIONS = False  # conftest's NaN fill of torch.empty would be counted as an op

ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.zeros.default", "aten.full.default"}
FORBIDDEN = ("fill", "zero_", "_to_copy", "copy_", "clone", "item", "_local_scalar_dense", "nonzero")


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops run inside it (by name, e.g. ``aten.empty.memory_format``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def allocations(self) -> int:
        return sum(n for op, n in self.ops.items() if op in ALLOCATIONS)

    def forbidden(self) -> list[str]:
        return sorted(op for op in self.ops if any(word in op for word in FORBIDDEN))


@pytest.fixture
def stub_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the kernel launches of the softmax and decoding paths by a recorder (kernel names)."""
    launched: list[str] = []

    def record(fn, configs, grid, args, **kwargs) -> None:
        assert configs, "a launch without a config"
        launched.append(getattr(fn, "__name__", str(fn)))

    monkeypatch.setattr(flash, "launch", record)
    monkeypatch.setattr(kdecode, "launch", record)
    return launched


FORWARDS = [
    pytest.param(av.FullAttention(), False, id="full"),
    pytest.param(av.FullAttention(), True, id="full-causal"),
    pytest.param(av.SlidingWindowAttention(window=8), True, id="window8-causal"),
    pytest.param(av.SlidingWindowAttention(window=(8, 3)), False, id="window8-3"),
    # Global tokens: positions, schedules and index tensors made once, no nonzero() sync per call.
    pytest.param(av.SlidingWindowAttention(window=4, global_tokens=[0, 50, 99]), False, id="window4-global"),
    pytest.param(av.SlidingWindowAttention(window=4, global_tokens=3), True, id="window4-global3-causal"),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("variant, causal", FORWARDS)
def test_forward_allocates_only_its_outputs(variant, causal: bool, grad: bool, stub_launches) -> None:
    """A Triton forward through the public API (validation and backend resolution included):
    exactly two allocations (output and log-sum-exp), no fills, casts, copies or host syncs,
    one kernel launch. The first call builds the cached block schedule; the second is counted."""
    q, k, v = make_qkv(1, 4, 2, 100, 100, 16)
    if grad:
        q.requires_grad_(True)
    variant(q, k, v, causal=causal, backend="triton")
    stub_launches.clear()
    with OpCounter() as counter:
        out = variant(q, k, v, causal=causal, backend="triton")
    assert out.shape == (1, 4, 100, 16) and out.requires_grad == grad
    assert counter.allocations() == 2, dict(counter.ops)
    assert counter.forbidden() == [], dict(counter.ops)
    # Global tokens add the launch over the gathered global rows.
    has_global = isinstance(variant, av.SlidingWindowAttention) and bool(variant.global_positions())
    assert stub_launches == ["_fwd_kernel"] * (2 if has_global else 1)


def test_decode_step_allocates_one_workspace(stub_launches) -> None:
    """A split-KV softmax step: its output plus one workspace (the partial results and the
    combine's normalisers), two launches (split and combine)."""
    q, k, v = make_qkv(1, 4, 2, 1, 1, 16)
    kc, vc = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    kdecode.softmax_step(q, kc, vc, k, v, start=40, lo=0, scale=0.25)
    stub_launches.clear()
    with OpCounter() as counter:
        out = kdecode.softmax_step(q, kc, vc, k, v, start=40, lo=0, scale=0.25)
    assert out.shape == (1, 4, 1, 16)
    assert counter.allocations() == 2, dict(counter.ops)
    assert counter.forbidden() == [], dict(counter.ops)
    assert stub_launches == ["_softmax_split_kernel", "_combine_kernel"]


def test_decode_workspace_views_are_disjoint_and_contiguous() -> None:
    m, lsum, acc, den = kdecode._workspace(3, 16, 32, torch.device("cpu"), extra=10)
    assert m.shape == lsum.shape == (3, 16) and acc.shape == (3, 16, 32) and den.shape == (10,)
    assert all(t.is_contiguous() for t in (m, lsum, acc, den))
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in (m, lsum, acc, den))
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


def test_performer_projection_is_placed_once() -> None:
    """The projection on a device/dtype is made once: later calls issue no op (no host-to-device
    copy); a redraw makes a new one."""
    variant = av.PerformerAttention(num_features=16, seed=3)
    w = variant.projection_matrix(8, "cpu", torch.float32)
    with OpCounter() as counter:
        again = variant.projection_matrix(8, "cpu", torch.float32)
    assert again is w and not counter.ops
    expected = av.performer.draw_projection(16, 8, seed=3).float()
    assert torch.equal(w, expected)
    variant.redraw(4)
    redrawn = variant.projection_matrix(8, "cpu", torch.float32)
    assert torch.equal(redrawn, av.performer.draw_projection(16, 8, seed=4).float())


def test_capability_is_queried_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def capability(index: int) -> tuple[int, int]:
        calls.append(index)
        return (9, 0) if index == 0 else (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    attn_kernels.env._capability.cache_clear()
    try:
        for _ in range(3):
            assert attn_kernels.device_capability(torch.device("cuda", 0)) == (9, 0)
            assert attn_kernels.device_capability(torch.device("cuda", 1)) == (7, 5)
        assert calls == [0, 1]
        # What the softmax kernels' support check answers from it (bfloat16 needs 8.0).
        var = av.FullAttention()
        assert flash.unsupported_reason(var, torch.device("cuda", 0), torch.bfloat16, 64) is None
        assert "8.0" in flash.unsupported_reason(var, torch.device("cuda", 1), torch.bfloat16, 64)
        assert calls == [0, 1]
    finally:
        attn_kernels.env._capability.cache_clear()


def test_environment_is_read_once_until_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    attn_kernels.refresh_environment()
    monkeypatch.setenv(attn_kernels.AUTOTUNE_ENV, "3")
    assert launch_mod.autotune_cap() == 3
    monkeypatch.setenv(attn_kernels.AUTOTUNE_ENV, "5")
    assert launch_mod.autotune_cap() == 3  # cached: no environment read per call
    was = attn_kernels.interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if was else "1")
    assert attn_kernels.interpreter_enabled() == was
    attn_kernels.refresh_environment()
    assert launch_mod.autotune_cap() == 5
    assert attn_kernels.interpreter_enabled() == (not was)
    monkeypatch.delenv(attn_kernels.AUTOTUNE_ENV)
    attn_kernels.refresh_environment()
    assert launch_mod.autotune_cap() is None


def test_forward_host_time(benchmark, request: pytest.FixtureRequest, stub_launches) -> None:
    """Python time of one stubbed Triton forward through the public API (reported, not asserted:
    a shared machine's timings are noise)."""
    if not (request.config.getoption("benchmark_only") or request.config.getoption("benchmark_enable")):
        pytest.skip("a benchmark: run with --benchmark-only or --benchmark-enable")
    q, k, v = make_qkv(1, 4, 4, 128, 128, 64)
    variant = av.FullAttention()
    variant(q, k, v, causal=True, backend="triton")
    out = benchmark(variant, q, k, v, causal=True, backend="triton")
    assert out.shape == (1, 4, 128, 64)


def test_global_positions_are_read_once() -> None:
    """A window's global positions given as a tensor are read out once, not at every decoding step;
    changing the tensor in place is seen."""
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[0, 5]] = True
    variant = av.SlidingWindowAttention(window=2, global_tokens=mask)
    assert variant.global_positions() == [0, 5]
    with OpCounter() as counter:
        assert variant.global_positions() == [0, 5]
    assert not counter.ops
    mask[3] = True
    assert variant.global_positions() == [0, 3, 5]


@pytest.fixture
def stub_favor_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the launches of both FAVOR+ implementations by a recorder (kernel names)."""
    import attn_kernels.favor as favor
    import attn_kernels.favor_chunk as favor_chunk

    launched: list[str] = []
    monkeypatch.setattr(favor, "launch", lambda fn, *args, **kwargs: launched.append(fn.__name__))
    monkeypatch.setattr(favor_chunk, "_launch", lambda fn, *args, **kwargs: launched.append(fn.__name__))
    return launched


@pytest.mark.parametrize("impl", ["chunk", "legacy"])
def test_performer_forward_reuses_its_projection(impl: str, stub_favor_launches) -> None:
    """A FAVOR+ forward's projection operands are made once: a second call issues no copy, cast,
    fill or placeholder allocation (what remains is its own buffers and the key reductions)."""
    variant = av.PerformerAttention(num_features=32)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    with favor_impl(impl):
        variant(q, k, v, causal=False, backend="triton")
        with OpCounter() as counter:
            variant(q, k, v, causal=False, backend="triton")
    assert counter.forbidden() == [], dict(counter.ops)
    assert "aten.zeros.default" not in counter.ops, dict(counter.ops)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_chunk_forward_host_work(causal: bool, grad: bool, stub_favor_launches) -> None:
    """The chunked FAVOR+ forward through the public API: three allocations without a gradient
    (the output, one workspace per dtype: features and states, float32 shifts and sums), the
    log-sum-exp on its own with one (it is saved); no fills, casts, copies or host syncs; one
    launch per pass (keys' features, states, the combine when not causal, the queries); no
    autograd node without a gradient to compute."""
    variant = av.PerformerAttention(num_features=32)
    q, k, v = make_qkv(1, 4, 2, 100, 100, 16)
    q.requires_grad_(grad)
    variant(q, k, v, causal=causal, backend="triton")
    stub_favor_launches.clear()
    with OpCounter() as counter:
        out = variant(q, k, v, causal=causal, backend="triton")
    assert out.shape == (1, 4, 100, 16) and (out.grad_fn is not None) == grad
    assert counter.allocations() == 3 + grad, dict(counter.ops)
    assert counter.forbidden() == [], dict(counter.ops)
    combine = [] if causal else ["_combine_kernel"]
    assert stub_favor_launches == ["_key_features_kernel", "_state_kernel", *combine, "_fwd_kernel"]


def test_performer_forward_host_time(benchmark, request: pytest.FixtureRequest, stub_favor_launches) -> None:
    """Python time of one stubbed chunked FAVOR+ forward through the public API, no gradient
    (reported, not asserted: a shared machine's timings are noise)."""
    if not (request.config.getoption("benchmark_only") or request.config.getoption("benchmark_enable")):
        pytest.skip("a benchmark: run with --benchmark-only or --benchmark-enable")
    q, k, v = make_qkv(1, 4, 4, 128, 128, 64)
    variant = av.PerformerAttention(num_features=64)
    variant(q, k, v, causal=True, backend="triton")
    out = benchmark(variant, q, k, v, causal=True, backend="triton")
    assert out.shape == (1, 4, 128, 64)


def test_projection_operands_follow_the_tensor() -> None:
    """The cached ``Ws = W * sqrt(scale)`` (padded) is that of the tensor as it is now: reused while
    it is unchanged, made again after an in-place change."""
    import attn_kernels.favor as favor

    w = torch.randn(12, 8)
    opts = favor.FavorOptions(causal=False, scale=0.3, kernel="softmax", m=12)
    geo = favor._Geometry(1, 1, 1, 4, 4, 8, 8, 16, 16, 16, True)
    ws, wt = favor._projection_operands(w, torch.float32, opts, geo)
    torch.testing.assert_close(ws[:12, :8].double(), w.double() * 0.3**0.5)
    assert (ws[12:] == 0).all() and (ws[:, 8:] == 0).all()
    again = favor._projection_operands(w, torch.float32, opts, geo)
    assert again[0] is ws and again[1] is wt
    w.mul_(2)
    ws2, _ = favor._projection_operands(w, torch.float32, opts, geo)
    torch.testing.assert_close(ws2[:12, :8].double(), w.double() * 0.3**0.5)


class FakeCompiled:
    """Stands for the compiled kernel a first launch returns: records what ``run`` is given."""

    def __init__(self) -> None:
        self.function, self.packed_metadata = "function", "packed"
        self.calls: list[tuple] = []

    def run(self, *args) -> None:
        self.calls.append(args)


def _bound_by_name(fn, args: tuple, meta: dict) -> dict:
    """The arguments the JIT binds for ``fn[grid](*args, **meta)``, by parameter name (defaults
    filled in): what a direct launch must pass, in the kernel's parameter order."""
    import inspect

    params = list(inspect.signature(fn.fn).parameters.values())
    out = {p.name: a for p, a in zip(params, args, strict=False)}
    for p in params[len(args) :]:
        out[p.name] = meta.get(p.name, p.default)
    return out


def test_direct_launch_passes_the_arguments_the_jit_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward's second call goes through its cached compiled-kernel handle, not the JIT: the
    same arguments in the kernel's parameter order (constexprs and defaults included), the
    plan's grid, the current stream; a change of alignment or stride makes a new plan (the JIT
    specialises on them), and a profiler hook sends the call back to the JIT."""
    from attn_kernels.flash_kernels import _fwd_kernel

    compiled = FakeCompiled()
    jit_calls: list[tuple] = []

    def first_launch(fn, configs, grid, args, **meta):
        jit_calls.append((grid(meta), args, {**meta, **configs[0].tiles()}))
        return compiled

    monkeypatch.setattr(flash, "launch", first_launch)
    monkeypatch.setattr(flash, "_direct_ok", lambda device: True)
    monkeypatch.setattr(launch_mod, "current_stream", lambda device: 1234)
    flash._FWD_PLANS.clear()
    q, k, v = make_qkv(1, 4, 2, 100, 100, 16)
    with torch.no_grad():
        av.FullAttention()(q, k, v, causal=True, backend="triton")
        assert len(jit_calls) == 1 and not compiled.calls
        out = av.FullAttention()(q, k, v, causal=True, backend="triton")
    assert len(jit_calls) == 1 and len(compiled.calls) == 1
    grid, jit_args, meta = jit_calls[0]
    g0, g1, g2, stream, function, packed, launch_meta, enter, leave, *passed = compiled.calls[0]
    assert (g0, g1, g2, stream, function, packed) == (grid[0], grid[1], 1, 1234, "function", "packed")
    assert launch_meta is enter is leave is None
    want = _bound_by_name(_fwd_kernel, jit_args, meta)
    assert len(passed) == len(want)
    for name, got in zip(want, passed, strict=True):
        expected = want[name]
        if isinstance(expected, torch.Tensor):
            # The first call's q/k/v, the second call's freshly allocated outputs.
            assert isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype, name
        else:
            assert got == expected, name
    assert passed[0] is q and passed[3] is out  # this call's tensors

    # A view 2 bytes off its storage's start: another specialisation, so the JIT again.
    base = torch.randn(1 * 4 * 100 * 16 + 1)
    q_off = base[1:].view(1, 4, 100, 16)
    with torch.no_grad():
        av.FullAttention()(q_off, k, v, causal=True, backend="triton")
    assert len(jit_calls) == 2

    # With a launch hook set (a profiler) the handle declines and the JIT launches.
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    with torch.no_grad():
        av.FullAttention()(q, k, v, causal=True, backend="triton")
    assert len(jit_calls) == 3 and len(compiled.calls) == 1
    flash._FWD_PLANS.clear()


def test_direct_launch_is_off_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(attn_kernels.DIRECT_LAUNCH_ENV, "0")
    attn_kernels.refresh_environment()
    try:
        assert not launch_mod.direct_launch_enabled()
    finally:
        monkeypatch.delenv(attn_kernels.DIRECT_LAUNCH_ENV)
        attn_kernels.refresh_environment()
    assert launch_mod.direct_launch_enabled() == launch_mod._direct_launch_supported()


@pytest.mark.parametrize(
    "variant", [av.FullAttention(), av.SlidingWindowAttention(window=6, global_tokens=[0, 40])], ids=["full", "window"]
)
def test_direct_launch_backward_passes_what_the_jit_binds(variant, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward: the second call launches every kernel (delta, dq, dk/dv, the
    gathered global launches) through its handle with the arguments the JIT bound at the first."""
    jit_calls: dict[str, list] = {}
    compiled: dict[str, FakeCompiled] = {}

    def first_launch(fn, configs, grid, args, inner="BLOCK_N", **meta):
        name = f"{fn.__name__}-{meta.get('GATHERED', False)}"
        jit_calls.setdefault(name, []).append((grid(meta), args, {**meta, **configs[0].tiles("BLOCK_M", inner)}))
        return compiled.setdefault(name, FakeCompiled())

    monkeypatch.setattr(flash, "launch", first_launch)
    monkeypatch.setattr(flash, "_direct_ok", lambda device: True)
    monkeypatch.setattr(launch_mod, "current_stream", lambda device: 7)
    flash._FWD_PLANS.clear()
    flash._BWD_PLANS.clear()
    q, k, v = make_qkv(1, 4, 2, 100, 100, 16)
    for _ in range(2):
        qq = q.clone().requires_grad_(True)
        variant(qq, k, v, causal=True, backend="triton").sum().backward()
    kernels = {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    assert {name.split("-")[0] for name in jit_calls} == kernels
    for name, calls in jit_calls.items():
        assert len(calls) == 1 and len(compiled[name].calls) == 1, name  # JIT once, then the handle
        fn = getattr(flash, name.split("-")[0])
        grid, jit_args, meta = calls[0]
        g0, g1, g2, stream, *_, passed = (*compiled[name].calls[0][:9], compiled[name].calls[0][9:])
        assert (g0, g1, g2, stream) == (grid[0], grid[1], 1, 7), name
        want = _bound_by_name(fn, jit_args, meta)
        assert len(passed) == len(want), name
        for arg, got in zip(want, passed, strict=True):
            expected = want[arg]
            if isinstance(expected, torch.Tensor):
                assert isinstance(got, torch.Tensor) and got.shape == expected.shape, (name, arg)
            else:
                assert got == expected, (name, arg)
    flash._FWD_PLANS.clear()
    flash._BWD_PLANS.clear()
