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

import torch
from torch import Tensor

from . import favor_chunk_configs as cfgs
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


@functools.lru_cache(maxsize=256)
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


def _splits(chunks: int, programs: int, device: torch.device) -> tuple[int, int]:
    """``(chunks per split, splits)`` of a non-causal state pass: enough programs to fill the GPU
    (on the CPU two splits where there are two chunks, so the interpreter tests run the combine)."""
    want = cdiv(2 * _sm_count(device), max(programs, 1)) if device.type == "cuda" else 2
    per = cdiv(chunks, max(1, min(chunks, want)))
    return per, cdiv(chunks, per)


def _launch(fn, grid: tuple[int, ...], cfg: cfgs.ChunkConfig, args: tuple, **constexprs) -> None:
    fn[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_COMBINE = cfgs.ChunkConfig(32, 32, 4, 1)  # the combine kernel's launch (BLOCK_K from block_m)


def _f32(device: torch.device, *shapes: tuple[int, ...]) -> list[Tensor]:
    """Float32 buffers of ``shapes`` as views of one allocation."""
    sizes = [math.prod(s) for s in shapes]
    buf = torch.empty(sum(sizes), device=device, dtype=torch.float32)
    return [t.view(s) for t, s in zip(buf.split(sizes), shapes, strict=True)]


def _key_side(k: Tensor, v: Tensor, wt: Tensor, kpm: Tensor | None, kpm_arg: Tensor, geo: _Geo):
    """``(phi, c, h, z, F)``: the key features and the key states (causal: per chunk; otherwise the
    total), from :func:`_key_features_kernel`, :func:`_state_kernel` (and :func:`_combine_kernel`)."""
    bhk, nt, mp, dvp, dev = geo.b * geo.hk, geo.nt, geo.m_pad, geo.dv_pad, k.device
    phi = torch.empty(bhk, nt * CHUNK, mp, device=dev, dtype=geo.feat)
    slots = nt if geo.causal else 1
    h = torch.empty(bhk, slots, mp, dvp, device=dev, dtype=geo.feat)
    scfg = geo.cfg("chunk_state")
    bv = min(scfg.block_n, dvp)  # the launch shape holds max(D, Dv)
    kv_progs = (mp // scfg.block_m) * (dvp // bv)
    per, n_split = (nt, 1) if geo.causal else _splits(nt, kv_progs * bhk, dev)
    part = 0 if geo.causal else n_split
    c, zc, z, fr, hp, zp, fp = _f32(
        dev,
        (bhk, nt, mp),
        (bhk, nt, mp),
        (bhk, slots, mp),
        (bhk, slots, mp),
        (bhk, part, mp, dvp),
        (bhk, part, mp),
        (bhk, part, mp),
    )
    fcfg = geo.cfg("chunk_features")
    half2 = 0.5 * geo.scale * LOG2E  # the factor of |k|^2 in the base-2 key logits
    _launch(
        _key_features_kernel, (nt, bhk), fcfg, (k, wt, phi, c, zc, kpm_arg, geo.nk, nt, geo.hk, half2),
        D=geo.d, D_PAD=geo.d_pad, M=geo.m, M_PAD=mp, CHUNK=CHUNK, BLOCK_F=fcfg.block_n, N_SPLIT=_n_split(k, geo),
        SOFTMAX=geo.softmax, HAS_PAD=kpm is not None,
    )  # fmt: skip
    outs = (h, z, fr) if geo.causal else (hp, zp, fp)
    _launch(
        _state_kernel, (mp // scfg.block_m, dvp // bv, bhk * n_split), scfg,
        (phi, c, v, zc, *outs, geo.nk, 0, nt, per, n_split, 1),
        DV=geo.dv, DV_PAD=dvp, M_PAD=mp, CHUNK=CHUNK, BLOCK_K=scfg.block_m, BLOCK_V=bv, KEYS=True,
        CAUSAL=geo.causal, SOFTMAX=geo.softmax, FP32=geo.fp32,
    )  # fmt: skip
    if not geo.causal:
        _combine(hp, zp, fp, h, z, fr, n_split, geo, shift=geo.softmax)
    return phi, c, h, z, fr


def _combine(hp, zp, fp, h, z, fr, n_split: int, geo: _Geo, shift: bool) -> None:
    block = min(_COMBINE.block_m, geo.m_pad)
    _launch(
        _combine_kernel, (geo.m_pad // block, hp.shape[0]), _COMBINE,
        (hp, zp, fp, h, z, fr, n_split), DV_PAD=geo.dv_pad, M_PAD=geo.m_pad, BLOCK_K=block, SHIFT=shift,
    )  # fmt: skip


def _n_split(x: Tensor, geo: _Geo) -> int:
    return 0 if geo.fp32 else N_SPLIT[x.dtype]


def _query_grid(geo: _Geo, cfg) -> tuple[int, int]:
    if geo.causal:
        return (geo.nt - geo.t0, geo.b * geo.h)
    return (cdiv(geo.nq, cfg.block_m), geo.b * geo.h)


def _forward(q: Tensor, k: Tensor, v: Tensor, w: Tensor, kpm: Tensor | None, geo: _Geo):
    """``(out, lse, (wt, ws))``: one forward (see the module docstring)."""
    wt, ws = _projection(w, q.dtype, geo, geo.scale)
    kpm_arg = kpm if kpm is not None else _no_padding(q.device)
    phi, c, h, z, fr = _key_side(k, v, wt, kpm, kpm_arg, geo)
    out = torch.empty(geo.b, geo.h, geo.nq, geo.dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(geo.b, geo.h, geo.nq, device=q.device, dtype=torch.float32)
    cfg = geo.cfg("chunk_fwd")
    block_m = CHUNK if geo.causal else cfg.block_m
    _launch(
        _fwd_kernel, _query_grid(geo, cfg), cfg,
        (q, wt, phi, c, h, z, fr, v, out, lse, geo.nq, geo.nk, geo.off, geo.t0, geo.nt, geo.groups),
        D=geo.d, D_PAD=geo.d_pad, DV=geo.dv, DV_PAD=geo.dv_pad, M=geo.m, M_PAD=geo.m_pad, CHUNK=CHUNK,
        BLOCK_M=block_m, BLOCK_F=cfg.block_n, N_SPLIT=_n_split(q, geo), SOFTMAX=geo.softmax, CAUSAL=geo.causal,
        FP32=geo.fp32,
    )  # fmt: skip
    return out, lse, (wt, ws)


def _backward(q, k, v, out, lse, dout, wt, ws, kpm, geo: _Geo):
    kpm_arg = kpm if kpm is not None else _no_padding(q.device)
    phi, c, h, z, fr = _key_side(k, v, wt, kpm, kpm_arg, geo)
    bh, bhk, mp, dvp, npos = geo.b * geo.h, geo.b * geo.hk, geo.m_pad, geo.dv_pad, geo.npos
    psi = torch.empty(bh, npos, mp, device=q.device, dtype=geo.feat)
    dq = torch.empty_like(q)
    rcfg = geo.cfg("chunk_state_bwd")
    bv = min(rcfg.block_n, dvp)
    nt_q = geo.nt if geo.causal else npos // CHUNK
    kv_progs = (mp // rcfg.block_m) * (dvp // bv)
    per, n_split = (nt_q, 1) if geo.causal else _splits(nt_q, kv_progs * bhk, q.device)
    slots = geo.nt if geo.causal else 1
    part = 0 if geo.causal else n_split
    delta, rz, hp, zp = _f32(q.device, (bh, npos), (bhk, slots, mp), (bhk, part, mp, dvp), (bhk, part, mp))
    r = torch.empty(bhk, slots, mp, dvp, device=q.device, dtype=geo.feat)
    cfg = geo.cfg("chunk_dq")
    block_m = CHUNK if geo.causal else cfg.block_m
    _launch(
        _dq_kernel, _query_grid(geo, cfg), cfg,
        (q, dout, out, lse, wt, ws, phi, c, h, z, fr, v, dq, psi, delta, geo.nq, geo.nk, geo.off, geo.t0, geo.nt,
         npos, geo.groups),
        D=geo.d, D_PAD=geo.d_pad, DV=geo.dv, DV_PAD=dvp, M=geo.m, M_PAD=mp, CHUNK=CHUNK, BLOCK_M=block_m,
        BLOCK_F=cfg.block_n, N_SPLIT=_n_split(q, geo), SOFTMAX=geo.softmax, CAUSAL=geo.causal, FP32=geo.fp32,
    )  # fmt: skip
    outs = (r, rz, rz) if geo.causal else (hp, zp, zp)
    _launch(
        _state_kernel, (mp // rcfg.block_m, dvp // bv, bhk * n_split), rcfg,
        (psi, fr, dout, delta, *outs, geo.nq, geo.off if geo.causal else 0, nt_q, per, n_split, geo.groups),
        DV=geo.dv, DV_PAD=dvp, M_PAD=mp, CHUNK=CHUNK, BLOCK_K=rcfg.block_m, BLOCK_V=bv, KEYS=False,
        CAUSAL=geo.causal, SOFTMAX=geo.softmax, FP32=geo.fp32,
    )  # fmt: skip
    if not geo.causal:
        _combine(hp, zp, zp, r, rz, rz, n_split, geo, shift=False)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    kcfg = geo.cfg("chunk_dk")
    _launch(
        _dk_kernel, (geo.nt, bhk), kcfg,
        (k, v, phi, c, fr, r, rz, ws, psi, dout, delta, dk, kpm_arg, geo.nq, geo.nk, geo.off, geo.nt, npos, geo.hk,
         geo.scale),
        G=geo.groups, D=geo.d, D_PAD=geo.d_pad, DV=geo.dv, DV_PAD=dvp, M_PAD=mp, CHUNK=CHUNK, BLOCK_F=kcfg.block_n,
        SOFTMAX=geo.softmax, CAUSAL=geo.causal, FP32=geo.fp32, HAS_PAD=kpm is not None,
    )  # fmt: skip
    vcfg = geo.cfg("chunk_dv")
    _launch(
        _dv_kernel, (geo.nt, bhk), vcfg,
        (phi, c, fr, r, psi, dout, dv, kpm_arg, geo.nq, geo.nk, geo.off, geo.nt, npos, geo.hk),
        G=geo.groups, DV=geo.dv, DV_PAD=dvp, M_PAD=mp, CHUNK=CHUNK, BLOCK_F=vcfg.block_n, SOFTMAX=geo.softmax,
        CAUSAL=geo.causal, FP32=geo.fp32, HAS_PAD=kpm is not None,
    )  # fmt: skip
    return dq, dk, dv


@functools.lru_cache(maxsize=16)
def _no_padding(device: torch.device) -> Tensor:
    """The int8 placeholder passed as the key-valid pointer when there is no padding (never read)."""
    return torch.zeros(1, dtype=torch.int8, device=device)


class _ChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, kpm, opts: ChunkOptions):  # type: ignore[override]
        geo = _geometry(tuple(q.shape), tuple(k.shape), v.shape[-1], q.dtype, opts, True, q.device)
        out, lse, (wt, ws) = _forward(q, k, v, w, kpm, geo)
        ctx.geo, ctx.kpm = geo, kpm
        ctx.save_for_backward(q, k, v, out, lse, wt, ws)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse, wt, ws = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout.contiguous(), wt, ws, ctx.kpm, ctx.geo)
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
    opts = ChunkOptions(causal, float(scale), kernel, int(w.shape[0]))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _ChunkFunction.apply(q, k, v, w, kpm, opts)
    geo = _geometry(tuple(q.shape), tuple(k.shape), v.shape[-1], q.dtype, opts, False, q.device)
    return _forward(q, k, v, w, kpm, geo)[0]
