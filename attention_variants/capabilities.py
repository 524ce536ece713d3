"""What a variant declares beyond its forward pass: the needs a job may ask about, and decoding.

Every benchmark job asks the variant, never a table of names, whether it can run a row:
``variant.lacks(need)`` returns None or the reason it cannot. The needs (:data:`NEEDS`):

- ``causal`` / ``non_causal``: the variant computes ``causal=True`` / ``causal=False``
  (:attr:`Capabilities.causal_modes`);
- ``key_padding``: some backend takes a key padding mask (a backend registered with
  ``padding=True`` besides the reference, or a ``dense()`` that takes ``key_padding_mask``);
- ``decode``: an incremental decoding state (its own hooks, or, for a softmax under a mask, the
  default: a KV cache read through the mask predicate);
- ``softmax``: the variant is a softmax under a mask (:attr:`softmax`).

Context parallelism is no need: every variant has it, through its declared strategy
(:attr:`Capabilities.context_parallel`) or the generic all-gather fallback of
:mod:`attention_variants.distributed`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .checks import shape4
from .dense import compute_dtype, dense_softmax_attention, repeat_kv

if TYPE_CHECKING:
    from .decode import DecodeState, StateLayout

NEEDS: tuple[str, ...] = ("causal", "non_causal", "key_padding", "decode", "softmax")
"""What a job may ask of a variant with :meth:`Capabilities.lacks`."""


class Capabilities:
    """Mixin of :class:`~attention_variants.AttentionVariant`: declarations and decoding hooks."""

    name: ClassVar[str]
    softmax: ClassVar[bool]

    causal_modes: ClassVar[tuple[bool, ...]] = (False, True)
    """The values of ``causal`` the variant computes (a causal-only variant: ``(True,)``)."""
    context_parallel: ClassVar[str | None] = None
    """The variant's own context-parallel strategy (``"ring"``, ``"halo"``, ``"scan"``; see
    :mod:`attention_variants.distributed`), or None: the exact all-gather fallback."""
    kernel_family: ClassVar[str | None] = None
    """The family of tuned Triton kernels its ``triton`` backend runs (``attn_kernels.tuning``:
    ``"flash"``, ``"favor"``), or None; ``attn-bench tune`` drives each family through it."""
    decode_backends: ClassVar[tuple[str, ...] | None] = None
    """Backends a decoding step can run on (None: all of the variant's); ``auto`` picks among them."""

    def lacks(self, need: str) -> str | None:
        """None when the variant has ``need`` (one of :data:`NEEDS`), else the reason it has not."""
        if need not in NEEDS:
            raise ValueError(f"need must be one of {', '.join(NEEDS)}, got {need!r}")
        if need in ("causal", "non_causal"):
            causal = need == "causal"
            if causal in self.causal_modes:
                return None
            return f"variant {self.name!r} does not compute causal={causal} (its causal_modes: {self.causal_modes})"
        if need == "key_padding":
            backends = self._backends  # type: ignore[attr-defined]
            own = any(b.padding for n, b in backends.items() if n != "reference")
            if own or "key_padding_mask" in inspect.signature(type(self).dense).parameters:
                return None
            return f"variant {self.name!r} takes no key padding mask (no backend registered with padding=True)"
        if need == "decode":
            if self.softmax or type(self).decode_state is not Capabilities.decode_state:
                return None
            return f"variant {self.name!r} has no incremental decoding state (decode_state / decode_step)"
        return None if self.softmax else f"variant {self.name!r} is not a softmax under a mask"

    # -- incremental decoding (see attention_variants.decode) --------------------------------

    def decode_flops(
        self, q: Tensor | Sequence[int], k: Tensor | Sequence[int], v: Tensor | Sequence[int], context: int
    ) -> int:
        """Analytic FLOPs of one decoding step from the variant's state: ``q (B, H, T, D)``,
        ``k (B, Hk, T, D)``, ``v (B, Hk, T, Dv)`` are the ``T`` new tokens and ``context`` tokens
        are already in the state. By default the new queries attend causally to every token so
        far (a KV cache); a variant whose state summarises the context (a recurrent state)
        overrides it."""
        b, hk, t, d = shape4(k)
        whole = (b, hk, context + t, d)
        return self.flops(q, whole, (*whole[:3], shape4(v)[3]), causal=True)  # type: ignore[attr-defined]

    def init_state(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int | None = None,
    ) -> DecodeState:
        """An empty decoding state for ``batch`` sequences with ``kv_heads`` key/value heads;
        ``capacity`` sizes a growing cache (tokens; default 256). See :mod:`attention_variants.decode`."""
        from . import decode

        return decode.init_state(
            self,  # type: ignore[arg-type]
            batch, kv_heads, head_dim, value_dim, dtype=dtype, device=device, capacity=capacity,
        )  # fmt: skip

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: DecodeState,
        *,
        scale: float | None = None,
        backend: str = "auto",
    ) -> tuple[Tensor, DecodeState]:
        """Decode ``T >= 1`` new tokens: ``q (B, H, T, D)``, ``k (B, Hk, T, D)``, ``v (B, Hk, T, Dv)``
        attend causally to each other and to everything in ``state``. Returns ``(out (B, H, T, Dv),
        state)``; the state is updated in place. Equals the causal forward of the whole sequence."""
        from . import decode

        return decode.step(self, q, k, v, state, scale=scale, backend=backend)  # type: ignore[arg-type]

    def prefill(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        scale: float | None = None,
        backend: str = "auto",
        capacity: int | None = None,
    ) -> tuple[Tensor, DecodeState]:
        """A prompt's causal attention and the state after it: :meth:`init_state` then :meth:`step`."""
        from . import decode

        return decode.prefill(self, q, k, v, scale=scale, backend=backend, capacity=capacity)  # type: ignore[arg-type]

    def decode_options(self) -> dict[str, Any]:
        """The options that define this variant's decoding state (by default :meth:`options`).
        A state records them when it is made; a step by a variant whose options differ raises a
        ``ValueError`` naming the option. Values are compared with ``==`` (tensors elementwise)."""
        return self.options()  # type: ignore[attr-defined]

    def decode_state(self, layout: StateLayout, *, capacity: int) -> DecodeState:
        """Hook: build this variant's empty state (arguments already checked). A softmax under a
        mask gets a :class:`~attention_variants.decode.KVCache` by default."""
        if not self.softmax:
            raise NotImplementedError(f"variant {self.name!r} has no incremental decoding state")
        from .decode import KVCache

        return KVCache(layout, capacity=capacity)

    def decode_step(self, q: Tensor, k: Tensor, v: Tensor, state: DecodeState, scale: float, backend: str) -> Tensor:
        """Hook: one step on checked inputs (T >= 1, no grad); write the new tokens into ``state``
        (``state.length`` is advanced by the caller) and return the output ``(B, H, T, Dv)``.

        The default, for a softmax under a mask: append to the KV cache, then the new queries (at
        the last ``T`` positions) attend to the cache through :meth:`mask_mod` of the whole causal
        sequence so far, in PyTorch (O(T x length) per step)."""
        from .decode import KVCache

        if not self.softmax or not isinstance(state, KVCache):
            raise NotImplementedError(f"variant {self.name!r} has no incremental decoding step")
        state.append(k, v)
        t, end = q.shape[2], state.length + k.shape[2]
        mod = self.mask_mod(end, end, True, q.device)  # type: ignore[attr-defined]
        qi = torch.arange(end - t, end, device=q.device)[:, None]
        ki = torch.arange(end, device=q.device)[None, :]
        mask = None if mod is None else mod(qi, ki).expand(t, end)
        dtype, groups = compute_dtype(q.dtype), q.shape[1] // k.shape[1]
        keys, values = (repeat_kv(x, groups).to(dtype) for x in (state.keys(end), state.values(end)))
        return dense_softmax_attention(q.to(dtype), keys, values, mask, scale).to(q.dtype)
