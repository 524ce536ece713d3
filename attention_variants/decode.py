"""Incremental decoding: one state per variant, fed a few new tokens at a time.

::

    state = variant.init_state(batch, kv_heads, head_dim, dtype=..., device=...)
    out, state = variant.step(q_t, k_t, v_t, state)        # T >= 1 new tokens
    out, state = variant.prefill(q, k, v)                  # = init_state + step

``q_t (B, H, T, D)``, ``k_t (B, Hk, T, D)``, ``v_t (B, Hk, T, Dv)`` are the next ``T`` tokens of
one sequence per batch row. Decoding is always causal: new token ``i`` sees every earlier token
(as the variant's mask allows) and new tokens ``<= i``. Decoding a sequence in any split into
steps equals ``variant(q, k, v, causal=True)`` on the whole sequence, to rounding.

The states (``state.nbytes`` is the memory they hold):

- :class:`KVCache` (``full``): every key and value seen, in buffers grown by doubling.
- :class:`WindowCache` (``sliding_window``): a ring buffer of the last ``left + 1`` keys and
  values (O(window) memory) plus the keys and values of the global positions.
- :class:`PerformerState` (``performer``): ``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)``
  per key head, ``m x (Dv + 1)`` numbers, independent of the length, and the key stabiliser.

A variant supports decoding by overriding :meth:`AttentionVariant.decode_state` and
:meth:`AttentionVariant.decode_step`; the checks and the bookkeeping live here.
States are updated in place (``step`` returns the same object) and hold no autograd history:
decoding runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .checks import FLOAT_DTYPES, resolve_scale, validate_qkv

if TYPE_CHECKING:
    from .base import AttentionVariant

DEFAULT_CAPACITY = 256
"""Initial token capacity of a growing buffer when ``init_state`` is given none."""


@dataclass(frozen=True)
class StateLayout:
    """What a state is for: the variant's name, ``batch`` sequences, ``kv_heads`` key/value heads,
    key head dim ``head_dim``, value head dim ``value_dim``, and the inputs' dtype and device."""

    variant: str
    batch: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device


class DecodeState:
    """What every decoding state records: its :class:`StateLayout` (also as attributes), the
    variant options it was made with (``options``, from
    :meth:`AttentionVariant.decode_options`; a step by a variant with other options is refused),
    the number of tokens seen (``length``) and the scale of its first step (``scale``; later steps
    must use the same, since a Performer's state depends on it)."""

    options: dict[str, object]

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self.variant, self.batch, self.kv_heads = layout.variant, layout.batch, layout.kv_heads
        self.head_dim, self.value_dim = layout.head_dim, layout.value_dim
        self.dtype, self.device = layout.dtype, layout.device
        self.length = 0
        self.scale: float | None = None
        self.options = {}

    def tensors(self) -> list[Tensor]:
        """The tensors this state holds (for :attr:`nbytes`)."""
        return []

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (allocated capacity, not only the used part)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(variant={self.variant!r}, options={self.options!r}, length={self.length}, "
            f"batch={self.batch}, "
            f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
            f"dtype={self.dtype}, nbytes={self.nbytes})"
        )


def _grown(buf: Tensor, need: int, limit: int | None = None) -> Tensor:
    """``buf (B, Hk, C, E)`` with room for ``need`` tokens along dim 2: capacity doubled (at least
    ``need``, at most ``limit``), the old contents copied. Returns ``buf`` when it fits."""
    cap = buf.shape[2]
    if need <= cap:
        return buf
    new_cap = max(need, 2 * cap)
    if limit is not None:
        new_cap = min(new_cap, limit)
    out = buf.new_empty(*buf.shape[:2], new_cap, buf.shape[3])
    out[:, :, :cap] = buf
    return out


class KVCache(DecodeState):
    """Keys ``k (B, Hk, C, D)`` and values ``v (B, Hk, C, Dv)`` of every token seen; the first
    ``length`` of the capacity ``C`` are valid. ``C`` doubles when a step needs more."""

    def __init__(self, layout: StateLayout, *, capacity: int) -> None:
        super().__init__(layout)
        self.k = torch.empty(self.batch, self.kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)
        self.v = torch.empty(self.batch, self.kv_heads, capacity, self.value_dim, dtype=self.dtype, device=self.device)

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Store ``T`` new tokens after the ``length`` valid ones (``length`` is not advanced)."""
        n, t = self.length, k.shape[2]
        self.k, self.v = _grown(self.k, n + t), _grown(self.v, n + t)
        self.k[:, :, n : n + t] = k
        self.v[:, :, n : n + t] = v

    def keys(self, end: int) -> Tensor:
        return self.k[:, :, :end]

    def values(self, end: int) -> Tensor:
        return self.v[:, :, :end]


class WindowCache(DecodeState):
    """Sliding-window state: a ring buffer of the last ``left + 1`` tokens and the global tokens.

    ``ring_k (B, Hk, R, D)``, ``ring_v (B, Hk, R, Dv)``: absolute position ``p`` lives in slot
    ``p % (left + 1)``. ``R`` grows by doubling up to ``left + 1`` (so a window wider than the text
    costs only the text), then stays: memory is O(window). One slot beyond ``left`` lets a
    single-token step write its key first and attend to the ring in place.
    ``global_k (B, Hk, G, D)``, ``global_v (B, Hk, G, Dv)``: the tokens at the global positions
    ``global_pos`` (a sorted list, all inside the first step; ``global_idx`` the same as an int32
    tensor on the device), visible to every later query.
    """

    def __init__(self, layout: StateLayout, *, left: int, capacity: int) -> None:
        super().__init__(layout)
        self.left = left
        cap = max(1, min(capacity, left + 1))
        self.ring_k = torch.empty(self.batch, self.kv_heads, cap, self.head_dim, dtype=self.dtype, device=self.device)
        self.ring_v = torch.empty(self.batch, self.kv_heads, cap, self.value_dim, dtype=self.dtype, device=self.device)
        self.global_pos: list[int] = []
        self.global_idx = torch.zeros(0, dtype=torch.int32, device=self.device)  # global_pos on the device
        self.global_k = self.ring_k.new_zeros(self.batch, self.kv_heads, 0, self.head_dim)
        self.global_v = self.ring_v.new_zeros(self.batch, self.kv_heads, 0, self.value_dim)

    def tensors(self) -> list[Tensor]:
        return [self.ring_k, self.ring_v, self.global_k, self.global_v, self.global_idx]

    @property
    def period(self) -> int:
        return self.left + 1

    def write(self, k: Tensor, v: Tensor, start: int) -> None:
        """Store tokens at absolute positions ``start, start + 1, ...`` (only the last
        ``left + 1`` of them can matter later)."""
        t = k.shape[2]
        keep = min(t, self.period)
        k, v, start = k[:, :, t - keep :], v[:, :, t - keep :], start + t - keep
        # Slots up to start + keep are used, never more than the period: a full ring is not regrown.
        need = min(start + keep, self.period)
        self.ring_k = _grown(self.ring_k, need, self.period)
        self.ring_v = _grown(self.ring_v, need, self.period)
        slots = torch.arange(start, start + keep, device=self.device) % self.period
        self.ring_k[:, :, slots] = k
        self.ring_v[:, :, slots] = v

    def ordered(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of absolute positions ``[start, end)`` (within the ring), in order."""
        slots = torch.arange(start, end, device=self.device) % self.period
        return self.ring_k[:, :, slots], self.ring_v[:, :, slots]


class PerformerState(DecodeState):
    """FAVOR+ recurrent state, in the compute dtype (float32, or float64 for float64 inputs).

    ``kv (B, Hk, m, Dv + 1)``: ``[S, z]`` with ``S = sum_j phi(k_j) v_j^T`` and
    ``z = sum_j phi(k_j)`` (the views :attr:`S` and :attr:`z`). ``shift (B, Hk, 1, m)``
    (``kernel="softmax"``; None for relu): the running per-feature maximum of the key exponents
    ``W k' - |k'|^2 / 2`` that ``phi(k)`` is stabilised with; when a step raises it by ``delta``,
    row ``f`` of ``kv`` is multiplied by ``exp(-delta_f)`` first. ``ws (m, D)``: the scaled
    projection ``W * sqrt(scale)``, fixed by the first step.
    """

    def __init__(self, layout: StateLayout, *, num_features: int, kernel: str, compute: torch.dtype) -> None:
        super().__init__(layout)
        m = num_features
        self.kv = torch.zeros(self.batch, self.kv_heads, m, self.value_dim + 1, dtype=compute, device=self.device)
        self.shift: Tensor | None = None
        if kernel == "softmax":
            self.shift = torch.full((self.batch, self.kv_heads, 1, m), float("-inf"), dtype=compute, device=self.device)
        self.ws: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.kv, self.shift, self.ws) if t is not None]

    @property
    def S(self) -> Tensor:
        return self.kv[..., :-1]

    @property
    def z(self) -> Tensor:
        return self.kv[..., -1]


# ---------------------------------------------------------------------------------------------
# The shared entry points (AttentionVariant.init_state / step / prefill call these)
# ---------------------------------------------------------------------------------------------


def _check_dim(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def init_state(
    variant: AttentionVariant,
    batch: int,
    kv_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    capacity: int | None = None,
) -> DecodeState:
    """An empty state of ``variant`` for ``batch`` sequences (see the module docstring)."""
    batch = _check_dim(batch, "batch", 1)
    kv_heads = _check_dim(kv_heads, "kv_heads", 1)
    head_dim = _check_dim(head_dim, "head_dim", 0)
    value_dim = head_dim if value_dim is None else _check_dim(value_dim, "value_dim", 0)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    if not isinstance(device, torch.device | str):
        raise TypeError(f"device must be a torch.device or str, got {type(device).__name__}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    capacity = DEFAULT_CAPACITY if capacity is None else _check_dim(capacity, "capacity", 1)
    layout = StateLayout(variant.name, batch, kv_heads, head_dim, value_dim, dtype, device)
    with torch.inference_mode(False):  # a state made under inference_mode is stepped in any mode
        state = variant.decode_state(layout, capacity=capacity)
    state.options = dict(variant.decode_options())
    return state


def _same_option(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b.to(a.device))
        )
    return bool(a == b)


def _show_option(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a given {tuple(x.shape)} tensor"
    return repr(x)


def check_options(variant: AttentionVariant, state: DecodeState) -> None:
    """Refuse a state made with other options than ``variant``'s (a ``ValueError`` naming the first
    option that differs): its contents were computed with those options."""
    ours = variant.decode_options()
    for name in dict.fromkeys([*state.options, *ours]):
        theirs, mine = state.options.get(name), ours.get(name)
        if not _same_option(theirs, mine):
            raise ValueError(
                f"{name}={_show_option(mine)} of this {variant.name} variant differs from the state's "
                f"{name}={_show_option(theirs)}: a state is stepped only by a variant with the options that made it"
            )


def check_step(variant: AttentionVariant, q: Tensor, k: Tensor, v: Tensor, state: object) -> None:
    """Validate one step's inputs against ``state`` (before anything is written to it)."""
    validate_qkv(q, k, v)
    if not isinstance(state, DecodeState):
        raise TypeError(f"state must be a DecodeState (from {variant.name}.init_state), got {type(state).__name__}")
    if state.variant != variant.name:
        raise TypeError(f"state was made by variant {state.variant!r}, not {variant.name!r}")
    check_options(variant, state)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} new tokens but k and v have {k.shape[2]}; a step takes as many of each")
    for name, got, want in (
        ("batch size of k", k.shape[0], state.batch),
        ("k/v heads", k.shape[1], state.kv_heads),
        ("head dim of k", k.shape[3], state.head_dim),
        ("value dim of v", v.shape[3], state.value_dim),
    ):
        if got != want:
            raise ValueError(f"{name} is {got} but the state holds {want}")
    if q.dtype != state.dtype:
        raise TypeError(f"q, k, v have dtype {q.dtype} but the state holds {state.dtype}")
    if q.device != state.device:
        raise ValueError(f"q, k, v are on {q.device} but the state is on {state.device}")


def step_backend(variant: AttentionVariant, backend: str, q: Tensor, v: Tensor) -> str:
    """The backend a step runs: ``variant.decode_backends`` limits it (None: any of the variant's)."""
    allowed = variant.decode_backends
    if backend == "auto":
        name = variant.resolve_backend("auto", q, v)
        return name if allowed is None or name in allowed else allowed[0]
    name = variant.resolve_backend(backend, q, v)
    if allowed is not None and name not in allowed:
        raise ValueError(
            f"backend={backend!r} has no decoding step for variant {variant.name!r}; "
            f"its steps run on: auto, {', '.join(allowed)}"
        )
    return name


def triton_step(backend: str, q: Tensor) -> bool:
    """Whether a step on ``backend`` runs the Triton decoding kernels (:mod:`attn_kernels.decode`):
    ``triton`` with at most ``attn_kernels.decode.MAX_STEP_TOKENS`` new tokens. Longer steps (a
    prompt) run the variant's forward kernels, or the PyTorch recurrence for the Performer."""
    if backend != "triton":
        return False
    from attn_kernels.decode import MAX_STEP_TOKENS

    return q.shape[2] <= MAX_STEP_TOKENS


def step(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: DecodeState,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, DecodeState]:
    """Attend ``T`` new tokens causally to themselves and to ``state``; returns ``(out, state)``,
    ``out (B, H, T, Dv)`` in the dtype of ``q``, ``state`` advanced by ``T`` (in place)."""
    check_step(variant, q, k, v, state)
    scale = resolve_scale(scale, q.shape[-1])
    if state.scale is not None and scale != state.scale:
        raise ValueError(f"scale={scale} differs from the scale {state.scale} of this state's earlier steps")
    name = step_backend(variant, backend, q, v)
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    # Outside inference mode, so that what the step writes into the state (in place, or regrown
    # buffers) stays a normal tensor that later steps in any mode can update.
    with torch.inference_mode(False), torch.no_grad():
        out = variant.decode_step(q, k, v, state, scale, name)
    state.scale = scale
    state.length += q.shape[2]
    return out, state


def prefill(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    capacity: int | None = None,
) -> tuple[Tensor, DecodeState]:
    """``init_state`` sized for the prompt, then one ``step`` over it."""
    validate_qkv(q, k, v)
    if capacity is None:
        capacity = max(k.shape[2], DEFAULT_CAPACITY)
    state = init_state(
        variant, k.shape[0], k.shape[1], k.shape[3], v.shape[3], dtype=q.dtype, device=q.device, capacity=capacity
    )
    return step(variant, q, k, v, state, scale=scale, backend=backend)
