"""Performer (FAVOR+) attention: positive orthogonal random features approximating softmax.

Reference (explicit features, dense Nq x Nk), PyTorch (linear in N; causal by a chunked
prefix form) and Triton backends side by side.

With ``x' = x * scale ** 0.5`` and a projection ``W (m, D)``::

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)             (kernel="softmax")
    phi(x) = relu(W x') + 1e-3                            (kernel="relu")
    out_i  = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)   over visible j

``E[phi(q).phi(k)]`` equals ``exp(q.k * scale)``, so the output approximates softmax attention.

Stabilisers. The exponents are of the order of ``|x'|^2``, far outside the range of ``exp`` in
float32 at large input norms, so both feature maps are shifted. Keys use one shift per feature
``f`` (per batch and key head), ``c_f = max_j (W k_j' - |k_j'|^2 / 2)_f``: every feature column
of ``phi(K)`` peaks at exactly 1. Queries add ``c_f`` back to their exponents, then subtract
their row maximum ``r_i = max_f (W q_i' + c)_f``, so the product of features is unchanged but for
the row constant ``exp(-r_i)``, which cancels in the ratio::

    phi_k[j, f] = exp((W k_j' - |k_j'|^2 / 2)_f - c_f)
    phi_q[i, f] = exp((W q_i')_f + c_f - r_i) / sqrt(m)        (|q_i'|^2 / 2 cancels with r_i)

The largest term ``phi_q[i, f] phi_k[j, f]`` of every row is then exactly ``1 / sqrt(m)`` and
both its factors are at least that large, so a term is lost to underflow only when it is below
about ``1e-38`` (float32) of its row's largest: non-causal float32 follows float64 at any input
norm. (With one key shift per (batch, head), as before, the key features of most keys underflowed
at input standard deviation 30, D = 64.) A causal row sees only a prefix of the keys, whose
largest term can be far below ``1 / sqrt(m)``: see ``PerformerAttention`` for that range.
Shifts cancel exactly, so they are treated as constants in the backward pass.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import masks
from .base import AttentionVariant, SweepOption, register_backend, register_variant
from .checks import shape4
from .decode import DecodeState, PerformerState, StateLayout, triton_step
from .dense import compute_dtype, normal_tensor
from .favor import (
    RELU_EPS,
    _causal_piece,
    _causal_rows_with_keys,
    _group,
    _normalise,
    _repeat_heads,
    _safe_div,
    _with_ones,
    draw_projection,
    favor_causal,
    favor_noncausal,
    feature_map,
    key_features,
    key_shift,
    piece_rows,
    query_features,
    warn_if_underflow,
)

KERNELS = ("softmax", "relu")
MAX_NUM_FEATURES = 1 << 20
"""Upper bound on ``num_features``: the draw is one QR per ``head_dim`` features on the CPU and
the projection ``m * head_dim * 8`` bytes (8 GiB at D = 1024); more features would take minutes
and gigabytes before the first output. The Triton kernels take up to 1024."""
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    lo, hi = SEED_RANGE
    if not lo <= seed <= hi:
        raise ValueError(f"seed must be an int in [-2**63, 2**64 - 1] (torch.Generator's range), got {seed}")
    return int(seed)


def _host_memory() -> int | None:
    """Physical memory of this machine in bytes, None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_projection_memory(num_features: int, head_dim: int) -> None:
    """Refuse a draw whose float64 projection alone exceeds this machine's memory."""
    need, have = num_features * head_dim * 8, _host_memory()
    if have is not None and need > have:
        raise ValueError(
            f"num_features={num_features} with head dim {head_dim} needs a {need / 2**30:.1f} GiB float64 "
            f"projection, more than this machine's {have / 2**30:.1f} GiB of memory; use fewer features"
        )


@register_variant("performer")
class PerformerAttention(AttentionVariant):
    """FAVOR+ attention with ``num_features`` random features (see the module docstring).

    Args:
        num_features: number of random features ``m``, 1 to ``2**20`` (and the float64
            projection ``m * head_dim * 8`` bytes must fit in the machine's memory).
        kernel: ``"softmax"`` (positive random features) or ``"relu"``.
        ortho: orthogonal blocks with chi-distributed norms (True) or i.i.d. Gaussian rows.
        seed: seed of the CPU draw, an int in ``[-2**63, 2**64 - 1]``; the same seed gives the
            same ``W`` on every backend, device and dtype.
        projection: a given ``W (m, D)``; overrides the draw (and ``num_features``).

    Precision (``kernel="softmax"``). Non-causal calls follow the float64 computation to float32
    rounding at any input norm (per-feature key stabiliser, see the module docstring). Causal
    calls need the key exponents ``W k' - scale * |k|^2 / 2`` to vary across the keys by less
    than the compute dtype's exponent range (about 87 in float32, 708 in float64): a causal row
    sees only a prefix of the keys, and keys far below the largest underflow. Measured against an
    exact log-space evaluation (D = 64, N = 256, m = 128, three draws), float32: 2e-6 relative
    error up to input standard deviation 7, 1e-2 to 0.15 at 8 to 10, about 0.4 at 30; float64:
    4e-15 up to 10, 0.1 to 0.25 at 30. Such calls emit a :class:`PrecisionWarning`. Independently,
    ``scale * |x|^2 / 2`` must be finite in the compute dtype (float32: below 3.4e38), or the
    outputs are NaN.
    """

    sweep_options = (SweepOption("num_features", 128, "number of random features m", "m"),)
    verify_options = ({"num_features": 64},)
    approximates = "full"
    context_parallel = "scan"
    kernel_family = "favor"
    backward_flops_ratio = 2.0  # the linear form: a matmul's backward is twice its forward, no recomputation

    def __init__(
        self,
        num_features: int = 256,
        kernel: str = "softmax",
        ortho: bool = True,
        seed: int = 0,
        projection: Tensor | None = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if num_features > MAX_NUM_FEATURES:
            raise ValueError(
                f"num_features must be at most {MAX_NUM_FEATURES} (2**20), got {num_features}: the projection "
                "is drawn on the CPU, num_features * head_dim * 8 bytes, before the first output"
            )
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if not isinstance(ortho, bool):
            raise TypeError(f"ortho must be a bool, got {type(ortho).__name__}")
        seed = _check_seed(seed)
        if projection is not None:
            if not isinstance(projection, Tensor):
                raise TypeError(f"projection must be a torch.Tensor, got {type(projection).__name__}")
            if projection.ndim != 2 or projection.shape[0] < 1:
                raise ValueError(f"projection must have shape (num_features, head_dim), got {tuple(projection.shape)}")
            if not projection.is_floating_point():
                raise TypeError(f"projection must be floating point, got {projection.dtype}")
            if num_features not in (256, projection.shape[0]):
                raise ValueError(f"num_features={num_features} disagrees with projection rows ({projection.shape[0]})")
            num_features = projection.shape[0]
            projection = normal_tensor(projection.detach().to("cpu", torch.float64))
        self.num_features = int(num_features)
        self.kernel = kernel
        self.ortho = ortho
        self.seed = int(seed)
        self.projection = projection
        self._cache: dict[int, Tensor] = {}
        # (head_dim, device, dtype) -> (the float64 W it was made from, its version, the copy).
        self._placed: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, int, Tensor]] = {}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("num_features", "kernel", "ortho", "seed", "projection")

    def options(self) -> dict[str, object]:
        opts: dict[str, object] = {
            "num_features": self.num_features,
            "kernel": self.kernel,
            "ortho": self.ortho,
            "seed": self.seed,
        }
        if self.projection is not None:
            opts["projection"] = "<given>"
        return opts

    def redraw(self, seed: int | None = None) -> PerformerAttention:
        """Draw new random features (with ``seed``, or the next seed); returns ``self``."""
        if self.projection is not None:
            raise ValueError("this PerformerAttention was given a fixed projection; there is nothing to redraw")
        self.seed = _check_seed(self.seed + 1 if seed is None else seed)
        self._cache.clear()
        self._placed.clear()
        return self

    def projection_matrix(
        self, head_dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``W (num_features, head_dim)`` on ``device`` in ``dtype``; drawn once on the CPU in float64.

        The copy on ``device`` is kept (treat it as read-only): later calls neither copy nor
        synchronise with the device."""
        if self.projection is not None:
            w = self.projection
        else:
            if head_dim not in self._cache:
                _check_projection_memory(self.num_features, head_dim)
                with torch.inference_mode(False):  # the cache serves calls in every mode
                    w = draw_projection(self.num_features, head_dim, ortho=self.ortho, seed=self.seed)
                self._cache[head_dim] = w
            w = self._cache[head_dim]
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (head_dim, device, dtype)
        placed = self._placed.get(key)
        if placed is None or placed[0] is not w or placed[1] != w._version:
            with torch.inference_mode(False):
                placed = self._placed[key] = (w, w._version, w.to(device=device, dtype=dtype))
        return placed[2]

    def check_call(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
        if self.projection is not None and self.projection.shape[1] != q.shape[-1]:
            raise ValueError(
                f"projection has {self.projection.shape[1]} columns but the head dim of q is {q.shape[-1]}"
            )

    def features(self, x: Tensor, scale: float, is_query: bool, dtype: torch.dtype | None = None) -> Tensor:
        """``phi(x)`` for ``x (B, H, N, D)`` -> ``(B, H, N, m)`` in ``dtype`` (default: float32/float64)."""
        dtype = dtype or compute_dtype(x.dtype)
        w = self.projection_matrix(x.shape[-1], x.device, dtype)
        return feature_map(x, w, scale, self.kernel, is_query)

    def dense(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        scale: float,
        upcast: bool = True,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        dtype = compute_dtype(q.dtype) if upcast else q.dtype
        groups = q.shape[1] // k.shape[1]
        ws = self.projection_matrix(q.shape[-1], q.device, dtype) * scale**0.5
        # Padded keys get zero features: they leave every sum, and the shift is taken without them.
        shift = key_shift(k, ws, scale, self.kernel, key_mask=key_padding_mask)
        phi_k = key_features(k, ws, scale, self.kernel, shift, key_padding_mask).repeat_interleave(groups, dim=1)
        phi_q = query_features(q, ws, scale, self.kernel, _repeat_heads(shift, groups))
        a = torch.matmul(phi_q, phi_k.transpose(-1, -2))
        if causal:
            a = a * masks.dense_mask(q.shape[2], k.shape[2], causal=True, device=q.device)
        num = torch.matmul(a, v.to(dtype).repeat_interleave(groups, dim=1))
        den = a.sum(dim=-1, keepdim=True)
        if causal and upcast and self.kernel == "softmax":  # only rows that see a key count
            seen = _causal_rows_with_keys(key_padding_mask, q.shape[0], q.shape[2], k.shape[2], q.device)
            warn_if_underflow(den.detach().squeeze(-1).masked_fill(~seen[:, None], math.inf).amin())
        return _safe_div(num, den).to(q.dtype)

    # -- decoding: the recurrent state [S, z] with a running key stabiliser ------------------------

    # triton: the fused step of attn_kernels.decode (steps of at most 16 tokens; longer ones, e.g. a
    # prompt, run the PyTorch recurrence). The reference backend has no recurrence.
    decode_backends = ("torch", "triton")

    def decode_options(self) -> dict[str, object]:
        """What the state's features depend on: ``num_features``, ``kernel``, and the projection
        (``ortho`` and ``seed`` of the draw, or the given ``projection``)."""
        given = self.projection is not None
        return {
            "num_features": self.num_features,
            "kernel": self.kernel,
            "projection": self.projection,
            "ortho": None if given else self.ortho,
            "seed": None if given else self.seed,
        }

    def decode_state(self, layout: StateLayout, *, capacity: int) -> PerformerState:
        if self.projection is not None and self.projection.shape[1] != layout.head_dim:
            raise ValueError(f"projection has {self.projection.shape[1]} columns but head_dim is {layout.head_dim}")
        compute = compute_dtype(layout.dtype)
        return PerformerState(layout, num_features=self.num_features, kernel=self.kernel, compute=compute)

    def decode_step(self, q: Tensor, k: Tensor, v: Tensor, state: DecodeState, scale: float, backend: str) -> Tensor:
        """The causal recurrence of :func:`favor_causal` continued from ``state``.

        The key shift is the running per-feature maximum of the key exponents (the maximum over
        every key seen, this step's included): when this step raises it by ``delta``, the state's
        row ``f`` is rescaled by ``exp(-delta_f)``, which keeps ``phi(k_j) = exp(l_j - c)`` for
        every stored key. Queries add the same shift back, so the output is the forward's, which
        uses the maximum over the whole sequence: the shifts cancel exactly.
        """
        assert isinstance(state, PerformerState)
        dtype = state.kv.dtype
        if state.ws is None:
            state.ws = self.projection_matrix(q.shape[-1], q.device, dtype) * scale**0.5
        ws, groups = state.ws, q.shape[1] // k.shape[1]
        if triton_step(backend, q):
            from attn_kernels.decode import favor_step

            out, den, state.kv, shift = favor_step(
                q, k, v, ws, state.kv, state.shift, scale=scale, kernel=self.kernel, relu_eps=RELU_EPS
            )
            if shift is not None:
                state.shift = shift.view(state.kv.shape[0], state.kv.shape[1], 1, -1)
                warn_if_underflow(den.amin())
            return out
        rows = piece_rows(q.shape[0] * q.shape[1], self.num_features)
        shift = key_shift(k, ws, scale, self.kernel, rows)
        if shift is not None:
            assert state.shift is not None
            shift = torch.maximum(state.shift, shift)
            state.kv.mul_(torch.exp(state.shift - shift).transpose(-1, -2))  # exp(-inf) = 0 before any key
            state.shift = shift
        q_shift = _repeat_heads(shift, groups)
        v1 = _with_ones(v.to(dtype))
        if q.shape[2] == 1:  # one token sees itself and the state: add its key first, then read out
            pk = key_features(k, ws, scale, self.kernel, shift)
            state.kv.add_(torch.matmul(pk.transpose(-1, -2), v1))
            pq = _group(query_features(q, ws, scale, self.kernel, q_shift), k.shape[1])
            num_den = torch.matmul(pq, state.kv[:, :, None]).reshape(*q.shape[:3], v1.shape[-1])
            if self.kernel == "softmax":
                warn_if_underflow(num_den[..., -1].amin())
            return _normalise(num_den).to(q.dtype)
        outs: list[Tensor] = []
        dens: list[Tensor] = []
        for s in range(0, q.shape[2], rows):
            e = s + rows
            pq = query_features(q[:, :, s:e], ws, scale, self.kernel, q_shift)
            pk = key_features(k[:, :, s:e], ws, scale, self.kernel, shift)
            out, state.kv = _causal_piece(pq, pk, v1[:, :, s:e], state.kv, dens)
            outs.append(out)
        if self.kernel == "softmax":
            warn_if_underflow(torch.stack(dens).amin())
        return torch.cat(outs, dim=2).to(q.dtype)

    def flops(
        self,
        q: Tensor | Sequence[int],
        k: Tensor | Sequence[int],
        v: Tensor | Sequence[int],
        *,
        causal: bool = False,
    ) -> int:
        """Analytic FLOPs of one forward: feature maps, then the linear (prefix-sum) form.

        ``2 m D`` per query and key row for the projection, ``2 m (Dv + 1)`` per key row for
        ``phi(K)^T [V, 1]`` and per query row for the readout. Causal counts the same (the
        prefix-sum form does the same work per token).
        """
        b, h, nq, d = shape4(q)
        hk, nk = shape4(k)[1], shape4(k)[2]
        dv = shape4(v)[3]
        m = self.num_features
        feature = 2 * m * d * b * (h * nq + hk * nk)
        return feature + 2 * m * (dv + 1) * b * (hk * nk + h * nq)

    def decode_flops(
        self, q: Tensor | Sequence[int], k: Tensor | Sequence[int], v: Tensor | Sequence[int], context: int
    ) -> int:
        """A step reads the recurrent state ``S, z``, not the context: the features of the new
        queries and keys, their update of the state and the readout, whatever ``context`` is."""
        return self.flops(q, k, v, causal=True)


@register_backend(PerformerAttention, "torch", padding=True)
def _performer_torch(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    assert isinstance(variant, PerformerAttention)
    dtype = compute_dtype(q.dtype)
    ws = variant.projection_matrix(q.shape[-1], q.device, dtype) * scale**0.5
    rows = piece_rows(q.shape[0] * q.shape[1], variant.num_features)
    kpm = key_padding_mask
    shift = key_shift(k, ws, scale, variant.kernel, rows, key_mask=kpm)
    q_shift = _repeat_heads(shift, q.shape[1] // k.shape[1])

    def phi_q(start: int, end: int) -> Tensor:
        return query_features(q[:, :, start:end], ws, scale, variant.kernel, q_shift)

    def phi_k(start: int, end: int) -> Tensor:
        piece_mask = None if kpm is None else kpm[:, start:end]
        return key_features(k[:, :, start:end], ws, scale, variant.kernel, shift, piece_mask)

    v1 = _with_ones(v.to(dtype))
    if not causal:
        return favor_noncausal(phi_q, phi_k, v1, q.shape[1], q.shape[2], rows).to(q.dtype)
    seen = None if kpm is None else masks.keys_seen(kpm, q.shape[2], causal=True)
    return favor_causal(phi_q, phi_k, v1, q.shape[1], q.shape[2], rows, seen).to(q.dtype)


def _favor_triton_check(
    variant: AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int
) -> str | None:
    from attn_kernels import favor_unsupported_reason

    return favor_unsupported_reason(variant, device, dtype, head_dim)


@register_backend(PerformerAttention, "triton", check=_favor_triton_check, padding=True)
def _performer_triton(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    from attn_kernels.favor import favor_attention

    assert isinstance(variant, PerformerAttention)
    w = variant.projection_matrix(q.shape[-1], q.device, torch.float32)
    return favor_attention(
        q, k, v, w, causal=causal, scale=scale, kernel=variant.kernel, key_padding_mask=key_padding_mask
    )
