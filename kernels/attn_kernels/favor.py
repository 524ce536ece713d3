"""Fused Performer (FAVOR+) attention in Triton, the legacy implementation (forward and backward,
causal and non-causal), and :func:`favor_attention`, the entry point that runs the chunked one
(:mod:`attn_kernels.favor_chunk`) unless the tuning table's ``favor_impl`` picks this one.

Semantics are those of :mod:`attention_variants.performer`. Per (batch, head), with
``s = scale ** 0.5`` and ``Ws = W * s`` (the scale is folded into the projection)::

    logit(x) = x . Ws^T - s^2 |x|^2 / 2                      (m features, float32)
    phi(x)   = exp(logit(x) - c)                                  kernel="softmax"
    phi(x)   = relu(x . Ws^T) + 1e-3                              kernel="relu"
    out_i    = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)      (visible j)

The ``1 / sqrt(m)`` of the definition and both stabilisers cancel in the ratio, so the kernels
drop the former and pick: for keys, one ``c`` per (batch, key head), the maximum logit over all
keys and features (found by a first reduction pass, :func:`_key_max_kernel`); for queries, the
row maximum, tracked online across feature blocks exactly like the running maximum of
flash attention, so a query row never holds more than ``BLOCK_F`` features at a time.

Kernels (``P`` = ``M_PAD`` padded features, ``Dv`` padded value dim)::

    _key_max_kernel   K             -> partial maxima of the key logits       (softmax only)
    _state_kernel     X, Y, stab    -> per segment: sum_rows f(x) y^T (P x Dv), sum_rows f(x) w
    _fwd_kernel       Q, state[, K, V of the diagonal chunk] -> O, lse
    _bwd_dq_kernel    Q, dO, lse, state[, K, V]               -> dQ
    _bwd_dkv_kernel   K, V, suffix state of queries[, Q, dO]  -> dK, dV

Non-causal: the key pass (``_state_kernel`` on K, V) sums ``phi(K)^T [V, 1]`` over split ranges
of N; the splits are added on the host (P x Dv per head); the query pass applies it.

Causal (bottom-right: query ``i`` sits at position ``p = i + Nk - Nq`` and sees keys ``j <= p``)
is chunked along positions with chunk ``C``: query chunk ``t`` reads the prefix state of key
chunks ``< t`` and its own key chunk under a ``j <= p`` mask. The state kernel writes one
local state per chunk into slot ``t + 1`` of a buffer whose slot 0 is zero; an in-place
cumulative sum over the slots leaves the exclusive prefix each chunk reads:
``(N / C + 1) * P * Dv`` floats per head, O(N m) for ``C >= Dv``, never an ``N x m x Dv``
tensor. A query chunk runs as ``C / BLOCK_M`` programs, each holding the whole diagonal key
chunk. The backward is the same algebra run twice: ``dQ`` reads the key prefix states, ``dK,
dV`` the query suffix states ``sum_i psi_i dO_i^T``, ``sum_i psi_i (dO_i . O_i)``, ``psi_i = phi(q_i) / den_i``.

Precision: the feature map must be float32-accurate (an error ``e`` in a logit is a relative
error ``e`` in ``phi``, and logits reach tens). 16-bit inputs are exact in their own dtype, so
``Ws`` is split on the host into two terms of that dtype (``hi + lo``: 22 bits for float16,
16 for bfloat16, a logit error near 1e-4) and the projection takes two native tensor-core
products; float32 inputs take one ``tf32x3`` product. The products of features (``phi S``,
``phi(Q) phi(K)^T``, ``A V`` and their backward) use TF32 operands for 16-bit inputs (float32
range, so small features do not flush as they would in float16) and ``tf32x3`` for float32
inputs. Everything accumulates in float32.

Rows with no visible key have ``den == 0``: the output is 0 and ``lse = +inf`` makes their
backward features exactly 0.

Key padding: an int8 key-valid vector ``(B, Nk)`` is folded into the row mask of every kernel
that reads keys, so a padded key has zero features: it adds nothing to the key states, the
diagonal chunks or the key stabiliser, and its ``dK``, ``dV`` are 0 (``HAS_PAD``; without a
mask the kernels compile as before).

Layout: kernels in :mod:`attn_kernels.favor_kernels`, configs in :mod:`attn_kernels.favor_configs`,
the launch plumbing shared with the softmax kernels in :mod:`attn_kernels.launch`.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from . import favor_chunk_configs
from .env import device_capability
from .favor_chunk import chunk_attention
from .favor_configs import (
    BLOCK_ROWS,
    CHUNK,
    MAX_FEATURES,
    MAX_HEAD_DIM,
    N_SPLIT,
    ROW_BLOCK,
    SUPPORTED_DTYPES,
    TUNE_KEYS,
    kept_configs,
    precisions,
)
from .favor_kernels import _bwd_dkv_kernel, _bwd_dq_kernel, _fwd_kernel, _key_max_kernel, _state_kernel
from .launch import LaunchOptions, LaunchShape, launch, pad_pow2


def unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the FAVOR+ kernels cannot run ``variant`` for this device, dtype and head dim, or None."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton FAVOR+ kernels support float16, bfloat16 and float32, not {dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"the Triton FAVOR+ kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    m = getattr(variant, "num_features", None)
    if m is not None and m > MAX_FEATURES:
        return f"the Triton FAVOR+ kernels support up to {MAX_FEATURES} random features, got {m}"
    kernel = getattr(variant, "kernel", "softmax")
    if kernel not in ("softmax", "relu"):
        return f"the Triton FAVOR+ kernels implement kernel='softmax' and 'relu', not {kernel!r}"
    if device.type == "cuda" and device_capability(device) < (8, 0):
        return "the Triton FAVOR+ kernels need compute capability 8.0 or newer (TF32 tensor cores)"
    return None


@dataclass(frozen=True)
class FavorOptions(LaunchOptions):
    """Non-tensor options of one FAVOR+ call, passed to the autograd function as one object."""

    kernel: str
    m: int  # number of random features

    @property
    def half_s2(self) -> float:
        """``s^2 / 2`` with ``s = scale ** 0.5``: the factor of ``|x|^2`` in the logits."""
        return 0.5 * self.scale


@dataclass(frozen=True)
class _Geometry:
    b: int
    h: int
    hk: int
    nq: int
    nk: int
    d: int
    dv: int
    m_pad: int
    d_pad: int
    dv_pad: int
    fp32: bool

    @property
    def groups(self) -> int:
        return self.h // self.hk

    @property
    def off(self) -> int:
        return self.nk - self.nq

    def shape(self, causal: bool) -> LaunchShape:
        return LaunchShape(max(self.d, self.dv), 4 if self.fp32 else 2, causal, m_pad=self.m_pad)


def _launch(kernel_name: str, fn, grid, args: tuple, shape: LaunchShape, **constexprs) -> None:
    """Launch ``fn`` over the kept configs of ``kernel_name`` (autotuned on a GPU, see
    :func:`attn_kernels.launch.launch`); ``grid`` maps the launch's constexprs to the grid."""
    configs = kept_configs(kernel_name, shape)  # looked up here: tests/test_favor_gpu.py patches it
    row = ROW_BLOCK.get(kernel_name)
    launch(fn, configs, grid, args, row=row, inner="BLOCK_F", tune_keys=TUNE_KEYS, **constexprs)


def _prepare_projection(w: Tensor, dtype: torch.dtype, opts: FavorOptions, geo: _Geometry) -> tuple[Tensor, Tensor]:
    """``Ws = W * scale ** 0.5`` zero-padded to ``(M_PAD, D_PAD)`` (float32, for the backward), and
    ``Ws^T`` as the kernels' projection operand: ``(N_SPLIT, D_PAD, M_PAD)`` terms in ``dtype``
    that add up to ``Ws^T`` (float32 inputs: one float32 term).
    """
    ws = torch.zeros(geo.m_pad, geo.d_pad, device=w.device, dtype=torch.float64)
    ws[: w.shape[0], : w.shape[1]] = w.to(torch.float64) * math.sqrt(opts.scale)
    rest = ws.t().contiguous()
    n_split = N_SPLIT[dtype]
    if n_split == 0:
        return ws.float(), rest.float()[None].contiguous()
    terms = []
    for _ in range(n_split):
        terms.append(rest.to(dtype))
        rest = rest - terms[-1].double()
    return ws.float(), torch.stack(terms).contiguous()


@functools.lru_cache(maxsize=16)
def _no_padding(device: torch.device) -> Tensor:
    """The int8 placeholder passed as the key-valid pointer when there is no padding (never read)."""
    return torch.zeros(1, dtype=torch.int8, device=device)


# (id(W), its version, dtype, scale, M_PAD, D_PAD) -> (a weak reference to W, Ws, Ws^T terms).
_PROJECTIONS: dict[tuple, tuple[weakref.ref, Tensor, Tensor]] = {}
_MAX_PROJECTIONS = 64


def _projection_operands(w: Tensor, dtype: torch.dtype, opts: FavorOptions, geo: _Geometry) -> tuple[Tensor, Tensor]:
    """:func:`_prepare_projection`, made once per projection tensor (unchanged since), dtype and
    scale: a model calls the same ``W`` layer after layer, step after step. Treated as read-only."""
    if w.is_inference():  # keeps no version counter: not cached
        with torch.inference_mode(False):
            return _prepare_projection(w, dtype, opts, geo)
    key = (id(w), w._version, dtype, opts.scale, geo.m_pad, geo.d_pad)
    hit = _PROJECTIONS.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1], hit[2]
    with torch.inference_mode(False):  # the cache serves calls in every mode
        ws, wt = _prepare_projection(w, dtype, opts, geo)
    if len(_PROJECTIONS) >= _MAX_PROJECTIONS:
        _PROJECTIONS.clear()
    _PROJECTIONS[key] = (weakref.ref(w), ws, wt)
    return ws, wt


def _pad_arg(kpm: Tensor | None, device: torch.device) -> tuple[Tensor, bool]:
    """``(kpm_ptr, HAS_PAD)`` of a launch: the int8 key-valid vector, or a placeholder and False."""
    if kpm is None:
        return _no_padding(device), False
    return kpm, True


def _key_stabiliser(k: Tensor, wt: Tensor, kpm: Tensor | None, opts: FavorOptions, geo: _Geometry) -> Tensor:
    """``c`` per (batch, key head): the maximum key logit over all real keys and features, float32
    (0 for a head whose keys are all padded)."""
    bhk = geo.b * geo.hk
    if opts.kernel != "softmax":
        return torch.zeros(bhk, device=k.device, dtype=torch.float32)
    n_blocks = triton.cdiv(geo.nk, BLOCK_ROWS)
    part = torch.empty(bhk, n_blocks, device=k.device, dtype=torch.float32)
    kpm_arg, has_pad = _pad_arg(kpm, k.device)
    _launch(
        "key_max",
        _key_max_kernel,
        lambda p: (n_blocks, bhk),
        (k, wt, part, kpm_arg, geo.nk, geo.d, opts.m, opts.half_s2, n_blocks, geo.hk),
        geo.shape(opts.causal),
        D_PAD=geo.d_pad,
        M_PAD=geo.m_pad,
        BLOCK_N=BLOCK_ROWS,
        N_SPLIT=N_SPLIT[k.dtype],
        HAS_PAD=has_pad,
    )
    c = part.amax(dim=1)
    if has_pad:  # no real key: -inf; any finite value does, since the features are all 0
        c = torch.where(torch.isfinite(c), c, 0.0)
    return c


@dataclass(frozen=True)
class _Slots:
    """Where per-segment states live: ``n`` slots per head; segment/chunk ``t`` uses ``first + step * t``."""

    n: int
    first: int = 0
    step: int = 1

    def args(self) -> tuple[int, int, int]:
        return (self.n, self.first, self.step)


_TOTAL = _Slots(1, 0, 0)  # one total state per head


def _segment_sums(
    x: Tensor,
    y: Tensor,
    stab: Tensor,
    wgt: Tensor | None,
    wt: Tensor,
    opts: FavorOptions,
    geo: _Geometry,
    *,
    n_rows: int,
    off: int,
    seg: int,
    n_seg: int,
    slots: _Slots,
    stab_mode: int,
    kpm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per segment of ``seg`` positions: ``S (BH, slots.n, M_PAD, DV_PAD)``, ``z (BH, slots.n, M_PAD)``.

    Slots that no segment writes are left for the caller to fill. ``kpm``: the key-valid vector
    (keys only), whose padded rows add nothing.
    """
    bh = x.shape[0] * x.shape[1]
    kpm_arg, has_pad = _pad_arg(kpm, x.device)
    s = torch.empty(bh, slots.n, geo.m_pad, geo.dv_pad, device=x.device, dtype=torch.float32)
    z = torch.empty(bh, slots.n, geo.m_pad, device=x.device, dtype=torch.float32)
    _launch(
        "state",
        _state_kernel,
        lambda p: (geo.m_pad // p["BLOCK_F"], n_seg, bh),
        (
            x,
            y,
            stab,
            x if wgt is None else wgt,
            wt,
            s,
            z,
            kpm_arg,
            n_rows,
            off,
            seg,
            geo.d,
            y.shape[-1],
            opts.m,
            opts.half_s2,
            *slots.args(),
            x.shape[1],
        ),
        geo.shape(opts.causal),
        D_PAD=geo.d_pad,
        DV_PAD=geo.dv_pad,
        M_PAD=geo.m_pad,
        BLOCK_N=CHUNK if opts.causal else BLOCK_ROWS,
        KERNEL=opts.kernel,
        STAB=stab_mode,
        HAS_WEIGHT=wgt is not None,
        HAS_PAD=has_pad,
        **precisions(x.dtype),
    )
    return s, z


def _n_splits(n: int, programs: int, device: torch.device) -> int:
    """Splits of N for the non-causal state pass: enough programs to fill the GPU."""
    blocks = triton.cdiv(n, BLOCK_ROWS)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(2 * sms, max(programs, 1))))


def _split_segments(n: int, programs: int, device: torch.device) -> tuple[int, int]:
    """``(seg, n_seg)``: N cut into whole row blocks for the non-causal state pass."""
    splits = _n_splits(n, programs, device)
    seg = BLOCK_ROWS * triton.cdiv(triton.cdiv(n, BLOCK_ROWS), splits)
    return seg, triton.cdiv(n, seg)


def _key_states(
    k: Tensor, v: Tensor, wt: Tensor, kstab: Tensor, kpm: Tensor | None, opts: FavorOptions, geo: _Geometry
):
    """Key states of the query pass: ``(S, z, slots)``, one total (non-causal) or, causal, the
    exclusive prefix of chunk ``t`` in slot ``t``.

    Causal, without a copy: chunk ``t`` writes its local state to slot ``t + 1``, slot 0 is
    zero, and an in-place cumulative sum over the slots leaves the exclusive prefixes.
    """
    if opts.causal:
        n_seg = triton.cdiv(geo.nk, CHUNK)
        s, z = _segment_sums(
            k, v, kstab, None, wt, opts, geo, n_rows=geo.nk, off=0, seg=CHUNK, n_seg=n_seg,
            slots=_Slots(n_seg + 1, 1, 1), stab_mode=1, kpm=kpm,
        )  # fmt: skip
        s[:, 0], z[:, 0] = 0.0, 0.0
        return s.cumsum_(dim=1), z.cumsum_(dim=1), _Slots(n_seg + 1, 0, 1)
    seg, n_seg = _split_segments(geo.nk, geo.b * geo.hk * (geo.m_pad // 32), k.device)
    s, z = _segment_sums(
        k, v, kstab, None, wt, opts, geo, n_rows=geo.nk, off=0, seg=seg, n_seg=n_seg, slots=_Slots(n_seg), stab_mode=1,
        kpm=kpm,
    )  # fmt: skip
    return s.sum(dim=1).contiguous(), z.sum(dim=1).contiguous(), _TOTAL


def _query_states(q, dout, lse, delta, wt, opts: FavorOptions, geo: _Geometry):
    """Query-side states of the backward, per key head (summed over its query heads).

    ``R = sum_i psi_i dO_i^T``, ``r = sum_i psi_i delta_i``: one total (non-causal) or, causal,
    the exclusive suffix over the chunks after ``t``. Causal: chunk ``t`` writes slot
    ``NT - t`` (reversed), slot 0 is zero, and after an in-place cumulative sum slot ``NT - 1 - t``
    holds the sum over chunks ``> t``.
    """
    b, hk, g = geo.b, geo.hk, geo.groups
    if opts.causal:
        n_seg = triton.cdiv(geo.nk, CHUNK)
        slots = _Slots(n_seg + 1, n_seg, -1)
        r, rz = _segment_sums(
            q, dout, lse, delta, wt, opts, geo, n_rows=geo.nq, off=geo.off, seg=CHUNK, n_seg=n_seg,
            slots=slots, stab_mode=2,
        )  # fmt: skip
        r[:, 0], rz[:, 0] = 0.0, 0.0
        if g > 1:
            r = r.view(b * hk, g, *r.shape[1:]).sum(dim=1)
            rz = rz.view(b * hk, g, *rz.shape[1:]).sum(dim=1)
        return r.cumsum_(dim=1), rz.cumsum_(dim=1), _Slots(n_seg + 1, n_seg - 1, -1)
    seg, n_seg = _split_segments(geo.nq, geo.b * geo.h * (geo.m_pad // 32), q.device)
    r, rz = _segment_sums(
        q, dout, lse, delta, wt, opts, geo, n_rows=geo.nq, off=0, seg=seg, n_seg=n_seg, slots=_Slots(n_seg),
        stab_mode=2,
    )  # fmt: skip
    r = r.view(b * hk, g * n_seg, geo.m_pad, geo.dv_pad).sum(dim=1).contiguous()
    rz = rz.view(b * hk, g * n_seg, geo.m_pad).sum(dim=1).contiguous()
    return r, rz, _TOTAL


def _first_chunk(opts: FavorOptions, geo: _Geometry) -> int:
    """Chunk ``T0`` of the first query position (floor: negative when Nq > Nk, whose leading
    queries see no key); 0 when not causal."""
    return geo.off // CHUNK if opts.causal else 0


def _query_grid(opts: FavorOptions, geo: _Geometry):
    """The grid of the query-block kernels (``fwd``, ``bwd_dq``) from their constexprs."""
    bh = geo.b * geo.h
    if opts.causal:
        n_chunks = triton.cdiv(geo.nk, CHUNK) - _first_chunk(opts, geo)
        return lambda p: (n_chunks * (CHUNK // p["BLOCK_M"]), bh)
    return lambda p: (triton.cdiv(geo.nq, p["BLOCK_M"]), bh)


def _forward(q: Tensor, k: Tensor, v: Tensor, w: Tensor, kpm: Tensor | None, opts: FavorOptions, geo: _Geometry):
    ws, wt = _projection_operands(w, q.dtype, opts, geo)
    kstab = _key_stabiliser(k, wt, kpm, opts, geo)
    s, z, slots = _key_states(k, v, wt, kstab, kpm, opts, geo)
    kpm_arg, has_pad = _pad_arg(kpm, q.device)
    out = torch.empty(geo.b, geo.h, geo.nq, geo.dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(geo.b, geo.h, geo.nq, device=q.device, dtype=torch.float32)
    t0 = _first_chunk(opts, geo)
    _launch(
        "fwd",
        _fwd_kernel,
        _query_grid(opts, geo),
        (
            q,
            k,
            v,
            wt,
            s,
            z,
            kstab,
            out,
            lse,
            kpm_arg,
            geo.nq,
            geo.nk,
            geo.off,
            t0,
            *slots.args(),
            geo.d,
            geo.dv,
            opts.m,
            opts.half_s2,
            geo.groups,
            geo.hk,
        ),
        geo.shape(opts.causal),
        D_PAD=geo.d_pad,
        DV_PAD=geo.dv_pad,
        M_PAD=geo.m_pad,
        CHUNK=CHUNK,
        CAUSAL=opts.causal,
        KERNEL=opts.kernel,
        HAS_PAD=has_pad,
        **precisions(q.dtype),
    )
    return out, lse, kstab, ws, wt, (s, z) if not opts.causal else None


def _backward(q, k, v, out, dout, lse, kstab, ws, wt, saved_state, kpm, opts: FavorOptions, geo: _Geometry):
    delta = (dout.float() * out.float()).sum(dim=-1)
    if saved_state is not None:
        s, z, slots = *saved_state, _TOTAL
    else:
        s, z, slots = _key_states(k, v, wt, kstab, kpm, opts, geo)
    kpm_arg, has_pad = _pad_arg(kpm, q.device)
    dq = torch.empty_like(q)
    t0 = _first_chunk(opts, geo)
    common = {
        "D_PAD": geo.d_pad,
        "DV_PAD": geo.dv_pad,
        "M_PAD": geo.m_pad,
        "CHUNK": CHUNK,
        "CAUSAL": opts.causal,
        "KERNEL": opts.kernel,
        "HAS_PAD": has_pad,
        **precisions(q.dtype),
    }
    _launch(
        "bwd_dq",
        _bwd_dq_kernel,
        _query_grid(opts, geo),
        (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            wt,
            ws,
            s,
            z,
            kstab,
            dq,
            kpm_arg,
            geo.nq,
            geo.nk,
            geo.off,
            t0,
            *slots.args(),
            geo.d,
            geo.dv,
            opts.m,
            opts.half_s2,
            geo.groups,
            geo.hk,
        ),
        geo.shape(opts.causal),
        **common,
    )
    r, rz, slots = _query_states(q, dout, lse, delta, wt, opts, geo)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _launch(
        "bwd_dkv",
        _bwd_dkv_kernel,
        lambda p: (triton.cdiv(geo.nk, p["BLOCK_N"]), geo.b * geo.hk),
        (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            wt,
            ws,
            r,
            rz,
            kstab,
            dk,
            dv,
            kpm_arg,
            geo.nq,
            geo.nk,
            geo.off,
            *slots.args(),
            geo.d,
            geo.dv,
            opts.m,
            opts.half_s2,
            geo.groups,
            geo.hk,
        ),
        geo.shape(opts.causal),
        **common,
    )
    return dq, dk, dv


class _FavorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, w: Tensor, kpm: Tensor | None, opts: FavorOptions) -> Tensor:  # type: ignore[override]
        geo = _geometry(q, k, v, opts)
        out, lse, kstab, ws, wt, state = _forward(q, k, v, w, kpm, opts, geo)
        ctx.opts, ctx.geo, ctx.kpm = opts, geo, kpm
        ctx.save_for_backward(q, k, v, out, lse, kstab, ws, wt, *(state or ()))
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse, kstab, ws, wt, *state = ctx.saved_tensors
        dq, dk, dv = _backward(
            q, k, v, out, dout.contiguous(), lse, kstab, ws, wt, tuple(state) or None, ctx.kpm, ctx.opts, ctx.geo
        )
        return dq, dk, dv, None, None, None


def _geometry(q: Tensor, k: Tensor, v: Tensor, opts: FavorOptions) -> _Geometry:
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    fp32 = q.dtype == torch.float32
    return _Geometry(b, h, hk, nq, nk, d, dv, pad_pow2(opts.m), pad_pow2(d), pad_pow2(dv), fp32)


def favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    *,
    causal: bool,
    scale: float,
    kernel: str,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Fused FAVOR+ attention, differentiable in ``q``, ``k``, ``v``: the chunked kernels, or the
    legacy ones where the tuning table's ``favor_impl`` says so (:func:`favor_chunk_configs.impl`).

    ``q (B, H, Nq, D)``, ``k (B, Hk, Nk, D)``, ``v (B, Hk, Nk, Dv)`` with ``H % Hk == 0``, in
    float16, bfloat16 or float32 on one device; ``w (m, D)`` the float32 projection (no gradient);
    ``key_padding_mask`` bool ``(B, Nk)``, True = real key, or None: padded keys add nothing to
    the key states nor to the key stabiliser, and get zero gradients.
    Returns ``(B, H, Nq, Dv)`` in the dtype of ``q``. Causal is bottom-right aligned; rows that see
    no key are zero. Inputs are assumed valid (the public API validates them).
    """
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    w = w.detach() if w.requires_grad else w  # the same tensor call after call: see _projection_operands
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    key = (q.shape[-1], v.shape[-1], q.dtype, causal, w.shape[0], q.device)
    if favor_chunk_configs.impl_for(key) == "chunk":
        return chunk_attention(q, k, v, w, causal=causal, scale=scale, kernel=kernel, kpm=kpm)
    opts = FavorOptions(causal=causal, scale=float(scale), kernel=kernel, m=int(w.shape[0]))
    return _FavorFunction.apply(q, k, v, w, kpm, opts)
