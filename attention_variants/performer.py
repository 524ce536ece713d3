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
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import masks
from .base import AttentionVariant, SweepOption, _shape, compute_dtype, register_backend, register_variant
from .decode import DecodeState, PerformerState, StateLayout, triton_step

KERNELS = ("softmax", "relu")
MAX_NUM_FEATURES = 1 << 20
"""Upper bound on ``num_features``: the draw is one QR per ``head_dim`` features on the CPU and
the projection ``m * head_dim * 8`` bytes (8 GiB at D = 1024); more features would take minutes
and gigabytes before the first output. The Triton kernels take up to 1024."""
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
RELU_EPS = 1e-3
CHUNK = 128  # chunk length of the causal prefix form in the PyTorch backend


def draw_projection(num_features: int, head_dim: int, *, ortho: bool = True, seed: int = 0) -> Tensor:
    """Random projection ``W (num_features, head_dim)`` in float64 on the CPU, reproducible by ``seed``.

    ``ortho=True``: stacked blocks of ``head_dim`` orthonormal rows (QR of a Gaussian matrix),
    each row rescaled by an independent chi(head_dim) norm, so every row is marginally N(0, I).
    ``ortho=False``: i.i.d. N(0, I) rows.
    """
    if head_dim == 0:
        return torch.zeros(num_features, 0, dtype=torch.float64)  # q.k = 0: uniform attention, exactly
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if not ortho:
        return torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64)
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gauss = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        qmat, rmat = torch.linalg.qr(gauss)
        # Fix QR's sign ambiguity so the draw does not depend on the LAPACK build.
        qmat = qmat * torch.sign(torch.diagonal(rmat))[None, :]
        blocks.append(qmat.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return rows * norms[:, None]


def _project(x: Tensor, ws: Tensor) -> Tensor:
    return torch.matmul(x.to(ws.dtype), ws.T)  # W x', with ws = W * sqrt(scale)


def _key_logits(x: Tensor, ws: Tensor, scale: float) -> Tensor:
    """The key exponents ``W k' - |k'|^2 / 2``, ``(..., N, m)``: one expression for
    :func:`key_shift` and :func:`key_features`, so the shifted maximum is exactly 0."""
    x = x.to(ws.dtype)
    return torch.matmul(x, ws.T).sub_((0.5 * scale) * x.square().sum(dim=-1, keepdim=True))


def query_features(x: Tensor, ws: Tensor, scale: float, kernel: str, shift: Tensor | None = None) -> Tensor:
    """``phi(q)`` for ``x (..., N, D)`` and the scaled projection ``ws = W * sqrt(scale)``.

    ``shift`` is the per-feature key shift of :func:`key_shift`, repeated to the query heads
    (``(..., 1, m)``); None gives the features of the definition up to a per-row constant.
    """
    proj = _project(x, ws)
    if kernel == "relu":
        return torch.relu(proj) + RELU_EPS
    # exp(W x' + c - |x'|^2/2 - r) / sqrt(m) with r the row max: |x'|^2/2 is constant along a
    # row and cancels with r, leaving exp(W x' + c - rowmax(W x' + c)) / sqrt(m).
    if shift is not None:
        proj = proj.add_(shift)
    with torch.no_grad():
        row = proj.amax(dim=-1, keepdim=True) + 0.5 * math.log(ws.shape[0])
    return proj.sub_(row).exp_()


def _drop_padded(logits: Tensor, key_mask: Tensor | None, fill: float) -> Tensor:
    """``logits (B, Hk, n, m)`` with the rows of padded keys (``key_mask (B, n)`` False) set to ``fill``."""
    return logits if key_mask is None else logits.masked_fill(~key_mask[:, None, :, None], fill)


def key_shift(
    k: Tensor, ws: Tensor, scale: float, kernel: str, rows: int | None = None, key_mask: Tensor | None = None
) -> Tensor | None:
    """The per-feature key shift ``c (..., 1, m)``: the max of the exponent ``W k' - |k'|^2/2``
    over the keys, for each feature. Computed ``rows`` keys at a time, no grad. ``key_mask (B, N)``:
    only the keys where it is True count (a batch element with none gets 0)."""
    if kernel == "relu":
        return None
    n = k.shape[-2]
    rows = rows or max(n, 1)
    with torch.no_grad():
        best = k.new_zeros(*k.shape[:-2], 1, ws.shape[0], dtype=ws.dtype) if n == 0 else None
        for start in range(0, n, rows):
            piece_mask = None if key_mask is None else key_mask[:, start : start + rows]
            logits = _drop_padded(_key_logits(k[..., start : start + rows, :], ws, scale), piece_mask, -math.inf)
            piece = logits.amax(dim=-2, keepdim=True)
            best = piece if best is None else torch.maximum(best, piece)
        assert best is not None
        return best if key_mask is None else best.masked_fill_(best == -math.inf, 0.0)


def key_features(
    x: Tensor, ws: Tensor, scale: float, kernel: str, shift: Tensor | None, key_mask: Tensor | None = None
) -> Tensor:
    """``phi(k)`` for ``x (B, Hk, N, D)`` with the shift of :func:`key_shift`; ``key_mask (B, N)``:
    padded keys (False) get all-zero features, so they drop out of every sum."""
    if kernel == "relu":
        return _drop_padded(torch.relu(_project(x, ws)) + RELU_EPS, key_mask, 0.0)
    assert shift is not None
    # -inf before the exp: a padded key's exponent may exceed the shift (taken over real keys only).
    return _drop_padded(_key_logits(x, ws, scale).sub_(shift), key_mask, -math.inf).exp_()


def feature_map(x: Tensor, w: Tensor, scale: float, kernel: str, is_query: bool) -> Tensor:
    """FAVOR+ features ``phi(x)``: ``x (..., N, D)``, ``w (m, D)`` -> ``(..., N, m)`` in ``w``'s dtype.

    Each side on its own, up to constants: queries per row, keys per feature (see the module
    docstring; the attention itself also adds the key shift to the query exponents)."""
    ws = w * scale**0.5
    if is_query:
        return query_features(x, ws, scale, kernel)
    return key_features(x, ws, scale, kernel, key_shift(x, ws, scale, kernel))


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


class _SafeDiv(torch.autograd.Function):
    """``num / den`` with ``den (..., 1)``: rows with no visible key (den == 0, hence num == 0)
    give 0 and zero gradients. In the backward, ``den`` is floored at ``BACKWARD_DEN_FLOOR``:
    large-norm float16 inputs can make the normaliser of an early causal row subnormal in
    float32, and ``g / den`` would overflow to inf. The forward is exact; the gradient of such
    a row (mathematically near zero there) is damped instead of infinite."""

    @staticmethod
    def forward(ctx, num: Tensor, den: Tensor) -> Tensor:  # type: ignore[override]
        empty = den == 0
        out = torch.where(empty, 0.0, num / torch.where(empty, 1.0, den))
        ctx.save_for_backward(out, den, empty)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out, den, empty = ctx.saved_tensors
        safe = torch.where(empty, 1.0, den.clamp_min(BACKWARD_DEN_FLOOR[den.dtype]))
        g_num = torch.where(empty, 0.0, g / safe)
        g_den = torch.where(empty, 0.0, -(g * out).sum(dim=-1, keepdim=True) / safe)
        return g_num, g_den


BACKWARD_DEN_FLOOR = {torch.float64: 1e-300, torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 0.0}


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` per row (``den (..., 1)``); see :class:`_SafeDiv`."""
    return _SafeDiv.apply(num, den)


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
            projection = projection.detach().to("cpu", torch.float64)
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
                self._cache[head_dim] = draw_projection(self.num_features, head_dim, ortho=self.ortho, seed=self.seed)
            w = self._cache[head_dim]
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (head_dim, device, dtype)
        placed = self._placed.get(key)
        if placed is None or placed[0] is not w or placed[1] != w._version:
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
        b, h, nq, d = _shape(q)
        hk, nk = _shape(k)[1], _shape(k)[2]
        dv = _shape(v)[3]
        m = self.num_features
        feature = 2 * m * d * b * (h * nq + hk * nk)
        return feature + 2 * m * (dv + 1) * b * (hk * nk + h * nq)


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


PIECE_ELEMENTS = 1 << 21
"""Feature elements per piece of rows (8 MB in float32). The PyTorch backend walks the sequence in
pieces so that no intermediate grows past glibc's mmap threshold (32 MB at most): larger
tensors are mapped fresh on every allocation, and the page faults made time superlinear in N."""


def piece_rows(heads: int, num_features: int) -> int:
    """Rows per piece for ``heads = B * H`` heads of ``num_features`` features (a multiple of CHUNK)."""
    rows = PIECE_ELEMENTS // max(1, heads * num_features)
    return max(CHUNK, rows // CHUNK * CHUNK)


def _causal_rows_with_keys(key_padding_mask: Tensor | None, b: int, nq: int, nk: int, device: torch.device) -> Tensor:
    """Bool ``(B, Nq)``: the causal rows that see at least one (real) key."""
    if key_padding_mask is None:
        key_padding_mask = torch.ones(b, nk, dtype=torch.bool, device=device)
    return masks.keys_seen(key_padding_mask, nq, causal=True)


def _repeat_heads(shift: Tensor | None, groups: int) -> Tensor | None:
    """The key shift ``(B, Hk, 1, m)`` for the query heads, ``(B, Hk * groups, 1, m)``."""
    return shift if shift is None or groups == 1 else shift.repeat_interleave(groups, dim=1)


def _group(phi_q: Tensor, hk: int) -> Tensor:
    """``(B, H, N, m) -> (B, Hk, G, N, m)``: query heads grouped under their key head."""
    b, h, n, m = phi_q.shape
    return phi_q.view(b, hk, h // hk, n, m)


def _with_ones(v: Tensor) -> Tensor:
    """``[v, 1]``: one matmul with it yields both the numerator and the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _normalise(num_den: Tensor) -> Tensor:
    return _safe_div(num_den[..., :-1], num_den[..., -1:])


class PrecisionWarning(RuntimeWarning):
    """A causal Performer call whose feature exponents span more than its compute dtype resolves."""


def warn_if_underflow(den_min: Tensor) -> None:
    """Warn when a causal row's normaliser ``den_min`` (the smallest over rows that see a key) is
    below the dtype's smallest normal number: that row's terms are subnormal or lost to underflow.

    Non-causal rows never get there: the largest term of every row is exactly ``1 / sqrt(m)``.
    A causal row only sees a prefix of the keys, while the key shift is the maximum over all of
    them; when key exponents differ by more than the dtype's range (about 87 in float32, 708 in
    float64), the keys of early rows underflow. Measured (float32, D = 64, N = 256, m = 128, input
    standard deviations 5 to 9): rows off by more than 1e-4 all had normalisers below 1e-43, and
    rows with normalisers down to 1e-41 were still at float32 rounding, so this floor leaves
    a margin of about five orders of magnitude.
    """
    if den_min.is_meta or den_min.numel() == 0:
        return
    floor = torch.finfo(den_min.dtype).tiny
    den = float(den_min)
    if den < floor:  # False for NaN
        warnings.warn(
            f"causal Performer in {den_min.dtype}: a row's normaliser is {den:.3g}, below {floor:.3g}: "
            f"the key exponents (about scale * |k|^2 / 2) vary across the keys by more than {den_min.dtype} "
            "resolves, so the keys of early rows underflow and those rows are inaccurate. Smaller norms or "
            "scale help (float64 resolves about 8 times more); non-causal calls are not affected "
            "(see the PerformerAttention docstring).",
            PrecisionWarning,
            stacklevel=5,  # the caller of AttentionVariant.__call__
        )


FeatureFn = Callable[[int, int], Tensor]


def favor_noncausal(phi_q: FeatureFn, phi_k: FeatureFn, v1: Tensor, h: int, nq: int, rows: int) -> Tensor:
    """Non-causal FAVOR+: ``phi(K)^T [V, 1]`` over key pieces, then one readout per query piece.

    ``phi_q(start, end)`` / ``phi_k(start, end)`` give the features of rows ``[start, end)``
    (``(B, H, n, m)`` / ``(B, Hk, n, m)``); ``v1 = [V, 1]`` is ``(B, Hk, Nk, Dv + 1)``.
    Returns ``(B, H, Nq, Dv)``; O(N m Dv) time, O(rows m + m Dv) working memory.
    """
    b, hk, nk, dv1 = v1.shape
    kv = sum(
        torch.matmul(phi_k(s, s + rows).transpose(-1, -2), v1[:, :, s : s + rows]) for s in range(0, nk, rows)
    )  # (B, Hk, m, Dv + 1)
    outs = []
    for s in range(0, nq, rows):
        pq = phi_q(s, s + rows)
        outs.append(_normalise(torch.matmul(_group(pq, hk), kv[:, :, None])).reshape(b, h, pq.shape[2], dv1 - 1))
    return torch.cat(outs, dim=2)


def favor_causal(
    phi_q: FeatureFn, phi_k: FeatureFn, v1: Tensor, h: int, nq: int, rows: int, seen: Tensor | None = None
) -> Tensor:
    """Causal (bottom-right) FAVOR+, piece by piece with a running state (arguments as
    :func:`favor_noncausal`). Within a piece: chunks of ``CHUNK``, exact inside a chunk, prefix
    states across chunks. No N x m x Dv tensor; O(rows (m + CHUNK) + (rows / CHUNK) m Dv) working memory.
    Warns when a row's normaliser underflows (:func:`warn_if_underflow`); ``seen (B, Nq)``, when
    given, marks the rows that see a key at all (key padding: the others have a zero normaliser).
    """
    b, hk, nk, dv1 = v1.shape
    off = nk - nq
    outs = []
    q0 = 0
    if off < 0:  # the first -off queries see no key
        outs.append(v1.new_zeros(b, h, -off, dv1 - 1))
        q0, off = -off, 0
    # Keys before the aligned diagonal are visible to every query: they seed the state.
    state = v1.new_zeros(b, hk, 1, dv1) if off == 0 else 0
    for s in range(0, off, rows):
        e = min(off, s + rows)
        state = state + torch.matmul(phi_k(s, e).transpose(-1, -2), v1[:, :, s:e])
    dens: list[Tensor] = []
    for s in range(0, nq - q0, rows):
        e = min(nq - q0, s + rows)
        pq = phi_q(q0 + s, q0 + e)
        piece_seen = None if seen is None else seen[:, q0 + s : q0 + e]
        out, state = _causal_piece(pq, phi_k(off + s, off + e), v1[:, :, off + s : off + e], state, dens, piece_seen)
        outs.append(out)
    if dens:
        warn_if_underflow(torch.stack(dens).amin())
    return torch.cat(outs, dim=2)


def _causal_piece(
    pq: Tensor, pk: Tensor, pv: Tensor, state: Tensor, dens: list[Tensor], seen: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal FAVOR+ on aligned rows: ``pq (B,H,n,m)``, ``pk (B,Hk,n,m)``, ``pv (B,Hk,n,Dv+1)``,
    ``state (B,Hk,m,Dv+1)`` (or broadcastable) from earlier keys. Returns ``(out, new state)``
    and appends the smallest normaliser of the piece to ``dens`` (over the rows ``seen (B, n)``
    marks, when given)."""
    b, h, n, m = pq.shape
    hk, dv1 = pk.shape[1], pv.shape[-1]
    c = min(CHUNK, n)
    nc = math.ceil(n / c)
    pad = nc * c - n
    pq = torch.nn.functional.pad(pq, (0, 0, 0, pad)).view(b, hk, h // hk, nc, c, m)
    pk = torch.nn.functional.pad(pk, (0, 0, 0, pad)).view(b, hk, nc, c, m)
    pv = torch.nn.functional.pad(pv, (0, 0, 0, pad)).view(b, hk, nc, c, dv1)

    kv = torch.matmul(pk.transpose(-1, -2), pv)  # (B, Hk, nc, m, Dv + 1)
    # State before each chunk: state + sum of earlier chunks (not cumsum - kv: that cancels).
    prefix = torch.cumsum(kv, dim=2)
    states = torch.cat([state.expand(b, hk, m, dv1)[:, :, None], prefix[:, :, :-1] + state[:, :, None]], dim=2)
    num_den = torch.matmul(pq, states[:, :, None])  # (B, Hk, G, nc, c, Dv + 1)
    a = torch.matmul(pq, pk[:, :, None].transpose(-1, -2)).tril_()  # (B, Hk, G, nc, c, c), causal
    num_den = (num_den + torch.matmul(a, pv[:, :, None])).reshape(b, h, nc * c, dv1)[:, :, :n]
    den = num_den[..., -1].detach()
    dens.append((den if seen is None else den.masked_fill(~seen[:, None], math.inf)).amin())
    return _normalise(num_den), prefix[:, :, -1] + state
