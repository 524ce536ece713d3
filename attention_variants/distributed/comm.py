"""The collectives context parallelism uses, each counting the bytes this rank sends.

Counting rules (what a rank puts on the wire, by the textbook algorithm of each collective):
a point-to-point send counts its tensor; an all-to-all counts the parts sent to other ranks;
an all-reduce counts ``2 (P - 1) / P`` times its tensor (ring reduce-scatter + all-gather);
metadata checks (shapes, a few integers) are not counted. :func:`count_bytes` collects them.
The differentiable collectives here count their backward traffic too.

A collective that fails (a peer rank exited or crashed, or the group's timeout ran out) raises
:class:`PeerError`, which names the call and the collective, with the backend's error as its cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Traffic:
    """Bytes sent by this rank inside a :func:`count_bytes` block, in total and per collective."""

    total: float = 0.0
    by_op: dict[str, float] = field(default_factory=dict)

    def add(self, op: str, nbytes: float) -> None:
        self.total += nbytes
        self.by_op[op] = self.by_op.get(op, 0.0) + nbytes


_ACTIVE: list[Traffic] = []


@contextmanager
def count_bytes() -> Iterator[Traffic]:
    """``with count_bytes() as t: ...``: ``t.total`` is then the bytes this rank sent inside."""
    traffic = Traffic()
    _ACTIVE.append(traffic)
    try:
        yield traffic
    finally:
        _ACTIVE.remove(traffic)


def _record(op: str, nbytes: float) -> None:
    for t in _ACTIVE:
        t.add(op, nbytes)


def nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


class PeerError(RuntimeError):
    """A collective of a context-parallel call failed on this rank: a peer rank failed or exited
    (gloo: "Connection closed by peer"), or did not take part before the group's timeout."""


@contextmanager
def collective(op: str, rank: int) -> Iterator[None]:
    """Turn the process group's error in ``op`` into a :class:`PeerError` naming the call."""
    try:
        yield
    except RuntimeError as exc:  # gloo's and NCCL's errors (DistBackendError ...) are RuntimeErrors
        raise PeerError(
            f"context_parallel_attention: {op} failed on rank {rank}: a peer rank failed or exited, or did not "
            f"join it within the process group's timeout (the group cannot be used further): {exc}"
        ) from exc


class Comm:
    """A process group (None: the world) with this rank's index and the group size."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed initialised (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # NCCL moves CUDA tensors only: small metadata goes where the data lives (this rank's
        # current GPU when the inputs are not CUDA tensors); gloo keeps it on the CPU.
        self.meta_device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device(device)
            self.meta_device = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())

    def peer(self, r: int) -> int:
        """The global rank of group rank ``r`` (point-to-point calls take global ranks)."""
        return r if self.group is None else dist.get_global_rank(self.group, r)

    # -- uncounted metadata ----------------------------------------------------------------------

    def _exchange(self, mine: Tensor, op: str) -> Tensor:
        """Every rank's ``mine`` (one shape on all ranks), stacked in rank order. An all-to-all,
        not an all-gather: each rank hears from every other directly, so a dead rank is noticed
        by all at once (a ring all-gather leaves the ranks past a failed neighbour waiting)."""
        out = mine.new_empty(self.world, *mine.shape)
        with collective(op, self.rank):
            dist.all_to_all_single(out, mine.expand(self.world, *mine.shape).contiguous(), group=self.group)
        return out

    def exchange_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (one length on all ranks), for the agreement step."""
        mine = torch.tensor(values, dtype=torch.int64, device=self.meta_device)
        return self._exchange(mine, "the agreement step").tolist()

    def exchange_bytes(self, data: bytes, size: int) -> list[bytes]:
        """Every rank's ``data`` (at most ``size`` bytes, ``size`` one value on all ranks), zero-padded to ``size``."""
        mine = torch.zeros(size, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = self._exchange(mine.to(self.meta_device), "the agreement step")
        return [bytes(row.cpu().tolist()) for row in out]

    def send(self, x: Tensor, dst: int, op: str) -> None:
        """Send ``x`` to group rank ``dst`` (counted as ``op``)."""
        _record(op, nbytes(x))
        with collective(f"a send to rank {dst} ({op})", self.rank):
            dist.send(x.contiguous(), self.peer(dst), group=self.group)

    def recv(self, x: Tensor, src: int, op: str) -> None:
        """Receive into ``x`` from group rank ``src``."""
        with collective(f"a receive from rank {src} ({op})", self.rank):
            dist.recv(x, self.peer(src), group=self.group)

    # -- counted collectives --------------------------------------------------------------------

    def ring_start(self, tensors: list[Tensor], op: str = "ring") -> tuple[list[Tensor], list]:
        """Start sending ``tensors`` to rank + 1 and receiving the same shapes from rank - 1;
        returns the receive buffers and the requests (:meth:`ring_wait` them)."""
        tensors = [t.contiguous() for t in tensors]
        bufs = [torch.empty_like(t) for t in tensors]
        nxt, prv = self.peer((self.rank + 1) % self.world), self.peer((self.rank - 1) % self.world)
        ops = [dist.P2POp(dist.isend, t, nxt, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, prv, self.group) for b in bufs]
        for t in tensors:
            _record(op, nbytes(t))
        with collective(f"the ring pass ({op})", self.rank):
            return bufs, dist.batch_isend_irecv(ops)

    def ring_wait(self, reqs: list[Any]) -> None:
        with collective("the ring pass", self.rank):
            for r in reqs:
                r.wait()

    def all_reduce_max(self, x: Tensor) -> Tensor:
        """Element-wise maximum over the ranks (no gradient: used for stabilisers that cancel)."""
        out = x.detach().contiguous().clone()
        _record("all_reduce", self._allreduce_bytes(out))
        with collective("an all-reduce (MAX)", self.rank):
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum over the ranks, differentiable (the gradient is the all-reduced gradient)."""
        return _AllReduceSum.apply(x, self)

    def all_to_all(self, x: Tensor, send_rows: list[int], recv_rows: list[int]) -> Tensor:
        """Rows ``x[sum(send_rows[:r]) : ...]`` go to rank ``r``; returns the rows received, in rank
        order. Differentiable (the backward is the reverse exchange)."""
        return _AllToAll.apply(x, self, tuple(send_rows), tuple(recv_rows))

    def _allreduce_bytes(self, x: Tensor) -> float:
        return 2.0 * (self.world - 1) / self.world * nbytes(x)

    def _all_to_all(self, x: Tensor, send_rows: tuple[int, ...], recv_rows: tuple[int, ...], op: str) -> Tensor:
        x = x.contiguous()
        row = nbytes(x[:1]) if x.shape[0] else 0
        _record(op, row * (sum(send_rows) - send_rows[self.rank]))
        out = x.new_empty(sum(recv_rows), *x.shape[1:])
        with collective(f"an all-to-all ({op})", self.rank):
            dist.all_to_all_single(out, x, list(recv_rows), list(send_rows), group=self.group)
        return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm) -> Tensor:  # type: ignore[override]
        ctx.comm = comm
        out = x.contiguous().clone()
        _record("all_reduce", comm._allreduce_bytes(out))
        with collective("an all-reduce (SUM)", comm.rank):
            dist.all_reduce(out, group=comm.group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        g = g.contiguous().clone()
        _record("all_reduce_bwd", ctx.comm._allreduce_bytes(g))
        with collective("an all-reduce (SUM, backward)", ctx.comm.rank):
            dist.all_reduce(g, group=ctx.comm.group)
        return g, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm, send_rows: tuple[int, ...], recv_rows: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.comm, ctx.send_rows, ctx.recv_rows = comm, send_rows, recv_rows
        return comm._all_to_all(x, send_rows, recv_rows, "all_to_all")

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return ctx.comm._all_to_all(g, ctx.recv_rows, ctx.send_rows, "all_to_all_bwd"), None, None, None
