"""Decoding steps in Triton: split-KV softmax attention over a cache, and the fused Performer step.

The host side of :mod:`attn_kernels.decode_kernels`: it sizes the splits, allocates the partial
results and launches the split kernel and the combine kernel. The variants call these from their
``decode_step`` when the backend is ``triton`` and a step has at most :data:`MAX_STEP_TOKENS`
new tokens (longer steps, e.g. a prompt, run the prefill-shaped kernels instead).

Inputs are already validated by :func:`attention_variants.decode.step`; dtypes and head dims are
those of :func:`attn_kernels.softmax_unsupported_reason` / :func:`attn_kernels.favor_unsupported_reason`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .env import HAS_TRITON
from .flash_configs import dot_precision
from .launch import KernelConfig, LaunchSample, cdiv, contiguous_strides, launch, pad_pow2

if HAS_TRITON:
    from .decode_kernels import _combine_kernel, _favor_step_kernel, _softmax_split_kernel

MAX_STEP_TOKENS = 16
"""Longest step the decoding kernels take: all ``T`` tokens' keys fit one tile of the new-token program."""

# Query rows (heads of a group x new tokens) per program; more rows take more programs. float32
# softmax steps at head dims above 64 take 16: 32 or 64 rows spilled (ptxas, sm_90).
MAX_ROWS = 64
MAX_ROWS_FP32 = 16
# Random features per program of the Performer step, and its warps: 32 features or 4 warps
# spilled at head dim 128 (ptxas, sm_90), this does not up to 64 query rows.
FEATURE_BLOCK = 16
FAVOR_WARPS = 8
_LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device) -> int:
    """Programs a step should launch to fill ``device``: two per SM on CUDA; a few under the
    interpreter, so that small test caches are split too."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=8)
def _no_globals(device: torch.device) -> Tensor:
    """A placeholder index tensor for steps without global tokens (never read), one per device."""
    return torch.zeros(1, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=8)
def _no_shift(device: torch.device) -> Tensor:
    """A placeholder for the key-shift pointers of a ``relu`` Performer step (never read)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _workspace(n_slots: int, block_m: int, block_dv: int, device: torch.device, extra: int = 0) -> list[Tensor]:
    """The partial results ``m (n_slots, BLOCK_M)``, ``l (n_slots, BLOCK_M)``,
    ``acc (n_slots, BLOCK_M, BLOCK_DV)`` (float32) and ``extra`` more floats, as contiguous views of
    one allocation."""
    rows = n_slots * block_m
    buf = torch.empty(rows * (2 + block_dv) + extra, dtype=torch.float32, device=device)
    parts = list(buf.split([rows, rows, rows * block_dv, extra]))
    return [
        parts[0].view(n_slots, block_m),
        parts[1].view(n_slots, block_m),
        parts[2].view(n_slots, block_m, block_dv),
        parts[3],
    ]


def _row_blocks(rows: int, max_rows: int = MAX_ROWS) -> tuple[int, int]:
    """``(BLOCK_M, number of row blocks)`` for ``rows`` query rows of one key/value head."""
    block = min(max_rows, pad_pow2(rows))
    return block, cdiv(rows, block)


def _softmax_config(head_dim: int, elem_bytes: int, block_m: int) -> KernelConfig:
    """Key tile and warps of the split kernel; ``ptxas`` reports no spills for these on sm_80 and
    sm_90 at head dim 128 (tests/test_decode_compile.py), where 4 warps spilled."""
    block_n = 64 if head_dim <= 64 or (head_dim <= 128 and elem_bytes == 2) else 32
    return KernelConfig(block_m, block_n, 4 if head_dim <= 64 else 8, 2)


def split_plan(n_cached: int, programs: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """``(chunk, splits)``: the ``n_cached`` cached keys cut into ``splits`` chunks of ``chunk`` keys
    (a multiple of ``block_n``), so that ``programs`` (batch x heads x row blocks) times the splits
    about fill ``device``."""
    if n_cached == 0:
        return block_n, 0
    want = max(1, min(cdiv(_target_programs(device), programs), cdiv(n_cached, block_n)))
    chunk = cdiv(cdiv(n_cached, want), block_n) * block_n
    return chunk, cdiv(n_cached, chunk)


def _combine(
    m: Tensor,
    lsum: Tensor,
    acc: Tensor,
    out: Tensor,
    hk: int,
    t: int,
    groups: int,
    parts: int,
    nrb: int,
    den: Tensor | None = None,
) -> Tensor:
    """Merge the partial results into ``out``; returns the merged normalisers ``(B, H, T)`` (float32,
    written to ``den`` when given: ``B * H * T`` contiguous floats)."""
    bsz, h = out.shape[0], out.shape[1]
    block_m, block_dv = acc.shape[-2], acc.shape[-1]
    if den is None:
        den = torch.empty(bsz, h, t, dtype=torch.float32, device=out.device)
    launch(
        _combine_kernel, [KernelConfig(block_m, 0, 4, 1)], lambda _: (bsz * hk, nrb),
        (m, lsum, acc, out, den, out.stride(0), out.stride(1), out.stride(2), hk, t, groups, parts),
        inner=None, BLOCK_DV=block_dv, HEAD_DV=out.shape[-1],
    )  # fmt: skip
    return den


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def softmax_step(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    *,
    start: int,
    lo: int,
    scale: float,
    left: int | None = None,
    period: int | None = None,
    global_k: Tensor | None = None,
    global_v: Tensor | None = None,
    global_pos: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Softmax attention of ``T`` new tokens at positions ``start .. start + T - 1``.

    Args:
        q: ``(B, H, T, D)``; k_new, v_new: ``(B, Hk, T, D)`` / ``(B, Hk, T, Dv)``, the new tokens'
            keys and values (not yet in the cache).
        k_cache, v_cache: ``(B, Hk, C, D)`` / ``(B, Hk, C, Dv)``: the keys and values of the cached
            positions ``[lo, start)``, position ``p`` in slot ``p`` (a KV cache) or ``p % period``
            (a ring buffer).
        left: the window's reach back (key ``j`` is visible to the query at ``p`` iff
            ``p - left <= j <= p``); None: every earlier key.
        global_k, global_v, global_pos: ``(B, Hk, G, D)``, ``(B, Hk, G, Dv)`` and the ``G`` global
            positions (int32, on the device, all ``< start``), visible where the band does not reach.
        chunk: cached keys per split (a multiple of the key tile); None chooses it for the device.

    Returns ``(B, H, T, Dv)`` in the dtype of ``q``.
    """
    bsz, h, t, d = q.shape
    hk, dv = k_new.shape[1], v_new.shape[-1]
    groups = h // hk
    q, k_cache, v_cache, k_new, v_new = (_unit_last(x) for x in (q, k_cache, v_cache, k_new, v_new))
    # A reach beyond the text sees every key; clamped so that the position arithmetic stays small.
    left = start + t if left is None else min(left, start + t)
    ring = period is not None and start > period
    if global_pos is None or global_pos.numel() == 0:
        global_k, global_v = k_new, v_new  # any tensors of the right rank: no global is read
        global_pos = _no_globals(q.device)
        ng = 0
    else:
        assert global_k is not None and global_v is not None
        global_k, global_v = _unit_last(global_k), _unit_last(global_v)
        ng = global_pos.numel()
    wide_fp32 = q.element_size() == 4 and max(d, dv) > 64
    block_m, nrb = _row_blocks(groups * t, MAX_ROWS_FP32 if wide_fp32 else MAX_ROWS)
    cfg = _softmax_config(max(d, dv), q.element_size(), block_m)
    n_cached = start - lo
    if chunk is None:
        chunk, splits = split_plan(n_cached, bsz * hk * nrb, cfg.block_n, q.device)
    else:
        if chunk <= 0 or chunk % cfg.block_n:
            raise ValueError(f"chunk must be a positive multiple of {cfg.block_n}, got {chunk}")
        splits = cdiv(n_cached, chunk)
    parts = splits + 1
    block_dv = pad_pow2(dv)
    n_slots = bsz * hk * nrb * parts
    # The normalisers the combine writes are not needed here: they share the workspace.
    m, lsum, acc, den = _workspace(n_slots, block_m, block_dv, q.device, extra=bsz * h * t)
    launch(
        _softmax_split_kernel, [cfg], lambda _: (parts, bsz * hk, nrb),
        (
            q, k_cache, v_cache, k_new, v_new, global_k, global_v, global_pos, m, lsum, acc,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2),
            global_k.stride(0), global_k.stride(1), global_k.stride(2),
            global_v.stride(0), global_v.stride(1), global_v.stride(2),
            hk, t, groups, start, lo, chunk, splits, period or 1, left, ng, scale * _LOG2E,
        ),
        RING=ring, BLOCK_D=pad_pow2(d), BLOCK_DV=block_dv, HEAD_D=d, HEAD_DV=dv, PREC=dot_precision(q.dtype),
    )  # fmt: skip
    out = torch.empty(bsz, h, t, dv, dtype=q.dtype, device=q.device)
    _combine(m, lsum, acc, out, hk, t, groups, parts, nrb, den)
    return out


def favor_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ws: Tensor,
    kv: Tensor,
    shift: Tensor | None,
    *,
    scale: float,
    kernel: str,
    relu_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One Performer step of ``T`` new tokens against the recurrent state (see
    :class:`attention_variants.PerformerState` for the state and its stabiliser).

    Args:
        q: ``(B, H, T, D)``; k: ``(B, Hk, T, D)``; v: ``(B, Hk, T, Dv)``.
        ws: ``(m, D)`` float32, the projection times ``sqrt(scale)``.
        kv: ``(B, Hk, m, Dv + 1)`` float32, ``[S, z]`` before the step.
        shift: ``(B, Hk, 1, m)`` float32, the running key shift (``kernel="softmax"``), else None.

    Returns ``(out (B, H, T, Dv) in q's dtype, den (B, H, T) float32 normalisers, kv, shift)``,
    the last two the state after the step (new tensors).
    """
    bsz, h, t, d = q.shape
    hk, dv, m_feat = k.shape[1], v.shape[-1], ws.shape[0]
    groups = h // hk
    q, k, v = (_unit_last(x) for x in (q, k, v))
    ws, kv = ws.contiguous(), kv.contiguous()
    softmax = kernel == "softmax"
    shift_in = shift.contiguous() if softmax and shift is not None else _no_shift(q.device)
    kv_out = torch.empty_like(kv)
    shift_out = torch.empty_like(shift_in) if softmax else None
    block_m, nrb = _row_blocks(groups * t)
    fblocks = cdiv(m_feat, FEATURE_BLOCK)
    block_dv = pad_pow2(dv)
    n_slots = bsz * hk * nrb * fblocks
    m, lsum, acc, _ = _workspace(n_slots, block_m, block_dv, q.device)
    launch(
        _favor_step_kernel, [KernelConfig(block_m, FEATURE_BLOCK, FAVOR_WARPS, 1)], lambda _: (fblocks, bsz * hk, nrb),
        (
            q, k, v, ws, kv, shift_in, kv_out, shift_in if shift_out is None else shift_out, m, lsum, acc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            hk, t, groups, m_feat, 0.5 * scale, 0.5 * math.log(m_feat), relu_eps,
        ),
        inner="BLOCK_F", SOFTMAX=softmax, BLOCK_T=pad_pow2(t), BLOCK_D=pad_pow2(d), BLOCK_DV=block_dv,
        HEAD_D=d, HEAD_DV=dv,
    )  # fmt: skip
    out = torch.empty(bsz, h, t, dv, dtype=q.dtype, device=q.device)
    den = _combine(m, lsum, acc, out, hk, t, groups, fblocks, nrb)
    return out, den, kv_out, shift_out


_DECODE_KERNELS = ("split", "favor_step", "combine")
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_spec(
    kernel: str, head_dim: int, dtype: torch.dtype, *, sample: LaunchSample | None = None
) -> tuple[object, dict[str, str | int], dict[str, object], KernelConfig]:
    """``(fn, signature, constexprs, config)`` of one decoding-step kernel as :func:`softmax_step` /
    :func:`favor_step` launch it, for ``attn_kernels.aot.compile_for``.

    ``kernel``: ``"split"`` (softmax over a KV cache), ``"favor_step"`` (Performer, softmax
    features) or ``"combine"`` (after the split kernel). Integer arguments carry their values in
    ``sample`` (default :class:`~attn_kernels.launch.LaunchSample`): steps of ``new_tokens``
    tokens after ``seq_len`` cached ones in a KV cache of ``seq_len`` slots, ``features`` random
    features, contiguous tensors, a GPU of ``sample.sms`` SMs; no global tokens, no ring buffer.
    """
    if kernel not in _DECODE_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(_DECODE_KERNELS)}, got {kernel!r}")
    sample = sample or LaunchSample()
    b, h, hk, t, d = sample.batch, sample.heads, sample.kv_heads, sample.new_tokens, head_dim
    data = "*" + _TRITON_TYPES[dtype]
    ints: dict[str, int] = dict(HK=hk, T=t, GROUPS=sample.groups)
    elem = torch.finfo(dtype).bits // 8
    tiles = dict(BLOCK_D=pad_pow2(d), BLOCK_DV=pad_pow2(d), HEAD_D=d, HEAD_DV=d)
    if kernel == "favor_step":
        block_m, _ = _row_blocks(sample.groups * t)
        fn, cfg = _favor_step_kernel, KernelConfig(block_m, FEATURE_BLOCK, FAVOR_WARPS, 1)
        ints.update(NUM_F=sample.features)
        strides = {"q": (b, h, t, d), "k": (b, hk, t, d), "v": (b, hk, t, d)}
        constexprs = dict(SOFTMAX=True, BLOCK_M=block_m, BLOCK_F=FEATURE_BLOCK, BLOCK_T=pad_pow2(t), **tiles)
    else:
        wide_fp32 = elem == 4 and d > 64
        block_m, nrb = _row_blocks(sample.groups * t, MAX_ROWS_FP32 if wide_fp32 else MAX_ROWS)
        cfg = _softmax_config(d, elem, block_m)
        n_cached = sample.seq_len  # positions [0, start) of the cache, start = seq_len
        want = max(1, min(cdiv(2 * sample.sms, b * hk * nrb), cdiv(n_cached, cfg.block_n)))  # split_plan
        chunk = cdiv(cdiv(n_cached, want), cfg.block_n) * cfg.block_n
        splits = cdiv(n_cached, chunk)
        if kernel == "combine":
            fn, cfg = _combine_kernel, KernelConfig(block_m, 0, 4, 1)
            ints.update(NUM_PARTS=splits + 1)
            strides = {"o": (b, h, t, d)}
            constexprs = dict(BLOCK_M=block_m, BLOCK_DV=pad_pow2(d), HEAD_DV=d)
        else:
            fn = _softmax_split_kernel
            cache = (b, hk, n_cached, d)
            ints.update(START=n_cached, LO=0, CHUNK=chunk, NUM_SPLITS=splits, PERIOD=1, LEFT=n_cached + t, NG=0)
            new = (b, hk, t, d)  # the new keys and values, also passed as the (unread) globals
            strides = {"q": (b, h, t, d), "kc": cache, "vc": cache, "kn": new, "vn": new, "gk": new, "gv": new}
            constexprs = dict(RING=False, BLOCK_M=block_m, BLOCK_N=cfg.block_n, PREC=dot_precision(dtype), **tiles)
    for name, shape in strides.items():  # the third stride is named t (token-shaped) or n (cache-shaped)
        sb, sh, st = contiguous_strides(*shape)[:3]
        ints.update({f"stride_{name}b": sb, f"stride_{name}h": sh, f"stride_{name}t": st, f"stride_{name}n": st})
    sig: dict[str, str | int] = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in ("Q", "KC", "VC", "KN", "VN", "GK", "GV", "K", "V", "O"):
            sig[name] = data
        elif name == "GPOS":
            sig[name] = "*i32"
        elif name in ("qk_scale", "half_scale", "log_norm", "relu_eps"):
            sig[name] = "fp32"
        elif name in ints:
            sig[name] = ints[name]
        else:
            sig[name] = "*fp32"  # workspaces, states, projection: float32
    return fn, sig, constexprs, cfg


__all__ = ["MAX_STEP_TOKENS", "aot_spec", "favor_step", "softmax_step", "split_plan"]
