"""The variant base class, input validation and the one registry of variants and backends.

A *variant* (``full``, ``sliding_window``, ``performer``) is a class registered with
:func:`register_variant`. A *backend* of a variant is a forward function registered with
:func:`register_backend` together with a ``check`` that returns ``None`` when the backend
can run a configuration, or a sentence saying why it cannot. The public API, the tests
and the benchmark harness all iterate this registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .capabilities import Capabilities
from .checks import FLOAT_DTYPES, check_causal, resolve_scale, shape4, validate_key_padding_mask, validate_qkv
from .dense import compute_dtype, dense_softmax_attention, empty_attention, padding_to_mask, repeat_kv
from .masks import MaskMod, dense_from_mod

BACKENDS: tuple[str, ...] = ("reference", "torch", "triton")
"""The project's concrete backends, in the order the harness reports them. ``"auto"`` picks one
of them. A plug-in may register a backend under a new name; :func:`list_backends` lists those too."""
_EXTRA_BACKENDS: list[str] = []

ForwardFn = Callable[..., Tensor]
"""``forward(variant, q, k, v, causal, scale)``; a backend registered with ``padding=True`` also
takes ``key_padding_mask=`` (a bool ``(B, Nk)`` tensor or None)."""
CheckFn = Callable[["AttentionVariant", torch.device, torch.dtype, int], "str | None"]

_VARIANTS: dict[str, type[AttentionVariant]] = {}

EXACT_VARIANT = "full"
"""The variant of exact softmax attention over every key: what ``compare_with`` and ``approximates``
name, and the control of the benchmark's studies (pretraining, full-attention baselines)."""


@dataclass(frozen=True)
class SweepOption:
    """A constructor option the benchmark harness sweeps (e.g. the window, the feature count).

    ``name`` is the constructor keyword, and also the CSV column, the preset key and the
    command-line option (``--name``) of ``attn-bench sweep``; ``label`` prefixes its value in line
    names (``"w"`` gives ``w=128``); ``default`` is the value a sweep uses when none is given.
    """

    name: str
    default: int
    help: str
    label: str


@dataclass(frozen=True)
class Backend:
    """One backend of one variant: ``forward(variant, q, k, v, causal, scale)`` and its ``check``.

    ``padding``: the backend takes a key padding mask, as ``forward(..., key_padding_mask=mask)``."""

    name: str
    forward: ForwardFn
    check: CheckFn
    padding: bool = False


def register_variant(name: str) -> Callable[[type[AttentionVariant]], type[AttentionVariant]]:
    """Class decorator: register an :class:`AttentionVariant` subclass under ``name``."""

    def deco(cls: type[AttentionVariant]) -> type[AttentionVariant]:
        if name in _VARIANTS:
            raise ValueError(f"variant {name!r} is already registered")
        cls.name = name
        # Every variant has the dense ground truth; a variant overrides it by registering its own.
        cls._backends = {"reference": Backend("reference", _reference_forward, _no_check, padding=True)}
        _VARIANTS[name] = cls
        return cls

    return deco


def register_backend(
    variant_cls: type[AttentionVariant], name: str, check: CheckFn | None = None, padding: bool = False
) -> Callable[[ForwardFn], ForwardFn]:
    """Function decorator: register ``forward`` as backend ``name`` of ``variant_cls``.

    ``name`` is one of :data:`BACKENDS`, or a new name (a plug-in's own backend), which then
    appears in :func:`list_backends`. ``padding=True`` declares that ``forward`` takes a key
    padding mask: it is then called as ``forward(variant, q, k, v, causal, scale,
    key_padding_mask=mask_or_None)``; without it, a call with a mask is refused."""
    if not isinstance(padding, bool):
        raise TypeError(f"padding must be a bool, got {type(padding).__name__}")
    if not isinstance(name, str) or not name.isidentifier() or name == "auto":
        raise ValueError(f"backend name must be an identifier other than 'auto', got {name!r}")
    if name not in BACKENDS and name not in _EXTRA_BACKENDS:
        _EXTRA_BACKENDS.append(name)

    def deco(fn: ForwardFn) -> ForwardFn:
        variant_cls._backends[name] = Backend(name, fn, check or _no_check, padding)
        return fn

    return deco


def _reference_forward(
    variant: AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    if key_padding_mask is None:  # a plug-in's dense() may predate key padding
        return variant.dense(q, k, v, causal, scale, upcast=True)
    return variant.dense(q, k, v, causal, scale, upcast=True, key_padding_mask=key_padding_mask)


def _no_check(variant: AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return None


def list_variants() -> list[str]:
    """Names of the registered variants."""
    return list(_VARIANTS)


def list_backends() -> list[str]:
    """Names of the concrete backends (``"auto"`` chooses among them at call time)."""
    return [*BACKENDS, *_EXTRA_BACKENDS]


def variant_class(name: str) -> type[AttentionVariant]:
    """The registered class of variant ``name``; ValueError listing the known ones otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"variant must be a str, got {type(name).__name__}")
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; variants are {', '.join(_VARIANTS)}") from None


def get_variant(name: str, **options: Any) -> AttentionVariant:
    """Build variant ``name`` with its options, e.g. ``get_variant("sliding_window", window=128)``."""
    cls = variant_class(name)
    allowed = cls.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for variant {name!r}; "
            f"its options are: {', '.join(allowed) or '(none)'}"
        )
    return cls(**options)


# ---------------------------------------------------------------------------------------------
# The variant base class
# ---------------------------------------------------------------------------------------------


class AttentionVariant(Capabilities):
    """Base class of the attention variants. Subclasses are registered with :func:`register_variant`.

    Call an instance as ``variant(q, k, v, causal=False, scale=None, backend="auto")`` with
    ``q (B, H, Nq, D)``, ``k (B, Hk, Nk, D)``, ``v (B, Hk, Nk, Dv)`` and ``H % Hk == 0``;
    the result is ``(B, H, Nq, Dv)`` in the dtype of ``q``.
    """

    name: ClassVar[str]
    _backends: ClassVar[dict[str, Backend]]

    # -- what the benchmark harness needs to know, declared by each variant ----------------------
    sweep_options: ClassVar[tuple[SweepOption, ...]] = ()
    """Options a sweep varies; their values are part of a benchmark row's identity."""
    verify_options: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    """Option sets ``attn-bench verify`` checks every backend with."""
    softmax: ClassVar[bool] = False
    """True if the variant is ``softmax(scale q k^T, masked by mask_mod) v`` exactly. The numerics
    gate then computes its ground truth independently from :meth:`mask_mod`, and the SDPA and
    FlexAttention baselines run the same mask."""
    approximates: ClassVar[str | None] = None
    """Name of the exact variant this one approximates (the Performer: ``"full"``), or None. The
    baselines of an approximation compute the exact variant, and the gate reports ``approx_err``."""
    compare_with: ClassVar[str | None] = EXACT_VARIANT
    """The variant whose line the report's crossover compares this one with (None: none)."""
    backward_flops_ratio: ClassVar[float] = 2.5
    """Backward FLOPs over forward FLOPs: 2.5 for softmax attention (FlashAttention's convention:
    5 matmuls in the backward, P recomputed, against 2 forward); 2 for a linear form."""

    def mask_mod(self, nq: int, nk: int, causal: bool, device: torch.device | str = "cpu") -> MaskMod | None:
        """Softmax variants: the predicate of which keys each query sees (see
        :mod:`attention_variants.masks`), None when all are. Others raise NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} is not a masked softmax; it has no mask predicate")

    def exact(self) -> AttentionVariant:
        """The exact computation this variant stands for: itself, or the variant it approximates."""
        return self if self.approximates is None else get_variant(self.approximates)

    @classmethod
    def sweep_defaults(cls) -> dict[str, int]:
        """The sweep options at their defaults (an instance to list or describe the variant with)."""
        return {o.name: o.default for o in cls.sweep_options}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Constructor options this variant accepts (used to reject unknown ones): by default the
        named parameters of its ``__init__``."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.name != "self" and p.kind in kinds)

    def options(self) -> dict[str, Any]:
        """This instance's options, as passed to the constructor (by default the attributes named
        like the constructor's parameters)."""
        return {name: getattr(self, name) for name in self.option_names() if hasattr(self, name)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    # -- semantics hooks, overridden by variants ------------------------------------------------

    def check_call(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
        """Variant-specific validation of a call (shapes are already checked)."""

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
        """Naive dense computation: the ``reference`` backend (``upcast=True``: float32/float64 math).

        With ``upcast=False`` it computes in the input dtype. A softmax variant gets it from
        :meth:`mask_mod`; any other variant must override it. ``key_padding_mask (B, Nk)`` hides
        the keys where it is False.
        """
        if not self.softmax:
            raise NotImplementedError(f"{type(self).__name__} must define dense() (its reference backend)")
        nq, nk = q.shape[2], k.shape[2]
        mod = self.mask_mod(nq, nk, causal, q.device)
        mask = None if mod is None else dense_from_mod(mod, nq, nk, q.device)
        mask = padding_to_mask(mask, key_padding_mask)
        groups = q.shape[1] // k.shape[1]
        dtype = compute_dtype(q.dtype) if upcast else q.dtype
        out = dense_softmax_attention(
            q.to(dtype), repeat_kv(k, groups).to(dtype), repeat_kv(v, groups).to(dtype), mask, scale
        )
        return out.to(q.dtype)

    def visible_pairs(self, nq: int, nk: int, causal: bool) -> int:
        """Number of visible (query, key) pairs for one (batch, head); counted from the dense
        mask for a softmax variant (variants with a closed form override it)."""
        if not self.softmax:
            return nq * nk
        mod = self.mask_mod(nq, nk, causal)
        return nq * nk if mod is None else int(dense_from_mod(mod, nq, nk).sum())

    def flops(
        self,
        q: Tensor | Sequence[int],
        k: Tensor | Sequence[int],
        v: Tensor | Sequence[int],
        *,
        causal: bool = False,
    ) -> int:
        """Analytic FLOPs of one forward pass, counting only visible (query, key) pairs.

        ``q``, ``k``, ``v`` are tensors or their shapes ``(B, H, Nq, D)``, ``(B, Hk, Nk, D)``,
        ``(B, Hk, Nk, Dv)``. A multiply-add counts as 2 FLOPs; softmax is not counted.
        """
        b, h, nq, d = shape4(q)
        nk, dv = shape4(k)[2], shape4(v)[3]
        return 2 * b * h * self.visible_pairs(nq, nk, causal) * (d + dv)

    # -- backends ---------------------------------------------------------------------------------

    def backend(self, name: str) -> Backend:
        if not isinstance(name, str):
            raise TypeError(f"backend must be a str, got {type(name).__name__}")
        if name not in self._backends:
            raise ValueError(
                f"unknown backend {name!r} for variant {self.name!r}; backends are: auto, {', '.join(self._backends)}"
            )
        return self._backends[name]

    def unsupported_reason(
        self, backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
    ) -> str | None:
        """None if ``backend`` can run this variant for the given device/dtype/head dim, else why not."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if backend == "auto":
            return None
        spec = self._backends.get(backend) if isinstance(backend, str) else None
        if spec is None and isinstance(backend, str) and backend in list_backends():
            return f"variant {self.name!r} has no {backend!r} backend (it has: {', '.join(self._backends)})"
        if spec is None:
            spec = self.backend(backend)  # raises the TypeError / ValueError naming the backend
        if dtype not in FLOAT_DTYPES:
            return f"dtype {dtype} is not a floating-point dtype this project supports"
        return spec.check(self, device, dtype, head_dim)

    def supports(self, backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
        """True if ``backend`` can run this variant on ``device`` with ``dtype`` and ``head_dim``.

        :meth:`unsupported_reason` says why not.
        """
        return self.unsupported_reason(backend, device, dtype, head_dim) is None

    def takes_padding(self, backend: str, padding: bool = True) -> bool:
        """True if ``backend`` exists for this variant and can take a key padding mask (or none is given)."""
        spec = self._backends.get(backend)
        return spec is not None and (spec.padding or not padding)

    def resolve_backend(self, backend: str, q: Tensor, v: Tensor | None = None, *, padding: bool = False) -> str:
        """The concrete backend a call with ``backend`` runs on these inputs (``auto``: ``triton`` on
        CUDA where it runs, else ``torch``, else ``reference``).

        ``padding``: the call has a key padding mask, so only backends registered with
        ``padding=True`` qualify (``auto`` skips the others). Raises ValueError when an explicitly
        requested backend cannot run the configuration.
        """
        head_dim = max(q.shape[-1], v.shape[-1] if v is not None else 0)
        if backend == "auto":
            cuda = q.device.type == "cuda"
            if cuda and self.supports("triton", q.device, q.dtype, head_dim) and self.takes_padding("triton", padding):
                return "triton"
            if not padding:  # a plug-in with no torch backend (a mask predicate only) runs its reference
                return "torch" if "torch" in self._backends else "reference"
            for name in ("torch", "reference"):
                if self.takes_padding(name, True) and self.supports(name, q.device, q.dtype, head_dim):
                    return name
            raise ValueError(f"backend='auto' found no backend of {self!r} that takes key_padding_mask here")
        reason = self.unsupported_reason(backend, q.device, q.dtype, head_dim)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {self!r} here: {reason}")
        if padding and not self._backends[backend].padding:
            raise ValueError(
                f"backend={backend!r} of variant {self.name!r} does not take key_padding_mask; "
                f"backends that do: {', '.join(n for n, b in self._backends.items() if b.padding)}"
            )
        return backend

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        backend: str = "auto",
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attention output ``(B, H, Nq, Dv)`` computed by ``backend`` (see the class docstring).

        ``key_padding_mask``: optional bool ``(B, Nk)`` on q's device, True for a real key; a
        padded key is invisible to every query. The variant's own mask is computed on the padded
        layout (positions are not shifted), and a query row left with no visible key gives 0.
        """
        validate_qkv(q, k, v)
        causal = check_causal(causal)
        scale = resolve_scale(scale, q.shape[-1])
        key_padding_mask = validate_key_padding_mask(key_padding_mask, q, k)
        self.check_call(q, k, v, causal)
        name = self.resolve_backend(backend, q, v, padding=key_padding_mask is not None)
        if q.shape[2] == 0 or k.shape[2] == 0:
            return empty_attention(q, k, v)
        spec = self._backends[name]
        if spec.padding:
            return spec.forward(self, q, k, v, causal, scale, key_padding_mask=key_padding_mask)
        return spec.forward(self, q, k, v, causal, scale)

    def reference(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """The dense ground truth (builds the Nq x Nk matrix), in float32 or float64 arithmetic."""
        return self(q, k, v, causal=causal, scale=scale, backend="reference", key_padding_mask=key_padding_mask)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    variant: str = "full",
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    key_padding_mask: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Functional form: ``get_variant(variant, **options)(q, k, v, causal=..., scale=..., backend=...)``.

    ``q (B, H, Nq, D)``, ``k (B, Hk, Nk, D)``, ``v (B, Hk, Nk, Dv)`` with ``H % Hk == 0``;
    returns ``(B, H, Nq, Dv)`` in the dtype of ``q``. ``key_padding_mask``: optional bool
    ``(B, Nk)``, True for a real key (see :meth:`AttentionVariant.__call__`).
    """
    return get_variant(variant, **options)(
        q, k, v, causal=causal, scale=scale, backend=backend, key_padding_mask=key_padding_mask
    )
