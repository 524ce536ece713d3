"""Peer libraries as baselines: one small adapter per peer, in the table :data:`PEERS`.

Each adapter runs a third-party implementation on OUR problem: it takes our layout
``q (B, H, Nq, D)``, ``k (B, Hk, Nk, D)``, ``v (B, Hk, Nk, Dv)`` (grouped-query when
``Hk < H``) and returns ``(B, H, Nq, Dv)``, mapping our semantics (bottom-right causal
alignment, ``(left, right)`` windows, ``scale``, the Performer's projection) onto the peer's
parameters. The mapping of each peer is written down in its ``semantics`` string; where a
peer cannot express a configuration its ``check`` (or ``make``, for shape-dependent limits)
says why, and where its math differs from ours on purpose (performer-pytorch's epsilons)
:func:`semantic_deviation` measures the difference instead of hiding it.

The peers are optional (``pip install .[peers]`` for local-attention and performer-pytorch;
``pip install flash-attn`` / ``pip install xformers`` on a CUDA machine). They are imported
lazily, inside ``check`` and ``make``, so this module imports without them.

- ``check(variant, device, dtype, head_dim, needs_grad) -> str | None``: None when the peer
  can run ``variant`` (an :class:`attention_variants.AttentionVariant`) there, else the reason.
- ``make(variant, q, k, v, causal, scale) -> fn``: ``fn(q, k, v) -> out`` for inputs of these
  shapes, dtype and device. Raises :class:`attn_bench.baselines.Unsupported` for shapes the peer
  cannot express (e.g. ``Nq != Nk`` where it has no bottom-right alignment).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor

import attention_variants as av
from attention_variants import masks
from attention_variants.checks import resolve_scale
from attention_variants.dense import repeat_kv

Fn = Callable[[Tensor, Tensor, Tensor], Tensor]
CheckFn = Callable[[av.AttentionVariant, torch.device, torch.dtype, int, bool], "str | None"]
MakeFn = Callable[[av.AttentionVariant, Tensor, Tensor, Tensor, bool, float], Fn]

PEERS_EXTRA = "pip install .[peers]"


@dataclass(frozen=True)
class Peer:
    """One peer library as a backend of the sweep (see the module docstring)."""

    name: str  # backend name in the sweep
    module: str  # the module imported to run it
    install: str  # how to install it
    variants: tuple[str, ...]  # variants it serves
    devices: tuple[str, ...]  # device types it runs on
    exact: bool  # True: our semantics up to rounding; False: a documented deviation (semantic_deviation)
    semantics: str  # the documented mapping of our semantics onto its parameters
    check_options: CheckFn  # peer-specific part of check (after variant, device and import)
    make: MakeFn

    def check(
        self,
        variant: av.AttentionVariant,
        device: torch.device | str,
        dtype: torch.dtype,
        head_dim: int,
        needs_grad: bool = False,
    ) -> str | None:
        """None if this peer can run ``variant`` on ``device`` in ``dtype``, else why not."""
        device = torch.device(device)
        if variant.name not in self.variants:
            return f"{self.name} serves {', '.join(self.variants)} only, not {variant.name}"
        if device.type not in self.devices:
            return f"{self.name} runs on {' and '.join(d.upper() for d in self.devices)} only, not {device.type}"
        reason = import_reason(self.module, self.install)
        if reason:
            return reason
        return self.check_options(variant, device, dtype, head_dim, needs_grad)


def import_reason(module: str, install: str) -> str | None:
    """None if ``module`` imports, else a sentence saying it is missing (or broken) and how to get it."""
    try:
        with warnings.catch_warnings():  # performer-pytorch imports distutils (deprecated) at import time
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            return f"{module} is not installed ({install})"
        # Installed, but something it needs is not (e.g. distutils on Python 3.12 without setuptools).
        return f"{module} failed to import ({install}): {type(exc).__name__}: {exc}"
    except Exception as exc:  # a broken install (e.g. an extension built for another torch)
        return f"{module} failed to import ({install}): {type(exc).__name__}: {exc}"
    return None


def _refuse(reason: str) -> NoReturn:
    from .baselines import Unsupported  # lazy: baselines may import this module

    raise Unsupported(reason)


def _global_tokens_reason(variant: av.AttentionVariant, peer: str) -> str | None:
    if getattr(variant, "global_tokens", None) not in (None, 0):
        return f"{peer} has no global tokens"
    return None


def _window(variant: av.AttentionVariant, causal: bool) -> tuple[int, int] | None:
    """Our effective ``(left, right)`` reach (causal folded in), or None for full attention."""
    window = getattr(variant, "window", None)
    return None if window is None else masks.window_bounds(window, causal)


def _to_bnhd(x: Tensor) -> Tensor:
    """``(B, H, N, D) -> (B, N, H, D)`` as a view (last dim stays contiguous)."""
    return x.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# local-attention (lucidrains)
# ---------------------------------------------------------------------------------------------

LOCAL_ATTENTION_SEMANTICS = """\
local_attention.LocalAttention(window_size=b, causal=causal, look_backward=left // b,
look_forward=right // b, exact_windowsize=True, autopad=True, scale=scale, dropout=0,
shared_qk=False, use_rotary_pos_emb=False), called on (B, H, N, D) with k/v heads repeated
(it has no grouped-query attention).

(left, right) is our window's reach with causal folded in (right = 0), each clipped to N - 1
(no position is further away), and b = gcd(left, right) (1 when both are 0), so that
left = b * look_backward and right = b * look_forward exactly. With exact_windowsize=True
query t sees keys [t - b * look_backward, t + b * look_forward] (and causal: <= t): our band.
Without it the reach would depend on where t sits in its bucket of b positions. A small gcd
(e.g. (128, 127) -> b = 1) is exact but runs as many tiny buckets.

Its buckets put query i and key i at the same position, which is our bottom-right alignment
only when Nq == Nk: other shapes are refused. autopad pads N to a multiple of b with zero
keys, which its exact mask does not hide from the last queries when non-causal: an all-true
key mask is passed then (its padding becomes False). It multiplies q by scale before q k^T
and takes the softmax in the input dtype (no float32 upcast for float16/bfloat16).
Not expressible: global tokens. Rotary embeddings, dropout and shared-qk are off."""


def _local_attention_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    return _global_tokens_reason(variant, "local-attention")


def local_attention_params(left: int, right: int, causal: bool) -> dict[str, Any]:
    """``LocalAttention`` arguments for our clipped ``(left, right)`` reach (see the semantics)."""
    bucket = math.gcd(left, right) or 1
    return dict(
        window_size=bucket,
        causal=causal,
        look_backward=left // bucket,
        look_forward=right // bucket,
        exact_windowsize=True,
        autopad=True,
        dropout=0.0,
        shared_qk=False,
        use_rotary_pos_emb=False,
    )


def _local_attention_make(
    variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> Fn:
    from local_attention import LocalAttention

    n, nk = q.shape[2], k.shape[2]
    if n != nk:
        _refuse(f"local-attention needs Nq == Nk (its buckets align query i with key i), got Nq={n}, Nk={nk}")
    window = _window(variant, causal)
    assert window is not None
    left, right = (min(w, max(n - 1, 0)) for w in window)
    params = local_attention_params(left, right, causal)
    module = LocalAttention(**params, scale=scale).eval()
    bucket = params["window_size"]
    key_mask = None
    if not causal and right > 0 and n % bucket:
        key_mask = torch.ones(1, n, dtype=torch.bool, device=q.device)
    groups = q.shape[1] // k.shape[1]

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return module(q, repeat_kv(k, groups), repeat_kv(v, groups), mask=key_mask)

    return fn


# ---------------------------------------------------------------------------------------------
# performer-pytorch (lucidrains)
# ---------------------------------------------------------------------------------------------

PERFORMER_FEATURE_EPS = 1e-4  # added inside its softmax-kernel features
PERFORMER_CAUSAL_EPS = 1e-6  # added to its causal normaliser (k cumsum)

PERFORMER_SEMANTICS = """\
performer_pytorch.FastAttention(dim_heads=D, nb_features=m, causal=causal,
generalized_attention=(kernel == "relu"), kernel_fn=ReLU()) with its projection_matrix
buffer replaced by OUR W (variant.projection_matrix in float64; it casts W to the input
dtype, as we do), so both draw the same random features. Called on (B, H, N, D) with k/v
heads repeated (no grouped-query attention); computes in the input dtype (we upcast float16
and bfloat16 to float32): in float16 its key features (about 1e-4 / sqrt(m)) and normaliser
underflow, and standard normal inputs give NaN rows, which the numerics gate reports.

Scale: it always feeds D**-0.25 * x to the features; q and k are multiplied by
(scale * sqrt(D)) ** 0.5 first (exactly 1 for the default scale), so it sees our x' = x * sqrt(scale).

Softmax kernel, where it differs from ours (documented, measured by semantic_deviation):
  phi(x) = m**-0.5 * (exp(W x' - |x'|^2 / 2 - c) + 1e-4), c = max of W x' over the row (queries)
  or over all keys and features of a (batch, head) (keys). Ours has no + 1e-4, drops |x'|^2/2
  with the row max for queries, and takes c = max of (W x' - |x'|^2 / 2) for keys. Without the
  1e-4 all these constants cancel in the ratio; with it they set how much the 1e-4 weighs. On
  standard normal inputs with D = 64 (|x'|^2 / 2 about 4, max of W k' about 12), over 99% of its
  key features fall below the 1e-4, so its output is close to a mean of v and differs from ours
  by about the output's own size; with inputs of a quarter of that norm, by about 1e-4.
ReLU kernel: relu(W x') + 1e-3, the same as ours.
Causal (both kernels): normaliser q . (cumsum(k) + 1e-6) instead of q . cumsum(k). Its prefix
sums pair query i with key i, so causal needs Nq == Nk (refused otherwise); non-causal takes
any Nk. Without fast_transformers' CUDA extension (always on CPU) causal runs its
causal_linear_attention_noncuda: 128 chunks along N, each materialising (N/128, m, Dv) states;
with the extension, CausalDotProduct (float16 then needs apex: refused without it).
FastAttention prints a notice when it falls back; it is silenced here. The projection draw in
its constructor runs under a forked RNG, so the caller's random stream is untouched."""


def _performer_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    return None


def _performer_module(variant: av.PerformerAttention, head_dim: int, causal: bool, device: torch.device):
    from performer_pytorch import FastAttention

    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        module = FastAttention(
            dim_heads=head_dim,
            nb_features=variant.num_features,
            causal=causal,
            generalized_attention=variant.kernel == "relu",
            kernel_fn=torch.nn.ReLU(),
        )
    module.projection_matrix = variant.projection_matrix(head_dim, device, torch.float64)
    return module.eval()


def performer_causal_path(module: Any) -> str:
    """Which causal routine a causal ``FastAttention`` runs: ``"noncuda"`` (chunked PyTorch) or ``"cuda"``."""
    fn = getattr(module, "causal_linear_fn", None)
    return "noncuda" if getattr(fn, "__name__", "") == "causal_linear_attention_noncuda" else "cuda"


def _performer_make(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Fn:
    assert isinstance(variant, av.PerformerAttention)
    nq, nk, d = q.shape[2], k.shape[2], q.shape[-1]
    if causal and nq != nk:
        _refuse(f"performer-pytorch's causal prefix sums pair query i with key i: needs Nq == Nk, got {nq}, {nk}")
    module = _performer_module(variant, d, causal, q.device)
    if causal and performer_causal_path(module) == "cuda" and q.dtype == torch.float16:
        from performer_pytorch import performer_pytorch as pp

        if not pp.APEX_AVAILABLE:
            _refuse("performer-pytorch's CUDA causal product takes float16 only with nvidia apex installed")
    factor = (scale * d**0.5) ** 0.5
    groups = q.shape[1] // k.shape[1]

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if factor != 1.0:
            q, k = q * factor, k * factor
        return module(q, repeat_kv(k, groups), repeat_kv(v, groups))

    return fn


# ---------------------------------------------------------------------------------------------
# flash-attn (CUDA only)
# ---------------------------------------------------------------------------------------------

FLASH_ATTN_SEMANTICS = """\
flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal,
window_size=(left, right)) on (B, N, H, D) views of our tensors (a transpose, no copy).
It documents our semantics exactly: causal aligned bottom-right (since 2.1), query i sees keys
[i + Nk - Nq - left, i + Nk - Nq + right], rows that see no key give 0, and grouped-query
attention natively (query head h reads k/v head h // (H / Hk), as ours). (left, right) is our
window's reach with causal folded in; full attention passes (-1, -1). float16 and bfloat16
only, head dim <= 256, the value head dim equal to the query's, Ampere (sm80) or newer.
Not expressible: global tokens."""


def _flash_attn_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    reason = _global_tokens_reason(variant, "flash-attn")
    if reason:
        return reason
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16 and bfloat16 only, not {dtype}"
    if head_dim > 256:
        return f"flash-attn supports head dims up to 256, got {head_dim}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"flash-attn 2 needs an Ampere (sm80) or newer GPU, this one is sm{major}{minor}"
    return None


def _flash_attn_make(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Fn:
    from flash_attn import flash_attn_func

    if v.shape[-1] != q.shape[-1]:
        _refuse(f"flash-attn needs the value head dim equal to the query's, got {v.shape[-1]} and {q.shape[-1]}")
    window = _window(variant, causal) or (-1, -1)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_func(
            _to_bnhd(q), _to_bnhd(k), _to_bnhd(v), dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window
        )
        return out.transpose(1, 2)

    return fn


FLASH_ATTN_KVCACHE_SEMANTICS = """\
flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, softmax_scale=scale, causal=causal,
window_size=(left, right)) on (B, N, H, D) views of our tensors (a transpose, no copy): k and v
are the cache it reads, every position valid (no cache_seqlens), q the new queries. This is a
decoder's step after its new keys and values are in the cache (our decode rows: one query
against the cache that holds its own token). Causal is aligned bottom-right, query i sees keys
[i + Nk - Nq - left, i + Nk - Nq + right], grouped-query attention natively (query head h reads
k/v head h // (H / Hk)), rows that see no key give 0; it picks its own number of KV splits
(num_splits=0). (left, right) is our window's reach with causal folded in, (W, 0) for a causal
window W; full attention passes (-1, -1). Forward only (no gradients). float16 and bfloat16,
head dim <= 256, the value head dim equal to the query's, Ampere (sm80) or newer.
Not expressible: global tokens."""


def _flash_attn_kvcache_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    if needs_grad:
        return "flash_attn_with_kvcache is forward only (no gradients)"
    return _flash_attn_check(variant, device, dtype, head_dim, needs_grad)


def _flash_attn_kvcache_make(
    variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> Fn:
    from flash_attn import flash_attn_with_kvcache

    if v.shape[-1] != q.shape[-1]:
        _refuse(f"flash-attn needs the value head dim equal to the query's, got {v.shape[-1]} and {q.shape[-1]}")
    window = _window(variant, causal) or (-1, -1)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_with_kvcache(
            _to_bnhd(q), _to_bnhd(k), _to_bnhd(v), softmax_scale=scale, causal=causal, window_size=window
        )
        return out.transpose(1, 2)

    return fn


# ---------------------------------------------------------------------------------------------
# xformers (CUDA only)
# ---------------------------------------------------------------------------------------------

XFORMERS_SEMANTICS = """\
xformers.ops.memory_efficient_attention(q, k, v, attn_bias, p=0.0, scale=scale) on
(B, N, H, D) views of our tensors, k/v heads repeated (its grouped-query form is a 5-D
stride-0 layout that not every operator takes; repeating is always accepted). attn_bias:
full non-causal: None; full causal: LowerTriangularFromBottomRightMask(); sliding window:
LocalAttentionFromBottomRightMask(window_left=left, window_right=right), (left, right) our
reach with causal folded in (right = 0): it keeps key k for query q iff
q - left <= k + Nq - Nk <= q + right, our bottom-right band (and with right = 0, causal too).
Rows that see no key (only when Nq > Nk) are set to 0, our convention (xformers does not
document their value). float16, bfloat16 and float32; its dispatcher picks the operator:
make() runs one (1 batch, 1 kv-head group) call and reports "no operator" as unsupported.
Not expressible: global tokens."""


def _xformers_check(
    variant: av.AttentionVariant, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool
) -> str | None:
    reason = _global_tokens_reason(variant, "xformers")
    if reason:
        return reason
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers takes float16, bfloat16 and float32 only, not {dtype}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    return None


def _empty_rows(nq: int, nk: int, window: tuple[int, int] | None, causal: bool) -> int:
    """How many leading queries see no key (bottom-right alignment): ``max(0, Nq - Nk - right)``."""
    if window is not None:
        right = window[1]
    elif causal:
        right = 0
    else:
        return 0
    return max(0, min(nq, nq - nk - right))


def xformers_bias(variant: av.AttentionVariant, causal: bool):
    """The xformers attention bias with our semantics (None for full non-causal attention)."""
    from xformers.ops.fmha import attn_bias

    window = _window(variant, causal)
    if window is not None:
        return attn_bias.LocalAttentionFromBottomRightMask(window_left=window[0], window_right=window[1])
    return attn_bias.LowerTriangularFromBottomRightMask() if causal else None


def _xformers_make(variant: av.AttentionVariant, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Fn:
    import xformers.ops as xops

    bias = xformers_bias(variant, causal)
    groups = q.shape[1] // k.shape[1]
    empty = _empty_rows(q.shape[2], k.shape[2], _window(variant, causal), causal)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        out = xops.memory_efficient_attention(_to_bnhd(q), _to_bnhd(k), _to_bnhd(v), attn_bias=bias, p=0.0, scale=scale)
        out = out.transpose(1, 2)
        if empty:
            keep = torch.arange(out.shape[2], device=out.device) >= empty
            out = out.where(keep[:, None], out.new_zeros(()))
        return out

    try:
        with torch.no_grad():
            fn(q[:1, :groups].detach(), k[:1, :1].detach(), v[:1, :1].detach())
    except NotImplementedError as exc:
        _refuse(f"xformers has no operator for this configuration: {str(exc).splitlines()[0]}")
    return fn


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            name="local_attention",
            module="local_attention",
            install=PEERS_EXTRA,
            variants=("sliding_window",),
            devices=("cpu", "cuda"),
            exact=True,
            semantics=LOCAL_ATTENTION_SEMANTICS,
            check_options=_local_attention_check,
            make=_local_attention_make,
        ),
        Peer(
            name="performer_pytorch",
            module="performer_pytorch",
            install=PEERS_EXTRA,
            variants=("performer",),
            devices=("cpu", "cuda"),
            exact=False,
            semantics=PERFORMER_SEMANTICS,
            check_options=_performer_check,
            make=_performer_make,
        ),
        Peer(
            name="flash_attn",
            module="flash_attn",
            install="pip install flash-attn (a CUDA build; not in .[peers])",
            variants=("full", "sliding_window"),
            devices=("cuda",),
            exact=True,
            semantics=FLASH_ATTN_SEMANTICS,
            check_options=_flash_attn_check,
            make=_flash_attn_make,
        ),
        Peer(
            name="flash_attn_kvcache",
            module="flash_attn",
            install="pip install flash-attn (a CUDA build; not in .[peers])",
            variants=("full", "sliding_window"),
            devices=("cuda",),
            exact=True,
            semantics=FLASH_ATTN_KVCACHE_SEMANTICS,
            check_options=_flash_attn_kvcache_check,
            make=_flash_attn_kvcache_make,
        ),
        Peer(
            name="xformers",
            module="xformers.ops",
            install="pip install xformers (a CUDA build; not in .[peers])",
            variants=("full", "sliding_window"),
            devices=("cuda",),
            exact=True,
            semantics=XFORMERS_SEMANTICS,
            check_options=_xformers_check,
            make=_xformers_make,
        ),
    )
}


def get_peer(name: str) -> Peer:
    """The peer called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; peers are {', '.join(PEERS)}") from None


def semantic_deviation(
    name: str,
    variant: av.AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float | None = None,
) -> float:
    """``max |peer - ours|`` in float64 on these inputs: the part of a peer's error that comes from
    its documented semantics, not from rounding. 0.0 for the exact peers (their tests check that
    they match our reference to rounding); measured for the others (performer-pytorch's 1e-4
    inside its features, 1e-6 in its causal normaliser, and its stabilisers), on ``q``'s device.

    The numerics gate adds it to the bound of the peer's row and reports it, rather than
    failing the row or widening every tolerance.
    """
    peer = get_peer(name)
    if peer.exact:
        return 0.0
    s = resolve_scale(scale, q.shape[-1])
    q64, k64, v64 = (t.detach().to(torch.float64) for t in (q, k, v))
    with torch.no_grad():
        ours = variant.reference(q64, k64, v64, causal=causal, scale=s)
        theirs = peer.make(variant, q64, k64, v64, causal, s)(q64, k64, v64)
    return (theirs - ours).abs().max().item() if ours.numel() else 0.0
