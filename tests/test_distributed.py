"""Context-parallel attention on 2 and 4 gloo ranks against the float64 reference on the whole sequence.

One pool of worker processes per world size (module-scoped) runs every case: a case is a module
function called on every rank with the same arguments; each rank builds the same full inputs from
a seed, computes the dense float64 reference and its gradients on the whole sequence itself, runs
context_parallel_attention on its shard and returns its errors. Every wait has a timeout, so a bug
fails the test instead of hanging.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attention_variants as av
from attention_variants.distributed import (
    analytic_bytes,
    context_parallel_attention,
    count_bytes,
    positions,
    shard,
    unshard,
)

CASE_TIMEOUT = 45.0  # seconds for one batch of cases on every rank
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, kwargs = item
        try:
            results.put((rank, True, fn(rank, world, **kwargs)))
        except Exception as e:  # reported to the test, which fails with the message
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))


class Pool:
    """``world`` gloo ranks in worker processes; :meth:`run` calls a module function on all of them."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(
        self, fn: Any, timeout: float = CASE_TIMEOUT, ranks: list[int] | None = None, **kwargs: Any
    ) -> list[tuple[bool, Any]]:
        """Call ``fn`` on every rank; the results of ``ranks`` (default: all), in that order."""
        ranks = list(range(self.world)) if ranks is None else ranks
        for t in self.tasks:
            t.put((fn, kwargs))
        out: dict[int, tuple[bool, Any]] = {}
        try:
            while len(out) < len(ranks):
                rank, ok, payload = self.results.get(timeout=timeout)
                out[rank] = (ok, payload)
        except queue.Empty:
            self.close(kill=True)
            pytest.fail(f"{fn.__name__} did not finish on every rank within {timeout} s (got ranks {sorted(out)})")
        return [out[r] for r in ranks]

    def values(self, fn: Any, **kwargs: Any) -> list[Any]:
        got = self.run(fn, **kwargs)
        failed = [f"rank {r}: {p}" for r, (ok, p) in enumerate(got) if not ok]
        assert not failed, "\n".join(failed)
        return [p for _, p in got]

    def close(self, kill: bool = False) -> None:
        for t in self.tasks:
            t.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"P{w}")
def pool(request: pytest.FixtureRequest) -> Any:
    p = Pool(request.param)
    yield p
    p.close()


# ---------------------------------------------------------------------------------------------
# Cases (run on every rank)
# ---------------------------------------------------------------------------------------------

B, H, D, DV = 2, 4, 8, 8  # one head size: the fused CPU kernel needs it


def _inputs(world: int, hk: int, padded: bool, seed: int) -> dict[str, torch.Tensor | None]:
    n = 8 * world  # four tokens per zigzag chunk
    g = torch.Generator().manual_seed(seed)
    t = {
        "q": torch.randn(B, H, n, D, generator=g, dtype=torch.float64),
        "k": torch.randn(B, hk, n, D, generator=g, dtype=torch.float64),
        "v": torch.randn(B, hk, n, DV, generator=g, dtype=torch.float64),
        "dout": torch.randn(B, H, n, DV, generator=g, dtype=torch.float64),
        "kpm": None,
    }
    if padded:  # batch 0 whole; batch 1 with 3 padded tokens on the left and 5 on the right
        kpm = torch.ones(B, n, dtype=torch.bool)
        kpm[1, :3] = False
        kpm[1, n - 5 :] = False
        t["kpm"] = kpm
    return t


def _grads(fn: Any, tensors: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


def case_matches_reference(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: max errors of this rank's output and q/k/v gradients against the float64
    reference on the whole sequence, for context parallelism and for one process in the same dtype."""
    return [{"case": c, "errs": _one_case(rank, world, **c)} for c in cases]


def _one_case(
    rank: int,
    world: int,
    *,
    variant: str,
    opts: dict[str, Any],
    dtype: torch.dtype,
    layout: str,
    causal: bool,
    seed: int,
    hk: int,
    padded: bool,
    backend: str,
) -> dict[str, tuple[float, float]]:
    t = _inputs(world, hk, padded, seed)
    q, k, v, dout, kpm = t["q"], t["k"], t["v"], t["dout"], t["kpm"]
    var = av.get_variant(variant, **opts)
    mask = None if kpm is None else shard(kpm, rank, world, layout, dim=1)

    def ref(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return var.reference(q_, k_, v_, causal=causal, key_padding_mask=kpm)

    def single(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return var(q_, k_, v_, causal=causal, backend=backend, key_padding_mask=kpm)

    def sharded(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return context_parallel_attention(
            q_, k_, v_, variant, layout=layout, causal=causal, backend=backend, key_padding_mask=mask, **opts
        )

    want = _grads(ref, [q, k, v], dout)
    base = _grads(single, [x.to(dtype) for x in (q, k, v)], dout.to(dtype))
    mine = [shard(x, rank, world, layout).to(dtype) for x in (q, k, v)]
    got = _grads(sharded, mine, shard(dout, rank, world, layout).to(dtype))
    errs = {}
    for name, w, b, g in zip(("out", "dq", "dk", "dv"), want, base, got, strict=True):
        w_shard = shard(w, rank, world, layout)
        errs[name] = (
            float((g.double() - w_shard).abs().max()),
            float((shard(b, rank, world, layout).double() - w_shard).abs().max()),
        )
    return errs


def case_bytes(rank: int, world: int, cases: list[dict[str, Any]]) -> list[tuple[dict[str, float], dict[str, float]]]:
    """Measured (forward, backward) bytes of this rank against :func:`analytic_bytes`."""
    report = []
    for c in cases:
        t = _inputs(world, 2, c["padded"], 0)
        xs = [shard(t[n], rank, world, c["layout"]).float().requires_grad_() for n in ("q", "k", "v")]
        mask = None if t["kpm"] is None else shard(t["kpm"], rank, world, c["layout"], dim=1)
        with count_bytes() as fwd:
            out = context_parallel_attention(
                *xs, c["variant"], layout=c["layout"], causal=c["causal"], key_padding_mask=mask, **c["opts"]
            )
        with count_bytes() as bwd:
            out.sum().backward()
        want = analytic_bytes(
            c["variant"],
            xs[0].shape,
            xs[1].shape,
            xs[2].shape,
            world=world,
            rank=rank,
            layout=c["layout"],
            causal=c["causal"],
            dtype=torch.float32,
            padded=mask is not None,
            **c["opts"],
        )
        report.append(({"forward": fwd.total, "backward": bwd.total}, want))
    return report


def case_bad_input(rank: int, world: int, kind: str) -> str:
    """Call with one bad shard (or an uneven sequence); returns the error message on this rank."""
    n = 8 if kind != "uneven" else 3
    if kind == "mismatch" and rank == world - 1:
        n = 12
    x = torch.randn(1, 2, n, 4)
    try:
        context_parallel_attention(x, x, x, "full", layout="zigzag" if kind == "uneven" else "contiguous")
    except ValueError as e:
        return str(e)
    return "no error"


def _bad_call(rank: int, world: int, kind: str) -> None:
    """A context-parallel call in which the last rank's input is bad (or differs from the others')."""
    bad = rank == world - 1
    g = torch.Generator().manual_seed(rank)
    n = 12 if bad and kind == "shard_length" else 8
    q, k, v = (torch.randn(1, 2, n, 4, generator=g) for _ in range(3))
    variant, opts = "full", {}
    kw: dict[str, Any] = {"layout": "contiguous", "causal": False}
    if bad and kind == "q_dtype":
        q = q.half()
    elif bad and kind == "short_k":
        k = k[:, :, :6]
    elif bad and kind == "float_mask":
        kw["key_padding_mask"] = torch.ones(1, 8)
    elif bad and kind == "causal_int":
        kw["causal"] = 1
    elif bad and kind == "dtype":
        q, k, v = q.double(), k.double(), v.double()
    elif kind == "padding" and not bad:
        kw["key_padding_mask"] = torch.ones(1, 8, dtype=torch.bool)
    elif kind == "scale":
        kw["scale"] = 0.5 if bad else 0.25
    elif kind == "variant":
        variant = "performer" if bad else "full"
    elif kind in ("window", "window_negative"):
        variant, opts = "sliding_window", {"window": (5 if kind == "window" else -1) if bad else 3}
    elif kind == "seed":
        variant, opts = "performer", {"num_features": 8, "seed": 1 if bad else 0}
    elif kind == "projection":  # each rank its own draw: the features would not match
        variant, opts = "performer", {"projection": torch.randn(8, 4, generator=g)}
    elif kind == "requires_grad" and bad:  # its backward would wait for the others' forever
        q.requires_grad_()
    context_parallel_attention(q, k, v, variant, **kw, **opts)


def case_bad_on_one_rank(rank: int, world: int, kinds: list[str]) -> list[tuple[str, float]]:
    """Per kind: the error this rank raised (``"Type: message"``, or ``"no error"``) and the seconds it took."""
    out = []
    for kind in kinds:
        t0 = time.perf_counter()
        try:
            _bad_call(rank, world, kind)
            got = "no error"
        except Exception as e:
            got = f"{type(e).__name__}: {e}"
        out.append((got, time.perf_counter() - t0))
    return out


def case_exit_on_one_rank(rank: int, world: int) -> tuple[str, float]:
    """Rank 1's process exits; the others call context_parallel_attention (the error and its seconds)."""
    if rank == 1:
        os._exit(3)
    time.sleep(0.5)  # rank 1 is gone by now
    x = torch.randn(1, 2, 8, 4)
    t0 = time.perf_counter()
    try:
        context_parallel_attention(x, x, x, "full")
        got = "no error"
    except Exception as e:
        got = f"{type(e).__name__}: {e}"
    return got, time.perf_counter() - t0


def case_group_of_one(rank: int, world: int) -> float:
    """Each rank alone in its own group: context_parallel_attention equals attention()."""
    groups = [dist.new_group([r]) for r in range(world)]
    torch.manual_seed(rank)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    worst = 0.0
    for name, opts in (("full", {}), ("sliding_window", {"window": 3}), ("performer", {"num_features": 16})):
        for causal in (False, True):
            want = av.attention(q, k, v, name, causal=causal, backend="torch", **opts)
            got = context_parallel_attention(q, k, v, name, group=groups[rank], causal=causal, backend="torch", **opts)
            worst = max(worst, float((got - want).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "full": [{}],
    "sliding_window": [{"window": (5, 3)}, {"window": 3, "global_tokens": [1, 6]}],
    "performer": [{"num_features": 16}, {"num_features": 12, "kernel": "relu"}],
}


def _cases(variant: str) -> list[dict[str, Any]]:
    out = []
    seed = 0
    for opts in VARIANTS[variant]:
        for dtype in (torch.float64, torch.float32):
            for layout in ("contiguous", "zigzag"):
                for causal in (False, True):
                    seed += 1
                    out.append(
                        dict(
                            variant=variant,
                            opts=opts,
                            dtype=dtype,
                            layout=layout,
                            causal=causal,
                            seed=seed,
                            hk=2 if seed % 3 else 4,
                            padded=seed % 2 == 0,
                            backend="reference" if seed % 4 == 1 else "torch",
                        )
                    )
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(pool: Pool, variant: str) -> None:
    reports = pool.values(case_matches_reference, cases=_cases(variant))
    failures = []
    for rank, report in enumerate(reports):
        for item in report:
            c = item["case"]
            for name, (err, base) in item["errs"].items():
                if not err <= 2 * base + ATOL[c["dtype"]]:
                    failures.append(f"rank {rank} {name} err {err:.3g} (one process {base:.3g}): {c}")
    assert not failures, "\n".join(failures[:10])
    assert len(reports[0]) == len(_cases(variant))


def test_global_tokens_beyond_a_shard(pool: Pool) -> None:
    # Global positions are positions of the whole sequence (N = 8 P here, 8 tokens a shard): a
    # count larger than a shard, and positions on the last shard, against the float64 reference.
    n = 8 * pool.world
    cases = [
        dict(
            variant="sliding_window",
            opts=opts,
            dtype=torch.float64,
            layout=layout,
            causal=causal,
            seed=40 + i,
            hk=2,
            padded=i % 2 == 1,
            backend="torch",
        )
        for i, (opts, layout, causal) in enumerate(
            [
                ({"window": 2, "global_tokens": n - 5}, "contiguous", False),
                ({"window": 2, "global_tokens": n - 5}, "zigzag", True),
                ({"window": (1, 2), "global_tokens": [0, 9, n - 3]}, "zigzag", False),
                ({"window": 3, "global_tokens": [0, 9, n - 3]}, "contiguous", True),
            ]
        )
    ]
    reports = pool.values(case_matches_reference, cases=cases)
    failures = [
        f"rank {rank} {name} err {err:.3g} (one process {base:.3g}): {item['case']}"
        for rank, report in enumerate(reports)
        for item in report
        for name, (err, base) in item["errs"].items()
        if not err <= 2 * base + ATOL[torch.float64]
    ]
    assert not failures, "\n".join(failures)


def test_bytes_match_analytic(pool: Pool) -> None:
    cases = [
        dict(variant=v, opts=o, layout=lay, causal=causal, padded=padded)
        for v, o in (
            ("full", {}),
            ("sliding_window", {"window": (5, 3)}),
            ("sliding_window", {"window": 2, "global_tokens": 2}),
            ("performer", {"num_features": 16}),
        )
        for lay in ("contiguous", "zigzag")
        for causal in (False, True)
        for padded in (False, True)
    ]
    reports = pool.values(case_bytes, cases=cases)
    for i, c in enumerate(cases):  # some rank sends something (a causal last rank may send nothing)
        assert sum(report[i][0]["forward"] for report in reports) > 0, c
    for rank, report in enumerate(reports):
        for c, (measured, want) in zip(cases, report, strict=True):
            for phase in ("forward", "backward"):
                assert measured[phase] == pytest.approx(want[phase], rel=1e-9), (rank, phase, c, measured, want)


def test_mismatched_shard_raises_on_every_rank(pool: Pool) -> None:
    messages = pool.values(case_bad_input, kind="mismatch")
    assert all("ranks disagree" in m for m in messages), messages


LOCAL_ERRORS = {  # kind -> what the message names
    "q_dtype": "dtype",
    "short_k": "length",
    "float_mask": "key_padding_mask",
    "causal_int": "causal",
    "window_negative": "window",
}


def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(pool: Pool) -> None:
    # The rank at fault must not raise before the others have heard of it: every rank raises
    # the same ValueError, naming the rank and the problem, without waiting for a timeout.
    kinds = list(LOCAL_ERRORS)
    got = pool.values(case_bad_on_one_rank, timeout=20.0, kinds=kinds)
    for i, kind in enumerate(kinds):
        messages = [rank_report[i][0] for rank_report in got]
        assert len(set(messages)) == 1, (kind, messages)
        assert messages[0].startswith("ValueError: context_parallel_attention: rank"), (kind, messages[0])
        assert f"rank {pool.world - 1}: " in messages[0] and LOCAL_ERRORS[kind] in messages[0], (kind, messages[0])
        assert max(rank_report[i][1] for rank_report in got) < 5.0, kind


DIFFERENCES = {  # kind -> (field named, value on the ranks 0 .. P-2, value on the last rank)
    "shard_length": ("q shape", "(1, 2, 8, 4)", "(1, 2, 12, 4)"),
    "dtype": ("dtype", "float32", "float64"),
    "padding": ("key_padding_mask", "(1, 8)", "None"),
    "scale": ("scale", "0.25", "0.5"),
    "variant": ("variant", "full", "performer"),
    "window": ("window", "3", "5"),
    "seed": ("seed", "0", "1"),
    "projection": ("projection", "float64 tensor (8, 4) #", "float64 tensor (8, 4) #"),
    "requires_grad": ("requires grad (q, k, v)", "(False, False, False)", "(True, False, False)"),
}


def test_ranks_that_differ_are_told_which_field(pool: Pool) -> None:
    kinds = list(DIFFERENCES)
    got = pool.values(case_bad_on_one_rank, timeout=20.0, kinds=kinds)
    last = pool.world - 1
    for i, kind in enumerate(kinds):
        messages = [rank_report[i][0] for rank_report in got]
        assert len(set(messages)) == 1, (kind, messages)
        field, mine, theirs = DIFFERENCES[kind]
        assert messages[0].startswith(f"ValueError: context_parallel_attention: ranks disagree on {field}:"), (
            kind,
            messages[0],
        )
        assert f"{mine}" in messages[0] and f"rank {last} has {theirs}" in messages[0], (kind, messages[0])


def test_a_rank_that_exits_is_reported_by_the_others() -> None:
    # Three ranks, so that one survivor is not the dead rank's neighbour in a ring.
    pool3 = Pool(3)
    try:
        got = pool3.run(case_exit_on_one_rank, timeout=30.0, ranks=[0, 2])
    finally:
        pool3.close(kill=True)
    for ok, (message, seconds) in got:
        assert ok
        assert message.startswith("PeerError: context_parallel_attention: "), message
        assert "a peer rank failed or exited" in message, message
        assert seconds < 10.0, message


def test_uneven_length_raises_on_every_rank(pool: Pool) -> None:
    messages = pool.values(case_bad_input, kind="uneven")
    assert all("not a multiple of" in m for m in messages), messages


def test_group_of_one_equals_attention(pool: Pool) -> None:
    assert max(pool.values(case_group_of_one)) < 1e-5


# -- helpers that need no processes ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(layout: str) -> None:
    x = torch.randn(2, 3, 24, 5)
    shards = [shard(x, r, 3, layout) for r in range(3)]
    assert torch.equal(unshard(shards, layout), x)
    for r in range(3):
        assert torch.equal(shards[r], x[:, :, positions(r, 3, layout, 8)])
    if layout == "zigzag":
        assert positions(0, 3, layout, 8).tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


def test_shard_rejects_uneven_length() -> None:
    with pytest.raises(ValueError, match="not a multiple of 4"):
        shard(torch.randn(1, 1, 10, 2), 0, 2, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        shard(torch.randn(1, 1, 8, 2), 0, 2, "striped")


def test_needs_initialised_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    x = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(x, x, x, "full")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layouts", "striped"], "layout"),
        (["--ranks", "3", "--n", "100"], "not a multiple"),
        (["--variants", "nope"], "unknown variant"),
    ],
)
def test_cp_bench_rejects_bad_options(args: list[str], message: str, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from attn_bench.cli import app

    res = CliRunner().invoke(app, ["cp", *args, "--out", str(tmp_path / "cp")])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "cp").exists()  # refused before any process starts


@pytest.mark.parametrize("impl", ["dense", "cpu_flash", "triton"])
@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_block_forward_backward(impl: str, diag: bool, padded: bool) -> None:
    """One ring block's (out, lse) and its gradients from the merged lse, on each implementation,
    against explicit float64 softmax with autograd (B2-H4-Hk2-N16-D16, GQA)."""
    from attention_variants.distributed import blocks

    if impl == "triton":
        pytest.importorskip("triton")
    if impl == "cpu_flash" and blocks._CPU_FWD is None:
        pytest.skip("this PyTorch has no fused CPU attention op")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 16, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    kpm = None
    if padded:
        kpm = torch.ones(2, 16, dtype=torch.bool)
        kpm[1, :5] = False  # with diag, rows 0-4 of batch 1 see no key
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s = leaves[0] @ leaves[1].repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    mask = torch.ones(16, 16, dtype=torch.bool).tril() if diag else torch.ones(16, 16, dtype=torch.bool)
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    lse_ref = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse_ref), 0.0, lse_ref)[..., None])
    out_ref = p @ leaves[2].repeat_interleave(2, 1)
    out_ref.backward(dout)
    dtype = torch.float32
    x32 = [x.to(dtype) for x in (q, k, v)]
    out, lse = blocks.block_forward(impl, *x32, diag, 0.25, kpm)
    seen = ~torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse), ~seen)
    torch.testing.assert_close(lse[seen].double(), lse_ref[seen], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), out_ref.detach(), atol=2e-5, rtol=1e-5)
    do32 = dout.to(dtype).masked_fill(~seen[..., None], 0.0)
    grads = blocks.block_backward(impl, do32, *x32, out.to(dtype), lse, diag, 0.25, kpm)
    for got, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(got.double(), leaf.grad, atol=1e-4, rtol=1e-4)
