"""Chunked FAVOR+ attention in Triton (the form of flash-linear-attention's chunk kernels), forward
and backward, causal and non-causal: the host side of :mod:`attn_kernels.favor_chunk_kernels`.

Semantics are those of :mod:`attention_variants.performer`. With ``Ws = W * scale ** 0.5`` and
logits in base 2 (``log2(e)`` folded into the projection)::

    key logit   l(k) = log2(e) (Ws k - scale |k|^2 / 2)
    query logit l(q) = log2(e) Ws q                        (its |q|^2 term cancels in the ratio)
    phi         = exp2(l - shift)                          kernel="softmax"
                = relu(Ws x) + 1e-3                         kernel="relu" (no shift)
    out_i       = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)      (visible j)

Forward, one pass per kind of work::

    _key_features_kernel  K -> phi(K) (BHk, NT*C, M_PAD) in FEAT, each key projected once, and its
                          chunk's shift per feature c (BHk, NT, M_PAD)
    _state_kernel         phi(K), V -> states: causal, the state of the chunks before chunk t
                          (h in FEAT, z, frame F: slot t); not causal, partial sums over splits of N
    _combine_kernel       (not causal) the splits -> one total state h, z, F
    _fwd_kernel           Q, states, phi(K_t), V_t -> O, lse; each query projected once

``FEAT`` is the input's 16-bit dtype, or float32 for float32 inputs and for float16 inputs whose
gradient is wanted (:func:`attn_kernels.favor_chunk_configs.feature_dtype`). Products of features
take ``FEAT`` operands and accumulate in float32.

Frames (the key stabiliser). A key feature is stored with its own chunk's shift ``c[t, f]``. A
state is kept in a frame ``F[f]``, the running maximum of the shifts of the chunks it has seen
(``F_t`` includes chunk ``t``): when ``F`` rises the float32 state tile is scaled down, and each
chunk's features enter scaled by ``exp2(c_t - F)``. Shifts are whole numbers, so every rescale is
a power of two. Queries add ``F`` to their logits and subtract their row maximum, so the largest
product term of a row is near 1 and the shifts cancel. The decode path keeps the same running
maximum (:mod:`attention_variants.performer`).

Causal (bottom-right: query ``i`` sits at position ``p = i + Nk - Nq``) runs over chunks of
``C = 64`` positions: the query chunk ``t`` reads the state of key chunks ``< t`` and its own key
chunk under ``j <= p``. No ``N x m x Dv`` tensor; the states take ``(N / C) m Dv`` in ``FEAT``.

Backward (the features and states are recomputed, each key once)::

    _dq_kernel           dQ from the key prefix states; stores psi = phi(q) / den (FEAT) and
                         delta = dO . O by position
    _state_kernel        psi, dO -> query-side states R, r: causal, the chunks after t (frames F_t,
                         run backwards); not causal, splits + _combine_kernel
    _dk_kernel           dK from the query suffix states and the diagonal chunk (psi read)
    _dv_kernel           dV from the same (two kernels: each holds one accumulator tile)

Rows with no visible key have ``den == 0``: output 0, ``lse = +inf``, and zero gradients.
Key padding: padded keys get zero features (and no part in the shifts), so they add nothing;
their ``dK``, ``dV`` are 0.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import favor_chunk_configs as cfgs
from . import tuning
from .favor_chunk_configs import CHUNK, N_SPLIT, feature_dtype
from .favor_chunk_kernels import (
    _combine_kernel,
    _dk_kernel,
    _dq_kernel,
    _dv_kernel,
    _fwd_kernel,
    _key_features_kernel,
    _state_kernel,
)
from .launch import LaunchShape, cdiv, pad_pow2

LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class ChunkOptions:
    """Non-tensor options of one call."""

    causal: bool
    scale: float
    kernel: str  # "softmax" or "relu"
    m: int  # random features


@dataclass(frozen=True)
class _Geo:
    """Sizes of one call and what follows from them (made once per shape, :func:`_geometry`)."""

    b: int
    h: int
    hk: int
    nq: int
    nk: int
    d: int
    dv: int
    m: int
    m_pad: int
    d_pad: int
    dv_pad: int
    causal: bool
    softmax: bool
    scale: float
    feat: torch.dtype
    shape: LaunchShape
    device: torch.device

    @property
    def groups(self) -> int:
        return self.h // self.hk

    @property
    def off(self) -> int:
        return self.nk - self.nq

    @property
    def nt(self) -> int:
        """Key chunks (causal) or row chunks of the keys (the feature pass)."""
        return cdiv(self.nk, CHUNK)

    @property
    def npos(self) -> int:
        """Positions per head of the query-side buffers (psi, delta)."""
        return self.nt * CHUNK if self.causal else cdiv(self.nq, CHUNK) * CHUNK

    @property
    def t0(self) -> int:
        """Chunk of the first query position (floor; negative when Nq > Nk)."""
        return self.off // CHUNK if self.causal else 0

    @property
    def fp32(self) -> bool:
        return self.feat == torch.float32

    def cfg(self, kernel: str):
        return cfgs.config(kernel, self.shape, self.device)


def _geometry(qs: tuple, ks: tuple, dv: int, dtype: torch.dtype, opts: ChunkOptions, grad: bool, device) -> _Geo:
    b, h, nq, d = qs
    hk, nk = ks[1], ks[2]
    feat = feature_dtype(dtype, grad)
    m_pad, d_pad, dv_pad = pad_pow2(opts.m), pad_pow2(d), pad_pow2(dv)
    shape = LaunchShape(max(d, dv), feat.itemsize, opts.causal, m_pad=m_pad)
    return _Geo(
        b,
        h,
        hk,
        nq,
        nk,
        d,
        dv,
        opts.m,
        m_pad,
        d_pad,
        dv_pad,
        opts.causal,
        opts.kernel == "softmax",
        opts.scale,
        feat,
        shape,
        device,
    )


# ---------------------------------------------------------------------------------------------
# Projection operands, made once per projection tensor
# ---------------------------------------------------------------------------------------------

_PROJECTIONS: dict[tuple, tuple[weakref.ref, Tensor, Tensor]] = {}
_MAX_PROJECTIONS = 64


def _prepare_projection(w: Tensor, dtype: torch.dtype, geo: _Geo, scale: float) -> tuple[Tensor, Tensor]:
    """``(wt, ws)``: the projection of the logits, ``(terms, D_PAD, M_PAD)`` adding up to
    ``(Ws * log2(e))^T`` (softmax; relu: ``Ws^T``) in ``dtype`` (float32 feature path: one float32
    term), and ``Ws (M_PAD, D_PAD)`` in ``FEAT`` for the gradients."""
    ws = torch.zeros(geo.m_pad, geo.d_pad, device=w.device, dtype=torch.float64)
    ws[: w.shape[0], : w.shape[1]] = w.to(torch.float64) * math.sqrt(scale)
    rest = (ws * (LOG2E if geo.softmax else 1.0)).t().contiguous()
    if geo.fp32:
        return rest.float()[None].contiguous(), ws.float()
    terms = []
    for _ in range(N_SPLIT[dtype]):
        terms.append(rest.to(dtype))
        rest = rest - terms[-1].double()
    return torch.stack(terms).contiguous(), ws.to(geo.feat)


def _projection(w: Tensor, dtype: torch.dtype, geo: _Geo, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`_prepare_projection`, made once per projection tensor (unchanged since), dtype and
    scale; treated as read-only."""
    if w.is_inference():  # keeps no version counter: not cached
        with torch.inference_mode(False):
            return _prepare_projection(w, dtype, geo, scale)
    key = (id(w), w._version, dtype, geo.feat, scale, geo.softmax, geo.m_pad, geo.d_pad)
    hit = _PROJECTIONS.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1], hit[2]
    with torch.inference_mode(False):
        wt, ws = _prepare_projection(w, dtype, geo, scale)
    if len(_PROJECTIONS) >= _MAX_PROJECTIONS:
        _PROJECTIONS.clear()
    _PROJECTIONS[key] = (weakref.ref(w), wt, ws)
    return wt, ws


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


SPLIT_PROGRAMS_PER_SM = 8  # a state walk is latency-bound: several programs per SM hide it


def _splits(chunks: int, programs: int, device: torch.device) -> tuple[int, int]:
    """``(chunks per split, splits)`` of a non-causal state pass: :data:`SPLIT_PROGRAMS_PER_SM`
    programs per SM (on the CPU two splits where there are two chunks, so the interpreter tests
    run the combine)."""
    want = cdiv(SPLIT_PROGRAMS_PER_SM * _sm_count(device), max(programs, 1)) if device.type == "cuda" else 2
    per = cdiv(chunks, max(1, min(chunks, want)))
    return per, cdiv(chunks, per)


def _launch(fn, grid: tuple[int, ...], cfg: cfgs.ChunkConfig, args: tuple, **constexprs) -> None:
    fn[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@dataclass(frozen=True)
class _Launch:
    """One launch but its tensors: kernel, grid, config, trailing int/float arguments, constexprs."""

    fn: Any
    grid: tuple[int, ...]
    cfg: cfgs.ChunkConfig
    ints: tuple
    constexprs: dict

    def __call__(self, *tensors: Tensor) -> None:
        _launch(self.fn, self.grid, self.cfg, (*tensors, *self.ints), **self.constexprs)


def _spans(*shapes: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], int]:
    """Where buffers of ``shapes`` sit in one allocation (each on a 16-element boundary), and its size."""
    spans, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        spans.append((at, at + n))
        at += cdiv(n, 16) * 16
    return tuple(spans), at


def _carve(buf: Tensor, spans: tuple[tuple[int, int], ...]) -> list[Tensor]:
    """Flat views of ``buf`` at ``spans`` (the kernels index them themselves); the first is the
    buffer itself, whose pointer is the same, and spans that no launch reads are not cut."""
    return [buf, *(buf[a:b] for a, b in spans[1:])]


_COMBINE = cfgs.ChunkConfig(32, 32, 4, 1)  # the combine kernel's launch (BLOCK_K from block_m)


@dataclass(frozen=True)
class _Plan:
    """Everything a call derives from its shapes and options, made once (:func:`_plan`): the
    launches and the layout of the workspaces. Forward: ``feat`` holds ``phi, h``; ``f32`` holds
    the chunk statistics ``cs``, the state statistics ``st``, non-causal the partial states ``hp,
    pst``, and ``lse`` when it is not saved. Backward: ``psi, R`` and ``delta, rst, hp, pst``."""

    geo: _Geo
    feat: tuple
    feat_size: int
    f32: tuple
    f32_size: int
    features: _Launch
    state: _Launch
    combine: _Launch | None
    fwd: _Launch


@functools.lru_cache(maxsize=256)
def _plan(geo: _Geo, n_split_proj: int, grad: bool, generation: int) -> _Plan:
    bhk, nt, mp, dvp = geo.b * geo.hk, geo.nt, geo.m_pad, geo.dv_pad
    slots = nt if geo.causal else 1
    feat, feat_size = _spans((bhk, nt * CHUNK, mp), (bhk, slots, mp, dvp))
    scfg = geo.cfg("chunk_state")
    bv = min(scfg.block_n, dvp)  # the launch shape holds max(D, Dv)
    per, n_split = (nt, 1) if geo.causal else _splits(nt, (mp // scfg.block_m) * (dvp // bv) * bhk, geo.device)
    # cs, st, (not causal: hp, pst), (lse unless it is saved)
    shapes = [(bhk, nt, 2, mp), (bhk, slots, 2, mp)]
    if not geo.causal:
        shapes += [(bhk, n_split, mp, dvp), (bhk, n_split, 2, mp)]
    if not grad:
        shapes.append((geo.b, geo.h, geo.nq))
    f32, f32_size = _spans(*shapes)
    fcfg = geo.cfg("chunk_features")
    features = _Launch(
        _key_features_kernel, (nt, bhk), fcfg, (geo.nk, nt, geo.hk, 0.5 * geo.scale * LOG2E),
        dict(D=geo.d, D_PAD=geo.d_pad, M=geo.m, M_PAD=mp, CHUNK=CHUNK, BLOCK_F=fcfg.block_n, N_SPLIT=n_split_proj,
             SOFTMAX=geo.softmax),
    )  # fmt: skip
    state = _Launch(
        _state_kernel, (mp // scfg.block_m, dvp // bv, bhk * n_split), scfg, (geo.nk, 0, nt, per, n_split, 1),
        dict(DV=geo.dv, DV_PAD=dvp, M_PAD=mp, CHUNK=CHUNK, BLOCK_K=scfg.block_m, BLOCK_V=bv, KEYS=True,
             CAUSAL=geo.causal, SOFTMAX=geo.softmax, FP32=geo.fp32),
    )  # fmt: skip
    combine = None if geo.causal else _combine_launch(geo, bhk, n_split, shift=geo.softmax)
    cfg = geo.cfg("chunk_fwd")
    fwd = _Launch(
        _fwd_kernel, _query_grid(geo, cfg), cfg, (geo.nq, geo.nk, geo.off, geo.t0, nt, geo.groups),
        dict(D=geo.d, D_PAD=geo.d_pad, DV=geo.dv, DV_PAD=dvp, M=geo.m, M_PAD=mp, CHUNK=CHUNK,
             BLOCK_M=CHUNK if geo.causal else cfg.block_m, BLOCK_F=cfg.block_n, N_SPLIT=n_split_proj,
             SOFTMAX=geo.softmax, CAUSAL=geo.causal, FP32=geo.fp32),
    )  # fmt: skip
    return _Plan(geo, feat, feat_size, f32, f32_size, features, state, combine, fwd)


def _combine_launch(geo: _Geo, heads: int, n_split: int, shift: bool) -> _Launch:
    block = min(_COMBINE.block_m, geo.m_pad)
    return _Launch(
        _combine_kernel, (geo.m_pad // block, heads), _COMBINE, (n_split,),
        dict(DV_PAD=geo.dv_pad, M_PAD=geo.m_pad, BLOCK_K=block, SHIFT=shift),
    )  # fmt: skip


def _query_grid(geo: _Geo, cfg) -> tuple[int, int]:
    if geo.causal:
        return (geo.nt - geo.t0, geo.b * geo.h)
    return (cdiv(geo.nq, cfg.block_m), geo.b * geo.h)


def _key_side(plan: _Plan, k: Tensor, v: Tensor, wt: Tensor, kpm: Tensor | None):
    """``(phi, cs, h, st, lse)``: the key features, their chunk statistics and the key states
    (causal: per chunk; otherwise the total) with their statistics, and a float32 buffer for the
    ``lse`` of the query pass when the plan does not save it (else None)."""
    geo = plan.geo
    phi, h = _carve(torch.empty(plan.feat_size, device=k.device, dtype=geo.feat), plan.feat)
    cs, st, *rest = _carve(torch.empty(plan.f32_size, device=k.device, dtype=torch.float32), plan.f32)
    kpm_arg = kpm if kpm is not None else _no_padding(k.device)
    _launch(plan.features.fn, plan.features.grid, plan.features.cfg, (k, wt, phi, cs, kpm_arg, *plan.features.ints),
            HAS_PAD=kpm is not None, **plan.features.constexprs)  # fmt: skip
    if geo.causal:
        plan.state(phi, cs, v, cs, h, st)
    else:
        hp, pst, *rest = rest
        plan.state(phi, cs, v, cs, hp, pst)
        plan.combine(hp, pst, h, st)
    return phi, cs, h, st, rest[0] if rest else None


def _forward(q: Tensor, k: Tensor, v: Tensor, w: Tensor, kpm: Tensor | None, plan: _Plan, save: bool):
    """``(out, lse, (wt, ws))``: one forward (see the module docstring). ``save``: ``lse`` is kept
    for the backward, so it gets its own allocation (else it is a view of the workspace)."""
    geo = plan.geo
    wt, ws = _projection(w, q.dtype, geo, geo.scale)
    phi, cs, h, st, lse = _key_side(plan, k, v, wt, kpm)
    out = torch.empty(geo.b, geo.h, geo.nq, geo.dv, device=q.device, dtype=q.dtype)
    if save:
        lse = torch.empty(geo.b, geo.h, geo.nq, device=q.device, dtype=torch.float32)
    plan.fwd(q, wt, phi, cs, h, st, v, out, lse)
    return out, lse, (wt, ws)


@dataclass(frozen=True)
class _BackwardPlan:
    """The backward's launches and workspaces (see :class:`_Plan`)."""

    feat: tuple
    feat_size: int
    f32: tuple
    f32_size: int
    dq: _Launch
    state: _Launch
    combine: _Launch | None
    dk: _Launch
    dv: _Launch


@functools.lru_cache(maxsize=64)
def _backward_plan(geo: _Geo, n_split_proj: int, generation: int) -> _BackwardPlan:
    bh, bhk, mp, dvp, npos, nt = geo.b * geo.h, geo.b * geo.hk, geo.m_pad, geo.dv_pad, geo.npos, geo.nt
    rcfg = geo.cfg("chunk_state_bwd")
    bv = min(rcfg.block_n, dvp)
    nt_q = nt if geo.causal else npos // CHUNK
    per, n_split = (nt_q, 1) if geo.causal else _splits(nt_q, (mp // rcfg.block_m) * (dvp // bv) * bhk, geo.device)
    slots = nt if geo.causal else 1
    feat, feat_size = _spans((bh, npos, mp), (bhk, slots, mp, dvp))
    shapes = [(bh, npos), (bhk, slots, 2, mp)]  # delta, rst, (not causal: hp, pst)
    if not geo.causal:
        shapes += [(bhk, n_split, mp, dvp), (bhk, n_split, 2, mp)]
    f32, f32_size = _spans(*shapes)
    dims = dict(D=geo.d, D_PAD=geo.d_pad, DV=geo.dv, DV_PAD=dvp, M_PAD=mp, CHUNK=CHUNK, SOFTMAX=geo.softmax,
                CAUSAL=geo.causal, FP32=geo.fp32)  # fmt: skip
    cfg = geo.cfg("chunk_dq")
    dq = _Launch(
        _dq_kernel, _query_grid(geo, cfg), cfg, (geo.nq, geo.nk, geo.off, geo.t0, nt, npos, geo.groups),
        dict(dims, M=geo.m, BLOCK_M=CHUNK if geo.causal else cfg.block_m, BLOCK_F=cfg.block_n, N_SPLIT=n_split_proj),
    )  # fmt: skip
    state = _Launch(
        _state_kernel, (mp // rcfg.block_m, dvp // bv, bhk * n_split), rcfg,
        (geo.nq, geo.off if geo.causal else 0, nt_q, per, n_split, geo.groups),
        dict(DV=geo.dv, DV_PAD=dvp, M_PAD=mp, CHUNK=CHUNK, BLOCK_K=rcfg.block_m, BLOCK_V=bv, KEYS=False,
             CAUSAL=geo.causal, SOFTMAX=geo.softmax, FP32=geo.fp32),
    )  # fmt: skip
    combine = None if geo.causal else _combine_launch(geo, bhk, n_split, shift=False)
    kcfg, vcfg = geo.cfg("chunk_dk"), geo.cfg("chunk_dv")
    rows = (geo.nq, geo.nk, geo.off, nt, npos, geo.hk)
    dk = _Launch(_dk_kernel, (nt, bhk), kcfg, (*rows, geo.scale), dict(dims, G=geo.groups, BLOCK_F=kcfg.block_n))
    del dims["D"], dims["D_PAD"]
    dv = _Launch(_dv_kernel, (nt, bhk), vcfg, rows, dict(dims, G=geo.groups, BLOCK_F=vcfg.block_n))
    return _BackwardPlan(feat, feat_size, f32, f32_size, dq, state, combine, dk, dv)


def _backward(q, k, v, out, lse, dout, wt, ws, kpm, plan: _Plan):
    geo = plan.geo
    bplan = _backward_plan(geo, plan.features.constexprs["N_SPLIT"], tuning.generation())
    phi, cs, h, st, _ = _key_side(plan, k, v, wt, kpm)
    psi, r = _carve(torch.empty(bplan.feat_size, device=q.device, dtype=geo.feat), bplan.feat)
    delta, rst, *partial = _carve(torch.empty(bplan.f32_size, device=q.device, dtype=torch.float32), bplan.f32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bplan.dq(q, dout, out, lse, wt, ws, phi, cs, h, st, v, dq, psi, delta)
    if geo.causal:
        bplan.state(psi, st, dout, delta, r, rst)
    else:
        hp, pst = partial
        bplan.state(psi, st, dout, delta, hp, pst)
        bplan.combine(hp, pst, r, rst)
    kpm_arg = kpm if kpm is not None else _no_padding(q.device)
    has_pad = kpm is not None
    _launch(bplan.dk.fn, bplan.dk.grid, bplan.dk.cfg, (k, v, phi, cs, st, r, rst, ws, psi, dout, delta, dk, kpm_arg,
            *bplan.dk.ints), HAS_PAD=has_pad, **bplan.dk.constexprs)  # fmt: skip
    _launch(bplan.dv.fn, bplan.dv.grid, bplan.dv.cfg, (phi, cs, st, r, psi, dout, dv, kpm_arg, *bplan.dv.ints),
            HAS_PAD=has_pad, **bplan.dv.constexprs)  # fmt: skip
    return dq, dk, dv


@functools.lru_cache(maxsize=16)
def _no_padding(device: torch.device) -> Tensor:
    """The int8 placeholder passed as the key-valid pointer when there is no padding (never read)."""
    return torch.zeros(1, dtype=torch.int8, device=device)


class _ChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, kpm, plan: _Plan):  # type: ignore[override]
        out, lse, (wt, ws) = _forward(q, k, v, w, kpm, plan, save=True)
        ctx.plan, ctx.kpm = plan, kpm
        ctx.save_for_backward(q, k, v, out, lse, wt, ws)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse, wt, ws = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout.contiguous(), wt, ws, ctx.kpm, ctx.plan)
        return dq, dk, dv, None, None, None


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    *,
    causal: bool,
    scale: float,
    kernel: str,
    kpm: Tensor | None = None,
) -> Tensor:
    """Chunked FAVOR+ attention, differentiable in ``q``, ``k``, ``v`` (contiguous).

    ``q (B, H, Nq, D)``, ``k (B, Hk, Nk, D)``, ``v (B, Hk, Nk, Dv)``, float16, bfloat16 or float32;
    ``w (m, D)`` the float32 projection; ``kpm`` the int8 key-valid vector ``(B, Nk)`` or None.
    Returns ``(B, H, Nq, Dv)`` in the dtype of ``q``. Without a gradient to compute, no autograd
    function is built.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = (q.shape, k.shape, v.shape[-1], q.dtype, causal, scale, kernel, w.shape[0], grad, q.device)
    plan = _plans(key, tuning.generation())
    if grad:
        return _ChunkFunction.apply(q, k, v, w, kpm, plan)
    return _forward(q, k, v, w, kpm, plan, save=False)[0]


@functools.lru_cache(maxsize=256)
def _plans(key: tuple, generation: int) -> _Plan:
    """The plan of a call from its shapes and options (:func:`chunk_attention`'s cache key)."""
    qs, ks, dv, dtype, causal, scale, kernel, m, grad, device = key
    geo = _geometry(tuple(qs), tuple(ks), dv, dtype, ChunkOptions(causal, float(scale), kernel, int(m)), grad, device)
    return _plan(geo, 0 if geo.fp32 else N_SPLIT[dtype], grad, generation)
