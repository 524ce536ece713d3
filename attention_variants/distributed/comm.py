"""The collectives context parallelism uses, each counting the bytes this rank sends.

Counting rules (what a rank puts on the wire, by the textbook algorithm of each collective):
a point-to-point send counts its tensor; an all-to-all counts the parts sent to other ranks;
an all-reduce counts ``2 (P - 1) / P`` times its tensor (ring reduce-scatter + all-gather);
metadata checks (shapes, a few integers) are not counted. :func:`count_bytes` collects them.
The differentiable collectives here count their backward traffic too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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


class Comm:
    """A process group (None: the world) with this rank's index and the group size."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed initialised (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # NCCL moves CUDA tensors only: small metadata goes where the data lives; gloo keeps it on the CPU.
        self.meta_device = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")

    def peer(self, r: int) -> int:
        """The global rank of group rank ``r`` (point-to-point calls take global ranks)."""
        return r if self.group is None else dist.get_global_rank(self.group, r)

    # -- uncounted metadata ----------------------------------------------------------------------

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (same length on all ranks), for agreement checks."""
        mine = torch.tensor(values, dtype=torch.int64, device=self.meta_device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [o.tolist() for o in out]

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
        return bufs, dist.batch_isend_irecv(ops)

    @staticmethod
    def ring_wait(reqs: list) -> None:
        for r in reqs:
            r.wait()

    def all_reduce_max(self, x: Tensor) -> Tensor:
        """Element-wise maximum over the ranks (no gradient: used for stabilisers that cancel)."""
        out = x.detach().contiguous().clone()
        _record("all_reduce", self._allreduce_bytes(out))
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
        dist.all_to_all_single(out, x, list(recv_rows), list(send_rows), group=self.group)
        return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm) -> Tensor:  # type: ignore[override]
        ctx.comm = comm
        out = x.contiguous().clone()
        _record("all_reduce", comm._allreduce_bytes(out))
        dist.all_reduce(out, group=comm.group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        g = g.contiguous().clone()
        _record("all_reduce_bwd", ctx.comm._allreduce_bytes(g))
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
