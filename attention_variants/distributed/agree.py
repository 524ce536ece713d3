"""The agreement step of a context-parallel call, the first thing every rank does.

A rank that refused its inputs on its own would leave the others waiting in the first collective
until the process group's timeout. So each rank checks its inputs and describes them as plain
data *without raising* (:func:`local_verdict`: :func:`check_local`, then :func:`describe`:
shapes, dtype, device type, options, fingerprints of tensor options such as a Performer
projection, which inputs require grad), and the ranks exchange a hash of that description and
the verdict (one tiny all-to-all). Only if some rank refused its inputs, or the hashes differ,
do they exchange the descriptions themselves, and every rank raises the same ValueError: the
first refusing rank's message, or the first field on which the ranks disagree, with each
rank's value.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..base import BACKENDS, AttentionVariant, get_variant
from ..checks import check_causal, resolve_scale, validate_key_padding_mask, validate_qkv
from ..sliding_window import SlidingWindowAttention
from .comm import Comm
from .layout import check_layout, check_length
from .strategy import FALLBACK, strategy_of

WHO = "context_parallel_attention"
SHOWN_VALUES = 16  # an integer tensor option up to this size is shown by value, a larger one by fingerprint


@dataclass(frozen=True)
class LocalCall:
    """One rank's call, checked on this rank alone."""

    q: Tensor
    k: Tensor
    v: Tensor
    kpm: Tensor | None
    variant: AttentionVariant
    layout: str
    causal: bool
    scale: float
    backend: str  # as asked
    resolved: str  # the backend the shards run on


def check_local(
    q: Any, k: Any, v: Any, variant: Any, layout: Any, causal: Any, scale: Any, backend: Any, kpm: Any, options: dict
) -> LocalCall:
    """Every check that needs this rank's inputs only (TypeError/ValueError on a bad one). The
    checks that need the whole sequence's length come after the agreement (:func:`check_whole`)."""
    validate_qkv(q, k, v)
    if q.device.type == "meta":
        raise ValueError("context parallelism needs tensors with values, got meta tensors")
    layout = check_layout(layout)
    causal = check_causal(causal)
    scale = resolve_scale(scale, q.shape[-1])
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"context parallelism is self-attention: q and k shards need one length, got {q.shape[2]} and {k.shape[2]}"
        )
    kpm = validate_key_padding_mask(kpm, q, k)
    var = get_variant(variant, **options)
    own = strategy_of(var) != FALLBACK  # raises for a declared strategy that cannot run this variant
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    resolved = var.resolve_backend(backend, q, v, padding=kpm is not None)
    if own and resolved not in BACKENDS:
        raise ValueError(f"backend={resolved!r}: context parallelism runs the backends {', '.join(BACKENDS)}")
    if not isinstance(var, SlidingWindowAttention):  # its global tokens are checked against the whole N
        var.check_call(q, k, v, causal)
    return LocalCall(q, k, v, kpm, var, layout, causal, scale, backend, resolved)


def local_verdict(*args: Any) -> tuple[LocalCall | None, dict[str, Any], str | None]:
    """:func:`check_local` and :func:`describe`, never raising: ``(call, description, None)``
    or ``(None, {}, why not)``."""
    try:
        call = check_local(*args)
        return call, describe(call), None
    except (TypeError, ValueError) as exc:
        return None, {}, str(exc)
    except Exception as exc:  # anything else must not keep this rank from the agreement either
        return None, {}, f"{type(exc).__name__}: {exc}"


def plain(x: Any) -> Any:
    """``x`` as JSON data that compares equal on two ranks exactly when the values are equal:
    scalars as they are, sequences as lists, a small integer or bool tensor as its values, any
    other tensor as ``"<dtype> tensor (<shape>) #<hash of its values>"``."""
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, tuple | list):
        return [plain(i) for i in x]
    if isinstance(x, Tensor):
        dtype = str(x.dtype).removeprefix("torch.")
        if not x.is_floating_point() and not x.is_complex() and x.numel() <= SHOWN_VALUES:
            return f"{dtype} tensor {x.tolist()}"
        data = x.detach().to("cpu", torch.complex128 if x.is_complex() else torch.float64).contiguous()
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=6).hexdigest()
        return f"{dtype} tensor {tuple(x.shape)} #{digest}"
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return f"{type(x).__name__} {x!r}"


def describe(call: LocalCall) -> dict[str, Any]:
    """What every rank's call must share, field by field (the names the error message uses)."""
    var = call.variant
    out: dict[str, Any] = {"variant": var.name}
    out.update({name: plain(getattr(var, name, None)) for name in var.option_names()})
    out.update(layout=call.layout, causal=call.causal, scale=call.scale, backend=call.backend)
    out["backend used"] = call.resolved
    for name, t in (("q", call.q), ("k", call.k), ("v", call.v)):
        out[f"{name} shape"] = list(t.shape)
    out["dtype"] = plain(call.q.dtype)
    out["device type"] = call.q.device.type
    out["key_padding_mask"] = None if call.kpm is None else list(call.kpm.shape)
    # A rank whose graph holds a collective's backward that another's lacks would wait in it.
    out["requires grad (q, k, v)"] = [torch.is_grad_enabled() and t.requires_grad for t in (call.q, call.k, call.v)]
    return out


def _show(x: Any) -> str:
    if isinstance(x, list):
        return "(" + ", ".join(_show(i) for i in x) + ")"
    return str(x)


def _who_has(values: list[Any]) -> str:
    """``"ranks 0, 1 have 3, rank 2 has 5"``: the ranks grouped by value, in rank order."""
    groups: list[tuple[Any, list[int]]] = []
    for r, x in enumerate(values):
        for value, ranks in groups:
            if value == x:
                ranks.append(r)
                break
        else:
            groups.append((x, [r]))
    parts = []
    for value, ranks in groups:
        who = f"rank {ranks[0]} has" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} have"
        parts.append(f"{who} {_show(value)}")
    return ", ".join(parts)


def agreement_problem(reports: list[dict[str, Any]]) -> str | None:
    """The error every rank raises, from every rank's ``{"error": str | None, "inputs": dict}``
    (rank order), or None when all agree: the first rank that refused its inputs, else the first
    field the ranks disagree on (with each rank's value) and the names of any others."""
    refused = [r for r, rep in enumerate(reports) if rep["error"] is not None]
    if refused:
        more = f" (ranks {', '.join(map(str, refused))} refused their inputs)" if len(refused) > 1 else ""
        return f"{WHO}: rank {refused[0]}: {reports[refused[0]]['error']}{more}"
    fields: list[str] = []
    for rep in reports:
        fields += [f for f in rep["inputs"] if f not in fields]
    differ = [f for f in fields if any(rep["inputs"].get(f) != reports[0]["inputs"].get(f) for rep in reports)]
    if not differ:
        return None
    first = differ[0]
    also = f" (they also differ on {', '.join(differ[1:])})" if differ[1:] else ""
    values = [rep["inputs"].get(first) for rep in reports]
    return f"{WHO}: ranks disagree on {first}: {_who_has(values)}{also}"


def _hash_ints(data: bytes) -> list[int]:
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return [int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True)]


def agree(comm: Comm, call: LocalCall | None, inputs: dict[str, Any], error: str | None) -> LocalCall:
    """Exchange every rank's verdict and description (:func:`local_verdict`); returns ``call``
    when all ranks accepted theirs and agree, raises the same ValueError on every rank otherwise."""
    blob = json.dumps({"error": error, "inputs": inputs}).encode()
    mine = [*_hash_ints(json.dumps(inputs).encode()), int(error is not None), len(blob)]
    every = comm.exchange_ints(mine)
    if not any(e[2] for e in every) and all(e[:2] == every[0][:2] for e in every):
        assert call is not None
        return call
    # Every rank sees the same integers, so every rank takes this branch and exchanges the blobs.
    blobs = comm.exchange_bytes(blob, max(e[3] for e in every))
    reports = [json.loads(b[: e[3]].decode()) for b, e in zip(blobs, every, strict=True)]
    problem = agreement_problem(reports)
    raise ValueError(problem or f"{WHO}: the ranks' descriptions differ")


def check_whole(call: LocalCall, world: int) -> int:
    """The checks that need the whole sequence's length ``N = n P`` (returned); run after the
    agreement, on the same inputs on every rank, so every rank raises the same ValueError."""
    n_total = call.q.shape[2] * world
    check_length(n_total, world, call.layout)
    if isinstance(call.variant, SlidingWindowAttention):
        try:
            call.variant.global_mask(n_total)  # global positions are positions of the whole sequence
        except ValueError as exc:
            raise ValueError(f"{WHO}: {exc} ({world} shards of {call.q.shape[2]} tokens)") from None
    return n_total
