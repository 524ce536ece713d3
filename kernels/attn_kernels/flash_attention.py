"""Fused softmax attention in Triton: full, causal, sliding window and global tokens, fwd + bwd.

The host side: options, block schedules on the device, launches and the autograd function.
The kernels live in :mod:`attn_kernels.flash_kernels`, their launch configurations and block
schedules in :mod:`attn_kernels.flash_configs`, the launch plumbing shared with the FAVOR+ kernels
in :mod:`attn_kernels.launch`.

Global tokens (Longformer) are split so that nothing is dense beyond ``g x N``, with ``g``
the number of global positions and ``V = causal & (band | global row | global column)``:

- band programs (every query block): the band loop of the schedule, then the global *keys*
  gathered by index with the mask ``~band & causal`` (so no key counts twice); they do not
  store the rows that are global.
- a second, "gathered" launch (``GATHERED=True``, half the query tile) over the global rows,
  gathered by index: every key, causal only.
- for ``dk``/``dv`` the same split transposed: band key blocks add the gathered global *rows*
  outside the band and do not store global keys; the gathered launch over the global keys
  sees every query row.

The row term ``delta = rowsum(dO * O)`` of the backward comes from a small kernel of its own.
The backward launches the dq and the dk/dv kernels, with the same tiles or (``"split"``) the dq
kernel at the tiles transposed; or (``"atomic"``) only the dk/dv kernel, which adds dQ into a
zeroed float32 tensor with atomics, cast at the end (:func:`backward_mode` says which runs).

A row with no visible key gets output 0 and log-sum-exp ``+inf``, so the backward's
recomputed probabilities are 0 there and every gradient of that row is 0.

Key padding (``HAS_PAD``) adds no dense mask: an int8 key-valid vector ``(B, Nk)`` is loaded with
each key tile and folded into its mask (the interior tiles included), and the per-batch range of
real keys clips each query program's schedule row, so the key blocks before the first and after
the last real key are skipped. A key block with no real key stores zero ``dk``/``dv`` at once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import tuning
from .env import HAS_TRITON, device_capability, interpreter_enabled
from .flash_configs import (
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    SUPPORTED_DTYPES,
    FlashConfig,
    band_reach,
    delta_config,
    dot_precision,
    dq_config,
    gathered_config,
    key_block_schedule,
    pointer_config,
    query_block_schedule,
    select_config,
)
from .launch import (
    DirectLaunch,
    KernelConfig,
    LaunchOptions,
    LaunchShape,
    cdiv,
    direct_launch_enabled,
    launch,
    pad_pow2,
)

if HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .flash_kernels import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class FlashOptions(LaunchOptions):
    """Non-tensor options of one call (plus the resolved global positions and key padding).

    ``window`` is ``(left, right)`` with causal already folded in, or None for full attention;
    ``global_idx`` holds the sorted global positions (int32, on the device) or None;
    ``key_valid`` / ``key_range`` the key padding (see :func:`padding_args`) or None.
    """

    window: tuple[int, int] | None = None
    global_pos: tuple[int, ...] = ()  # sorted global positions (with a window, Nq == Nk)
    global_idx: Tensor | None = field(default=None, compare=False)
    global_flag: Tensor | None = field(default=None, compare=False)
    key_valid: Tensor | None = field(default=None, compare=False)  # int8 (B, Nk), 1 = real key
    key_range: Tensor | None = field(default=None, compare=False)  # int32 (B, 2): first, last + 1 real key

    @property
    def num_global(self) -> int:
        return len(self.global_pos)


def _launch_shape(q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> LaunchShape:
    window = None if opts.window is None else opts.window[0] + opts.window[1] + 1
    d = max(q.shape[-1], v.shape[-1])
    return LaunchShape(d, q.element_size(), opts.causal, n=max(q.shape[2], k.shape[2]), window=window)


@functools.lru_cache(maxsize=16)
def _placeholders(device: torch.device) -> tuple[Tensor, Tensor]:
    """int32 and int8 tensors passed for the pointers of a specialisation that does not read them
    (no global tokens, no padding), made once per device: a call allocates nothing for them."""
    return torch.zeros(2, dtype=torch.int32, device=device), torch.zeros(2, dtype=torch.int8, device=device)


def _global_args(opts: FlashOptions, device: torch.device) -> tuple[Tensor, Tensor, int]:
    if opts.num_global:
        assert opts.global_idx is not None and opts.global_flag is not None
        return opts.global_idx, opts.global_flag, opts.num_global
    idx, flag = _placeholders(device)
    return idx, flag, 0


def _pad_args(opts: FlashOptions, device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """``(KPM, KRANGE, HAS_PAD)`` of the launches: the padding tensors, or placeholders and False."""
    if opts.key_valid is not None:
        assert opts.key_range is not None
        return opts.key_valid, opts.key_range, True
    krange, kpm = _placeholders(device)
    return kpm, krange, False


def padding_args(key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' form of a bool ``(B, Nk)`` key padding mask (True = real key), no dense mask:
    the int8 key-valid vector ``(B, Nk)`` that every key tile folds into its score mask, and
    ``(B, 2)`` int32 ``(first, last + 1)`` of the real keys (``(0, 0)`` if none), so that the query
    programs skip the key blocks before the first and after the last real key."""
    valid = key_padding_mask.to(torch.int8).contiguous()
    nk = valid.shape[1]
    real = key_padding_mask.any(dim=1)
    first = key_padding_mask.int().argmax(dim=1)
    last = nk - key_padding_mask.flip(1).int().argmax(dim=1)
    key_range = torch.stack([torch.where(real, first, 0), torch.where(real, last, 0)], dim=1)
    return valid, key_range.to(torch.int32).contiguous()


def _last_dim_unit(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=128)
def _cached_schedule(
    keys: bool,
    nq: int,
    nk: int,
    cfg: KernelConfig,
    causal: bool,
    window: tuple[int, int] | None,
    global_pos: tuple[int, ...],
    device: torch.device,
) -> Tensor:
    gidx = torch.tensor(global_pos, dtype=torch.long) if global_pos else None
    if keys:
        sched = key_block_schedule(nq, nk, cfg.block_m, cfg.block_n, causal=causal, window=window, global_idx=gidx)
    else:
        sched = query_block_schedule(
            nq, nk, cfg.block_m, cfg.block_n, causal=causal, window=window, global_idx=gidx,
            global_block=gathered_config(cfg).block_m,
        )  # fmt: skip
    return sched.to(device)


def _schedule(keys: bool, nq: int, nk: int, cfg: KernelConfig, opts: FlashOptions, device: torch.device) -> Tensor:
    """The schedule on ``device``, made once per shape, config, band and global positions."""
    return _cached_schedule(keys, nq, nk, cfg, opts.causal, opts.window, opts.global_pos, device)


@functools.lru_cache(maxsize=64)
def global_tensors(positions: tuple[int, ...], n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The kernels' form of sorted global positions: int32 indices ``(g,)`` and an int8 flag per
    position ``(n,)``, made once per (positions, n, device): a call neither copies nor syncs."""
    idx = torch.tensor(positions, dtype=torch.int32)
    flag = torch.zeros(n, dtype=torch.int8)
    flag[idx.long()] = 1
    return idx.to(device), flag.to(device)


def _launches(
    sched: Tensor, n_band: int, has_global: bool, cfg: KernelConfig, gathered_cfg: KernelConfig
) -> list[tuple[Tensor, int, bool, bool, KernelConfig]]:
    """``(schedule rows, programs, HAS_GLOBAL, GATHERED, config)`` of the band launch and, with
    global tokens, of the gathered launch (a separate specialisation keeps the band kernel lean)."""
    band = sched if sched.shape[0] == n_band else sched[:n_band]
    out = [(band, n_band, has_global, False, cfg)]
    if has_global and sched.shape[0] > n_band:
        out.append((sched[n_band:], sched.shape[0] - n_band, False, True, gathered_cfg))
    return out


@functools.lru_cache(maxsize=256)
def _cached_config(
    shape: LaunchShape, backward: bool, capability: tuple[int, int], interpreter: bool, generation: int
) -> FlashConfig:
    return select_config(shape, backward=backward, capability=capability)


def _capability(device: torch.device) -> tuple[int, int]:
    return device_capability(device) if device.type == "cuda" else (0, 0)


def _config(q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions, backward: bool) -> FlashConfig:
    """:func:`select_config` for this call, looked up once per launch shape (a plan calls it once);
    a TMA config whose tensors no descriptor can describe gives way to :func:`pointer_config`."""
    shape = _launch_shape(q, k, v, opts)
    capability = _capability(q.device)
    cfg = _cached_config(shape, backward, capability, interpreter_enabled(), tuning.generation())
    if cfg.tma and not _tma_ready(q.device, k, v):
        cfg = pointer_config(shape, backward, capability)
    return cfg


def _tma_ready(device: torch.device, *tensors: Tensor) -> bool:
    """Whether TMA descriptors can describe ``tensors``: a GPU with TMA (sm_90+; the interpreter
    too), a 16-byte-aligned base and every stride but the last (1) a multiple of 16 bytes."""
    if device.type == "cuda" and device_capability(device) < (9, 0):
        return False
    for t in tensors:
        size = t.element_size()
        if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptors(cfg: FlashConfig, rows: int, *tensors: Tensor) -> list[object]:
    """TMA descriptors of ``(B, H, N, D)`` tensors, one tile of ``rows`` x padded D each, when
    ``cfg.tma`` (None otherwise: the kernel then takes no descriptor)."""
    if not cfg.tma:
        return [None] * len(tensors)
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, pad_pow2(t.shape[3])]) for t in tensors]


@dataclass
class _Launch:
    """One launch of a plan: kernel, config, schedule rows (None for the delta kernel), grid and
    constexprs, and the compiled kernel's :class:`DirectLaunch` handle once a first launch has
    returned it. ``inner`` names the constexpr that takes ``cfg.block_n`` (None: none does)."""

    fn: object
    cfg: KernelConfig
    rows: Tensor | None
    grid: tuple[int, int]
    meta: dict[str, object]
    inner: str | None = "BLOCK_N"
    handle: DirectLaunch | None = None

    def run(self, args: tuple, direct: bool, device_index: int) -> None:
        """Launch with ``args`` (the positional arguments): through the handle where there is
        one, else through the JIT, keeping the compiled kernel it returns when ``direct``."""
        if self.handle is not None and self.handle(self.grid, args):
            return
        grid = self.grid
        kernel = launch(self.fn, [self.cfg], lambda _: grid, args, inner=self.inner, **self.meta)
        if direct and kernel is not None and self.handle is None:
            meta = {**self.meta, **self.cfg.tiles("BLOCK_M", self.inner)}
            self.handle = DirectLaunch(self.fn, kernel, len(args), meta, device_index)


@dataclass
class _ForwardPlan:
    """Everything of a forward that follows from the shapes, strides, dtype and options: made once
    per :func:`_forward_key`, so a call allocates its outputs, makes the TMA descriptors (they
    hold the pointers) and launches."""

    cfg: FlashConfig
    launches: list[_Launch]
    scalars: tuple  # the kernel's integer and float arguments, after the descriptors
    out_shape: tuple[int, int, int, int]
    direct: bool  # launches may use DirectLaunch handles (CUDA, not the interpreter, not turned off)
    device_index: int


_FWD_PLANS: dict[tuple, _ForwardPlan] = {}


def _forward_key(q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> tuple:
    """What a forward plan, and the kernel Triton compiles for it, depends on: every integer
    argument follows from the shapes and strides, and Triton specialises pointers on their 16-byte
    alignment (outputs and cached index tensors are fresh allocations, always aligned)."""
    cuda = q.device.type == "cuda"
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
        q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16,
        opts.causal, opts.scale, opts.window, opts.global_pos, opts.key_valid is not None,
        interpreter_enabled(), tuning.generation(), torch.cuda.current_device() if cuda else -1,
    )  # fmt: skip


def _forward_plan(q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> _ForwardPlan:
    bsz, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = _config(q, k, v, opts, backward=False)
    ng = opts.num_global
    has_pad = opts.key_valid is not None
    sched = _schedule(False, nq, nk, cfg, opts, q.device)
    left, right = band_reach(opts.window, nq, nk)
    window = opts.window is not None
    n_band = cdiv(nq, cfg.block_m)
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    out_strides = (h * nq * dv, nq * dv, dv)  # ``out`` is made contiguous
    scalars = (
        qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], *out_strides,
        h, h // hk, nq, nk, ng, left, right, opts.scale * _LOG2E,
    )  # fmt: skip
    gathered_cfg = gathered_config(cfg) if ng else cfg
    launches = []
    for rows, programs, has_global, gathered, lcfg in _launches(sched, n_band, ng > 0, cfg, gathered_cfg):
        meta = dict(
            CAUSAL=opts.causal, WINDOW=window, HAS_GLOBAL=has_global, GATHERED=gathered, HAS_PAD=has_pad,
            BLOCK_D=pad_pow2(d), BLOCK_DV=pad_pow2(dv), HEAD_D=d, HEAD_DV=dv, PREC=dot_precision(q.dtype),
            TMA=lcfg.tma, ONE_LOOP=window and not gathered,
        )  # fmt: skip
        launches.append(_Launch(_fwd_kernel, lcfg, rows, (programs, bsz * h), meta))
    return _ForwardPlan(cfg, launches, scalars, (bsz, h, nq, dv), _direct_ok(q.device), q.device.index or 0)


def _direct_ok(device: torch.device) -> bool:
    """Whether launches on ``device`` may use :class:`DirectLaunch` handles."""
    return device.type == "cuda" and not interpreter_enabled() and direct_launch_enabled()


def _forward(q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> tuple[Tensor, Tensor]:
    key = _forward_key(q, k, v, opts)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        if len(_FWD_PLANS) >= 512:
            _FWD_PLANS.clear()
        plan = _FWD_PLANS[key] = _forward_plan(q, k, v, opts)
    out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(plan.out_shape[:3], dtype=torch.float32, device=q.device)
    gidx, gflag, _ = _global_args(opts, q.device)
    kpm, krange, _ = _pad_args(opts, q.device)
    kd, vd = _descriptors(plan.cfg, plan.cfg.block_n, k, v)
    for one in plan.launches:
        one.run(
            (q, k, v, out, lse, one.rows, gidx, gflag, kpm, krange, kd, vd, *plan.scalars),
            plan.direct,
            plan.device_index,
        )
    return out, lse


def backward_mode(cfg: FlashConfig, has_pad: bool) -> str:
    """How a backward with ``cfg`` launches (see :class:`~attn_kernels.flash_configs.FlashConfig`):
    ``"atomic"`` becomes ``"split"`` under ``torch.use_deterministic_algorithms(True)`` (atomic
    float32 sums depend on their order) and with key padding (the padded keys would need a
    mask in the loop that does not fit the registers)."""
    if cfg.bwd == "atomic" and (has_pad or torch.are_deterministic_algorithms_enabled()):
        return "split"
    return cfg.bwd


@dataclass
class _BackwardPlan:
    """Everything of a backward that follows from the shapes, strides, dtype, options and mode
    (see :class:`_ForwardPlan`): the delta launch, the dq launches (none in ``"atomic"`` mode) and
    the dk/dv launches, each kernel's integer and float arguments, and the scale of an atomic dQ."""

    mode: str
    delta: _Launch
    dq: list[_Launch]
    dkdv: list[_Launch]
    delta_scalars: tuple
    dq_scalars: tuple
    dkdv_scalars: tuple
    direct: bool
    device_index: int


_BWD_PLANS: dict[tuple, _BackwardPlan] = {}


def _backward_plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, opts: FlashOptions) -> _BackwardPlan:
    bsz, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = _config(q, k, v, opts, backward=True)
    ng = opts.num_global
    has_pad = opts.key_valid is not None
    mode = backward_mode(cfg, has_pad)
    left, right = band_reach(opts.window, nq, nk)
    window = opts.window is not None
    qs, ks, vs, ds = q.stride(), k.stride(), v.stride(), dout.stride()
    out_s = out.stride()[:3]
    dq_s, dk_s, dv_s = (h * nq * d, nq * d, d), (hk * nk * d, nk * d, d), (hk * nk * dv, nk * dv, dv)
    dcfg = delta_config(dv)
    delta = _Launch(
        _bwd_delta_kernel, dcfg, None, (cdiv(nq, dcfg.block_m), bsz * h), dict(BLOCK_DV=pad_pow2(dv), HEAD_DV=dv),
        inner=None,
    )  # fmt: skip
    delta_scalars = (*out_s, ds[0], ds[1], ds[2], h, nq)
    common = dict(
        CAUSAL=opts.causal, WINDOW=window, HAS_PAD=has_pad, BLOCK_D=pad_pow2(d), BLOCK_DV=pad_pow2(dv), HEAD_D=d,
        HEAD_DV=dv, PREC=dot_precision(q.dtype),
    )  # fmt: skip
    qkvd = (qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], ds[0], ds[1], ds[2])
    qk_scale = opts.scale * _LOG2E
    dq_launches = []
    if mode != "atomic":
        qcfg = dq_config(cfg)
        sched_q = _schedule(False, nq, nk, qcfg, opts, q.device)
        gcfg = gathered_config(qcfg) if ng else qcfg
        for rows, programs, has_global, gathered, lcfg in _launches(
            sched_q, cdiv(nq, qcfg.block_m), ng > 0, qcfg, gcfg
        ):
            meta = dict(HAS_GLOBAL=has_global, GATHERED=gathered, ONE_LOOP=window and not gathered, **common)
            dq_launches.append(_Launch(_bwd_dq_kernel, lcfg, rows, (programs, bsz * h), meta))
    dq_scalars = (*qkvd, *dq_s, h, h // hk, nq, nk, ng, left, right, opts.scale, qk_scale)
    # The gathered key programs keep the key tile (and the query tile) of the band programs.
    sched_k = _schedule(True, nq, nk, cfg, opts, q.device)
    dkdv = []
    for cols, programs, has_global, gathered, lcfg in _launches(sched_k, cdiv(nk, cfg.block_n), ng > 0, cfg, cfg):
        meta = dict(
            HAS_GLOBAL=has_global, GATHERED=gathered, ATOMIC=mode == "atomic", ONE_LOOP=window and not gathered,
            **common,
        )  # fmt: skip
        dkdv.append(_Launch(_bwd_dkdv_kernel, lcfg, cols, (programs, bsz * hk), meta))
    dkdv_scalars = (*qkvd, *dk_s, *dv_s, h, hk, h // hk, nq, nk, ng, left, right, opts.scale, qk_scale)
    return _BackwardPlan(
        mode, delta, dq_launches, dkdv, delta_scalars, dq_scalars, dkdv_scalars, _direct_ok(q.device),
        q.device.index or 0,
    )  # fmt: skip


def _backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, opts: FlashOptions
) -> tuple[Tensor, Tensor, Tensor]:
    dout = _last_dim_unit(dout)
    key = (
        *_forward_key(q, k, v, opts), out.stride(), dout.stride(), dout.data_ptr() % 16,
        torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    plan = _BWD_PLANS.get(key)
    if plan is None:
        if len(_BWD_PLANS) >= 512:
            _BWD_PLANS.clear()
        plan = _BWD_PLANS[key] = _backward_plan(q, k, v, out, dout, opts)
    direct, index = plan.direct, plan.device_index
    gidx, gflag, _ = _global_args(opts, q.device)
    kpm, krange, _ = _pad_args(opts, q.device)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    plan.delta.run((out, dout, delta, *plan.delta_scalars), direct, index)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dvv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if plan.mode == "atomic":  # dQ summed in float32 by the dk/dv programs
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dq_acc = None
        for one in plan.dq:
            args = (q, k, v, dout, dq, lse, delta, one.rows, gidx, gflag, kpm, krange, *plan.dq_scalars)
            one.run(args, direct, index)
    for one in plan.dkdv:
        args = (q, k, v, dout, dk, dvv, lse, delta, one.rows, gidx, gflag, kpm, krange, dq_acc, *plan.dkdv_scalars)
        one.run(args, direct, index)
    if dq_acc is not None:
        dq = dq_acc.mul_(opts.scale).to(q.dtype)
    return dq, dk, dvv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, opts: FlashOptions) -> Tensor:  # type: ignore[override]
        q, k, v = (_last_dim_unit(t) for t in (q, k, v))
        out, lse = _forward(q, k, v, opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.opts)
        return dq, dk, dv, None


_PLAIN_OPTIONS: dict[tuple, FlashOptions] = {}


def _call_options(
    causal: bool,
    scale: float,
    window: tuple[int, int] | None,
    positions: tuple[int, ...],
    q: Tensor,
    kvalid: Tensor | None,
    krange: Tensor | None,
) -> FlashOptions:
    """The call's options; those without global tokens or padding (no tensors in them) are made
    once per (causal, scale, window)."""
    if positions or kvalid is not None:
        gidx, gflag = global_tensors(positions, q.shape[2], q.device) if positions else (None, None)
        return FlashOptions(causal, scale, window, positions, gidx, gflag, kvalid, krange)
    key = (causal, scale, window)
    opts = _PLAIN_OPTIONS.get(key)
    if opts is None:
        if len(_PLAIN_OPTIONS) >= 256:
            _PLAIN_OPTIONS.clear()
        opts = _PLAIN_OPTIONS[key] = FlashOptions(causal, scale, window)
    return opts


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    window: tuple[int, int] | None = None,
    global_positions: Sequence[int] = (),
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Fused softmax attention (inputs already validated by the public API).

    Args:
        q: ``(B, H, Nq, D)``; k: ``(B, Hk, Nk, D)``; v: ``(B, Hk, Nk, Dv)``, ``H % Hk == 0``,
            float16 / bfloat16 / float32, any strides, on CUDA (or CPU under the interpreter).
        causal: bottom-right causal mask (query ``i`` sees key ``j`` iff ``j <= i + Nk - Nq``).
        scale: softmax scale.
        window: ``(left, right)`` band with causal already folded in, or None (full attention).
        global_positions: sorted global token positions (``Nq == Nk``), used with a window.
        key_padding_mask: bool ``(B, Nk)``, True = real key, or None. Padded keys are invisible
            (positions are not shifted); any pattern works, contiguous padding also skips blocks.

    Returns ``(B, H, Nq, Dv)`` in the dtype of ``q``; rows without a visible key are 0.

    Under ``torch.compile`` the call goes through the custom operator ``flash_fwd`` (a fake
    implementation and autograd registered, see below), so a compiled model traces it without a
    graph break; eager calls launch directly.
    """
    if window is not None:
        window = (int(window[0]), int(window[1]))
    positions = tuple(int(p) for p in global_positions) if window is not None else ()
    kvalid = krange = None
    if key_padding_mask is not None:
        kvalid, krange = padding_args(key_padding_mask.to(q.device))
    if torch.compiler.is_compiling():
        left, right = window if window is not None else (0, 0)
        args = (bool(causal), float(scale), left, right, window is not None, list(positions), kvalid, krange)
        return flash_fwd(q, k, v, *args)[0]
    opts = _call_options(bool(causal), float(scale), window, positions, q, kvalid, krange)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, opts)
    # No gradient wanted: the forward alone, without the autograd function's bookkeeping.
    return _forward(_last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), opts)[0]


# ---------------------------------------------------------------------------------------------
# The same host functions as PyTorch custom operators, for torch.compile
# ---------------------------------------------------------------------------------------------
# ``torch.ops.attn_kernels.flash_fwd(q, k, v, causal, scale, left, right, has_window, global_pos,
# key_valid, key_range) -> (out, lse)`` and ``flash_bwd(q, k, v, out, lse, dout, ...) -> (dq, dk, dv)``
# run :func:`_forward` and :func:`_backward`. Each has a fake implementation (shapes and dtypes) and
# the forward an autograd formula, so ``torch.compile(fullgraph=True)`` traces a model using the
# Triton backend without a graph break, the backward kernels in the backward graph.
# :func:`flash_attention` calls them only while compiling: through the dispatcher an eager call
# would cost more Python than the launch. ``left``/``right``: the band (read when ``has_window``);
# ``global_pos``: sorted global positions (empty for none); ``key_valid``/``key_range``: the key
# padding of :func:`padding_args`, or None.


def _options(
    q: Tensor,
    causal: bool,
    scale: float,
    left: int,
    right: int,
    has_window: bool,
    global_pos: list[int],
    key_valid: Tensor | None,
    key_range: Tensor | None,
) -> FlashOptions:
    window = (left, right) if has_window else None
    positions = tuple(global_pos) if has_window else ()
    gidx, gflag = global_tensors(positions, q.shape[2], q.device) if positions else (None, None)
    return FlashOptions(causal, scale, window, positions, gidx, gflag, key_valid, key_range)


@torch.library.custom_op("attn_kernels::flash_fwd", mutates_args=())
def flash_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    left: int,
    right: int,
    has_window: bool,
    global_pos: list[int],
    key_valid: Tensor | None,
    key_range: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Nq, Dv), lse (B, H, Nq) float32)`` of the fused forward."""
    opts = _options(q, causal, scale, left, right, has_window, global_pos, key_valid, key_range)
    return _forward(_last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), opts)


@flash_fwd.register_fake
def _flash_fwd_fake(q, k, v, causal, scale, left, right, has_window, global_pos, key_valid, key_range):
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attn_kernels::flash_bwd", mutates_args=())
def flash_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    causal: bool,
    scale: float,
    left: int,
    right: int,
    has_window: bool,
    global_pos: list[int],
    key_valid: Tensor | None,
    key_range: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of the fused backward, shaped and typed like ``q, k, v``."""
    opts = _options(q, causal, scale, left, right, has_window, global_pos, key_valid, key_range)
    q, k, v = (_last_dim_unit(t) for t in (q, k, v))
    return _backward(q, k, v, out, lse, dout, opts)


@flash_bwd.register_fake
def _flash_bwd_fake(q, k, v, out, lse, dout, causal, scale, left, right, has_window, global_pos, key_valid, key_range):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_SCALARS = ("causal", "scale", "left", "right", "has_window", "global_pos")


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, *scalars, key_valid, key_range = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scalars = scalars
    ctx.padding = (key_valid, key_range)  # int tensors: no gradient, kept as they are


def _flash_fwd_backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_bwd(q, k, v, out, lse, dout.contiguous(), *ctx.scalars, *ctx.padding)
    return (dq, dk, dv, *([None] * (len(_SCALARS) + 2)))


flash_fwd.register_autograd(_flash_fwd_backward, setup_context=_setup_context)


def unsupported_reason(variant: object, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused kernels cannot run ``dtype`` / ``head_dim`` (Triton and device already checked)."""
    if not HAS_TRITON:
        return "Triton is not importable"
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(t).removeprefix("torch.") for t in SUPPORTED_DTYPES)
        return f"the Triton softmax kernels support {names}, not {dtype}"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"the Triton softmax kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 tl.dot gives wrong results under the Triton interpreter; use a CUDA device"
    if device.type == "cuda" and dtype == torch.bfloat16 and device_capability(device) < (8, 0):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    return None


__all__ = ["FlashOptions", "flash_attention", "flash_bwd", "flash_fwd", "unsupported_reason"]
